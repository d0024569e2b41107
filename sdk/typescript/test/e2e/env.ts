/** What the e2e tests need from their environment: a real `matchlock` (MATCHLOCK_BIN)
 * with a private MATCHLOCK_HOME. Missing either is a loud failure, never a skip. */
import { execFileSync } from "node:child_process";

export const BIN = process.env.MATCHLOCK_BIN ?? "";
export const IMAGE = process.env.MATCHLOCK_TEST_IMAGE || "matchlock/busybox";

export function requireEnv(): void {
  if (!BIN) {
    throw new Error("MATCHLOCK_BIN is not set: point it at the matchlock CLI (e.g. ../../.venv/bin/matchlock); tests/e2e/test_typescript_sdk.py does this");
  }
  if (!process.env.MATCHLOCK_HOME) {
    throw new Error("MATCHLOCK_HOME is not set: the e2e tests use a private state directory, never the user's");
  }
  try {
    execFileSync(BIN, ["--version"], { stdio: "pipe" });
  } catch (e) {
    throw new Error(`${BIN} --version failed: ${(e as Error).message}`);
  }
}

/** `matchlock list` output (all VMs of this MATCHLOCK_HOME). */
export function listVMs(): string {
  return execFileSync(BIN, ["list"], { encoding: "utf8" });
}

/** An async iterable fed by the test, for stdin / resize streams. */
export class Feed<T> implements AsyncIterable<T> {
  private items: T[] = [];
  private waiting: ((r: IteratorResult<T>) => void) | undefined;
  private ended = false;

  push(item: T): void {
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w({ value: item, done: false });
    } else {
      this.items.push(item);
    }
  }

  end(): void {
    this.ended = true;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w({ value: undefined as never, done: true });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return {
      next: (): Promise<IteratorResult<T>> => {
        const item = this.items.shift();
        if (item !== undefined) return Promise.resolve({ value: item, done: false });
        if (this.ended) return Promise.resolve({ value: undefined as never, done: true });
        return new Promise((resolve) => (this.waiting = resolve));
      },
    };
  }
}

/** Resolves when `pred(text so far)` holds; rejects after `ms`. */
export class Collector {
  text = "";
  private checks: { pred: (s: string) => boolean; resolve: () => void }[] = [];

  readonly write = (chunk: Buffer): void => {
    this.text += chunk.toString("utf8");
    this.checks = this.checks.filter((c) => {
      if (c.pred(this.text)) {
        c.resolve();
        return false;
      }
      return true;
    });
  };

  until(pred: (s: string) => boolean, ms = 60_000): Promise<void> {
    if (pred(this.text)) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`timed out waiting; output so far: ${JSON.stringify(this.text.slice(-500))}`)), ms);
      this.checks.push({ pred, resolve: () => { clearTimeout(t); resolve(); } });
    });
  }
}
