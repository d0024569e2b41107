/** A scripted stand-in for `matchlock rpc`: a tiny executable that pipes its stdio to
 * a Unix socket owned by the test, so each test sees every line the SDK writes and
 * answers as it likes. */
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export type Msg = Record<string, any>;

const SCRIPT = `
const net = require("node:net");
const fs = require("node:fs");
const sock = net.connect(process.env.FAKE_CTL);
sock.write(JSON.stringify({ argv: process.argv.slice(2) }) + "\\n");
process.stdin.pipe(sock, { end: false });
process.stdin.on("end", () => sock.write(JSON.stringify({ eof: true }) + "\\n"));
sock.pipe(process.stdout);
sock.on("close", () => process.exit(Number(process.env.FAKE_EXIT || 0)));
sock.on("error", () => process.exit(3));
`;

export class FakeServer {
  readonly dir: string;
  readonly bin: string;
  readonly ctl: string;
  private server: Server;
  private sock: Socket | undefined;
  private buf = "";
  private queue: Msg[] = [];
  private waiters: ((m: Msg) => void)[] = [];
  private connected: Promise<void>;
  /** Every message received, in order (including the argv hello and eof marker). */
  readonly log: Msg[] = [];

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "ml-fake-"));
    this.bin = join(this.dir, "matchlock");
    this.ctl = join(this.dir, "ctl.sock");
    writeFileSync(this.bin, `#!${process.execPath}\n${SCRIPT}`);
    chmodSync(this.bin, 0o755);
    process.env.FAKE_CTL = this.ctl;
    let onConnect: () => void = () => {};
    this.connected = new Promise((r) => (onConnect = r));
    this.server = createServer((s) => {
      this.sock = s;
      s.on("data", (d: Buffer) => this.onData(d.toString("utf8")));
      s.on("error", () => {});
      onConnect();
    });
  }

  async listen(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(this.ctl, () => r()));
    return this;
  }

  private onData(text: string): void {
    this.buf += text;
    let nl: number;
    while ((nl = this.buf.indexOf("\n")) >= 0) {
      const line = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      if (!line.trim()) continue;
      const msg = JSON.parse(line) as Msg;
      this.log.push(msg);
      const w = this.waiters.shift();
      if (w) w(msg);
      else this.queue.push(msg);
    }
  }

  /** The next message from the SDK (after the argv hello). */
  next(timeoutMs = 5000): Promise<Msg> {
    const q = this.queue.shift();
    if (q) return Promise.resolve(q);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error("fake: no message from the SDK")), timeoutMs);
      this.waiters.push((m) => {
        clearTimeout(t);
        resolve(m);
      });
    });
  }

  /** Next message whose method is `method` (others are kept in order in `skipped`). */
  async expect(method: string): Promise<Msg> {
    for (;;) {
      const m = await this.next();
      if (m.method === method) return m;
      if (m.argv || m.eof) continue;
      throw new Error(`fake: expected ${method}, got ${JSON.stringify(m)}`);
    }
  }

  async hello(): Promise<Msg> {
    await this.connected;
    const m = await this.next();
    if (!m.argv) throw new Error(`fake: expected argv hello, got ${JSON.stringify(m)}`);
    return m;
  }

  send(obj: Msg | string | Buffer): void {
    this.sock?.write(typeof obj === "string" || Buffer.isBuffer(obj) ? obj : `${JSON.stringify(obj)}\n`);
  }

  result(id: number, result: Msg): void {
    this.send({ jsonrpc: "2.0", result, id });
  }

  error(id: number, code: number, message: string): void {
    this.send({ jsonrpc: "2.0", error: { code, message }, id });
  }

  notify(method: string, params: Msg): void {
    this.send({ jsonrpc: "2.0", method, params });
  }

  /** Ends the fake process (its stdout closes). */
  hangUp(): void {
    this.sock?.destroy();
  }

  async stop(): Promise<void> {
    this.sock?.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export const b64 = (s: string | Buffer): string => Buffer.from(s).toString("base64");
