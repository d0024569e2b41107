/** The SDK-hosted Unix socket the server calls for network hook verdicts (spec §4.1):
 * one connection per call, one JSON line each way. */
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  MAX_HOOK_LINE,
  decodeHookRequest,
  encodeHookError,
  encodeHookResult,
  type LocalNetworkHook,
} from "./hooks.js";

/** The server writes its request right after connecting; a peer silent this long is
 * not the server. */
const REQUEST_READ_TIMEOUT_MS = 10_000;

export class HookServer {
  readonly path: string;
  private readonly dir: string;
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();

  private constructor(dir: string, server: Server) {
    this.dir = dir;
    this.path = join(dir, "hook.sock");
    this.server = server;
  }

  static async start(table: Map<string, LocalNetworkHook>): Promise<HookServer> {
    // mkdtemp makes the directory 0700: only this user (and root) can reach the socket.
    const dir = mkdtempSync(join(tmpdir(), "matchlock-network-hook-"));
    const hooks = new Map(table);
    let self: HookServer | undefined;
    const server = createServer((sock) => {
      self?.sockets.add(sock);
      sock.on("close", () => self?.sockets.delete(sock));
      serve(sock, hooks);
    });
    self = new HookServer(dir, server);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(self!.path, () => resolve());
      });
    } catch (e) {
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
    server.unref();
    return self;
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function serve(sock: Socket, table: Map<string, LocalNetworkHook>): void {
  let buf = Buffer.alloc(0);
  let answered = false;
  sock.setTimeout(REQUEST_READ_TIMEOUT_MS, () => sock.destroy());
  sock.on("error", () => {});
  const reply = (line: string): void => {
    if (answered) return;
    answered = true;
    sock.end(line);
  };
  sock.on("data", (chunk: Buffer) => {
    if (answered) return;
    buf = buf.length > 0 ? Buffer.concat([buf, chunk]) : chunk;
    const nl = buf.indexOf(0x0a);
    if (nl < 0) {
      if (buf.length > MAX_HOOK_LINE) {
        reply(encodeHookError(`network hook callback request longer than ${MAX_HOOK_LINE} bytes`));
      }
      return;
    }
    sock.setTimeout(0);
    const decoded = decodeHookRequest(buf.subarray(0, nl).toString("utf8"), table);
    if (typeof decoded === "string") {
      reply(decoded);
      return;
    }
    const [hook, request] = decoded;
    Promise.resolve()
      .then(() => hook.fn(request))
      .then(
        (result) => reply(encodeHookResult(result)),
        (err: unknown) => reply(encodeHookError(err instanceof Error ? err.message || err.name : String(err))),
      )
      .catch((err: unknown) => reply(encodeHookError(String(err))));
  });
}
