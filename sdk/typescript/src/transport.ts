/** The `matchlock rpc` child process and JSON-RPC over its stdio (spec §1): NDJSON
 * framing on bytes (a UTF-8 sequence may span chunks), ids, pending requests,
 * request-scoped notifications, `cancel` on abort/timeout. */
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { MatchlockError, RPCError, TimeoutError } from "./errors.js";
import type { RequestOptions } from "./types.js";
import type { JSONObject, JSONValue } from "./wire.js";

/** `data`: an output notification's bytes when they came as a raw payload (below);
 * otherwise the handler decodes `params.data` (base64). */
export type NotificationHandler = (method: string, params: JSONObject, data?: Buffer) => void;

interface Pending {
  resolve: (result: JSONValue) => void;
  reject: (error: unknown) => void;
  onNotification?: NotificationHandler;
}

/** The eight notification methods routed to a pending request by `params.id`. */
const REQUEST_SCOPED = new Set([
  "exec_stream.stdout",
  "exec_stream.stderr",
  "exec_pipe.ready",
  "exec_pipe.stdout",
  "exec_pipe.stderr",
  "exec_tty.ready",
  "exec_tty.stdout",
  "log_stream.data",
]);

const STDERR_TAIL = 20;

/** Raw payloads (our server's extension, docs/lifecycle.md): an exec sent with
 * `raw: true` gets its output as exactly this header line followed by `bytes` raw
 * bytes, not base64 in JSON. Any other spelling is an ordinary line. */
const RAW_HEAD = '{"jsonrpc":"2.0","method":"';
const RAW_HEADER = /^\{"jsonrpc":"2\.0","method":"([^"\\]*)","params":\{"id":(\d+),"bytes":(\d+)\}\}$/;
const MAX_RAW = 10 << 20; // as the server (rpc/_codec.py MAX_RAW)

interface RawPayload {
  method: string;
  id: number;
  need: number;
  parts: Buffer[];
}

export interface SpawnSpec {
  command: string;
  args: string[];
  /** For messages: how the user named the binary. */
  describe: string;
  detached: boolean;
}

export class Connection {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly pending = new Map<number, Pending>();
  private nextID = 0;
  private chunks: Buffer[] = [];
  private raw: RawPayload | null = null; // a raw header read, its payload still due
  private broken = false;
  private stderrTail: string[] = [];
  private stderrPartial = "";
  private exited = false;
  private exitStatus: string = "";
  private readonly exitPromise: Promise<void>;
  onEvent: (params: JSONObject) => void = () => {};
  onExit: () => void = () => {};

  private constructor(child: ChildProcessWithoutNullStreams) {
    this.child = child;
    child.stdout.on("data", (chunk: Buffer) => this.onData(chunk));
    child.stderr.on("data", (chunk: Buffer) => this.onStderr(chunk));
    // A closed pipe shows up as EPIPE on write: the exit handler reports it.
    child.stdin.on("error", () => {});
    this.exitPromise = new Promise((resolve) => {
      child.on("close", (code, signal) => {
        this.exited = true;
        this.exitStatus = signal ? `killed by ${signal}` : `exit status ${code}`;
        this.failAll(new MatchlockError(`Matchlock process closed unexpectedly${this.why()}`));
        resolve();
        this.onExit();
      });
    });
  }

  static async start(spec: SpawnSpec): Promise<Connection> {
    const child = spawn(spec.command, spec.args, {
      stdio: ["pipe", "pipe", "pipe"],
      // Own session: a Ctrl-C meant for the caller must not kill the server before the
      // SDK has closed the VM. Not under sudo, whose credentials are tied to the tty.
      detached: spec.detached,
    });
    await new Promise<void>((resolve, reject) => {
      child.once("spawn", () => resolve());
      child.once("error", (err: NodeJS.ErrnoException) => {
        if (err.code === "ENOENT") {
          reject(new MatchlockError(
            `matchlock binary not found: ${JSON.stringify(spec.describe)} (set MATCHLOCK_BIN or Config.binaryPath)`,
          ));
        } else if (err.code === "EACCES") {
          reject(new MatchlockError(`matchlock binary is not executable: ${JSON.stringify(spec.describe)}`));
        } else {
          reject(new MatchlockError(`cannot start ${JSON.stringify(spec.describe)}: ${err.message}`));
        }
      });
    });
    return new Connection(child);
  }

  get running(): boolean {
    return !this.exited;
  }

  private why(): string {
    const parts: string[] = [];
    if (this.exitStatus) parts.push(this.exitStatus);
    const last = this.stderrTail[this.stderrTail.length - 1];
    if (last) parts.push(last);
    return parts.length > 0 ? ` (${parts.join(": ")})` : "";
  }

  private onStderr(chunk: Buffer): void {
    const text = this.stderrPartial + chunk.toString("utf8");
    const lines = text.split("\n");
    this.stderrPartial = lines.pop() ?? "";
    for (const line of lines) {
      const l = line.trimEnd();
      if (l) {
        this.stderrTail.push(l);
        if (this.stderrTail.length > STDERR_TAIL) this.stderrTail.shift();
      }
    }
  }

  private onData(chunk: Buffer): void {
    let start = 0;
    while (!this.broken && start < chunk.length) {
      const raw = this.raw;
      if (raw) {
        const take = Math.min(raw.need, chunk.length - start);
        raw.parts.push(chunk.subarray(start, start + take));
        raw.need -= take;
        start += take;
        if (raw.need === 0) {
          this.raw = null;
          this.deliver(raw.method, raw.id, {}, Buffer.concat(raw.parts));
        }
        continue;
      }
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      const part = chunk.subarray(start, nl);
      const line = this.chunks.length > 0 ? Buffer.concat([...this.chunks, part]) : part;
      this.chunks = [];
      start = nl + 1;
      this.onLine(line);
    }
    if (!this.broken && start < chunk.length) {
      this.chunks.push(chunk.subarray(start));
    }
  }

  /** A raw-payload header: the payload that follows is read by onData. */
  private rawHeader(text: string): boolean {
    if (text.length > 200 || !text.startsWith(RAW_HEAD)) return false;
    const m = RAW_HEADER.exec(text);
    if (!m) return false;
    const need = Number(m[3]);
    if (need > MAX_RAW) {
      this.broken = true; // the framing is lost: nothing after this can be trusted
      this.failAll(new MatchlockError(`Matchlock sent a raw payload of ${need} bytes${this.why()}`));
      return true;
    }
    if (need === 0) this.deliver(m[1], Number(m[2]), {}, Buffer.alloc(0));
    else this.raw = { method: m[1], id: Number(m[2]), need, parts: [] };
    return true;
  }

  private onLine(raw: Buffer): void {
    const text = raw.toString("utf8").trim();
    if (!text) return;
    if (this.rawHeader(text)) return;
    let msg: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(text);
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) return;
      msg = parsed as Record<string, unknown>;
    } catch {
      return; // not JSON: ignored, as every reference client does
    }
    if (typeof msg.id !== "number") {
      this.onNotification(msg);
      return;
    }
    const pending = this.pending.get(msg.id);
    if (!pending) return;
    this.pending.delete(msg.id);
    const err = msg.error as { code?: unknown; message?: unknown } | null | undefined;
    if (err && typeof err === "object") {
      pending.reject(new RPCError(Number(err.code ?? 0), String(err.message ?? "")));
      return;
    }
    pending.resolve((msg.result ?? null) as JSONValue);
  }

  private onNotification(msg: Record<string, unknown>): void {
    const method = typeof msg.method === "string" ? msg.method : "";
    const p = msg.params;
    const params = (p && typeof p === "object" && !Array.isArray(p) ? p : {}) as JSONObject;
    if (REQUEST_SCOPED.has(method)) {
      if (typeof params.id === "number") this.deliver(method, params.id, params);
      return;
    }
    if (method === "event") {
      this.onEvent(params);
    }
  }

  /** A request-scoped notification to the request it names, if still pending. */
  private deliver(method: string, id: number, params: JSONObject, data?: Buffer): void {
    if (!REQUEST_SCOPED.has(method)) return;
    const handler = this.pending.get(id)?.onNotification;
    if (handler) {
      try {
        handler(method, params, data);
      } catch {
        // a user's writer threw: the request itself goes on
      }
    }
  }

  private failAll(error: Error): void {
    const all = [...this.pending.values()];
    this.pending.clear();
    for (const p of all) p.reject(error);
  }

  /** Write one message line; resolves once the pipe has taken it (back-pressure). */
  private writeLine(msg: JSONObject): Promise<void> {
    if (this.exited || !this.child.stdin.writable) {
      return Promise.reject(new MatchlockError(`Matchlock process not running${this.why()}`));
    }
    const line = `${JSON.stringify(msg)}\n`;
    return new Promise((resolve) => {
      if (this.child.stdin.write(line)) {
        resolve();
      } else {
        this.child.stdin.once("drain", resolve);
        this.exitPromise.then(resolve, resolve);
      }
    });
  }

  /** A message with its own id that expects no reply (stdin/resize, like the
   * reference Python/TS SDKs). */
  async send(method: string, params: JSONObject): Promise<void> {
    await this.writeLine({ jsonrpc: "2.0", method, params, id: ++this.nextID });
  }

  request(
    method: string,
    params: JSONObject | undefined,
    options: RequestOptions = {},
    onNotification?: NotificationHandler,
  ): Promise<JSONValue> {
    if (this.exited) {
      return Promise.reject(new MatchlockError(`Matchlock process not running${this.why()}`));
    }
    const id = ++this.nextID;
    const msg: JSONObject = { jsonrpc: "2.0", method, id };
    if (params && Object.keys(params).length > 0) {
      msg.params = params;
    }
    const signal = options.signal;
    const timeoutMs = options.timeoutMs ?? 0;
    return new Promise<JSONValue>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const cleanup = (): void => {
        if (timer) clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
      };
      const giveUp = (error: unknown): void => {
        if (!this.pending.has(id)) return;
        this.pending.delete(id);
        cleanup();
        // The late final response is ignored (no pending entry any more).
        this.writeLine({ jsonrpc: "2.0", method: "cancel", params: { id }, id: ++this.nextID }).catch(() => {});
        reject(error);
      };
      const onAbort = (): void => {
        const reason: unknown = signal?.reason;
        giveUp(reason instanceof Error ? reason : new MatchlockError(`request ${method} was aborted`));
      };
      this.pending.set(id, {
        resolve: (v) => {
          cleanup();
          resolve(v);
        },
        reject: (e) => {
          cleanup();
          reject(e);
        },
        onNotification,
      });
      if (signal?.aborted) {
        // Nothing sent yet: no cancel needed.
        this.pending.delete(id);
        const reason: unknown = signal.reason;
        reject(reason instanceof Error ? reason : new MatchlockError(`request ${method} was aborted`));
        return;
      }
      signal?.addEventListener("abort", onAbort, { once: true });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          giveUp(new TimeoutError(`request ${method} (id=${id}) timed out after ${timeoutMs}ms`));
        }, timeoutMs);
      }
      this.writeLine(msg).catch((e: unknown) => {
        if (this.pending.delete(id)) {
          cleanup();
          reject(e);
        }
      });
    });
  }

  closeInput(): void {
    if (this.child.stdin.writable) {
      this.child.stdin.end();
    }
  }

  /** True if the process exited within `ms`. */
  async waitExit(ms: number): Promise<boolean> {
    if (this.exited) return true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), ms);
    });
    const done = await Promise.race([this.exitPromise.then(() => true), timeout]);
    if (timer) clearTimeout(timer);
    return done;
  }

  async kill(): Promise<void> {
    if (!this.exited) {
      this.child.kill("SIGKILL");
      await this.waitExit(5000);
    }
  }
}
