/** `Client`: one `matchlock rpc` process, at most one VM (spec §1.8, §6). */
import { execFile } from "node:child_process";
import { cloneCreateOptions, type Sandbox } from "./builder.js";
import { MatchlockError } from "./errors.js";
import { HookServer } from "./hookserver.js";
import {
  compileNetworkHooks,
  compileVFSHooks,
  emptyVFSHooks,
  hookMatches,
  parseFileEvent,
  type LocalVFSHook,
  type LocalVFSHooks,
} from "./hooks.js";
import { Connection, type NotificationHandler } from "./transport.js";
import {
  VFS_HOOK_ACTION_ALLOW,
  VFS_HOOK_ACTION_BLOCK,
  type AllowListResult,
  type BinaryLike,
  type Config,
  type CreateOptions,
  type ExecInteractiveOptions,
  type ExecInteractiveResult,
  type ExecOptions,
  type ExecPipeOptions,
  type ExecPipeResult,
  type ExecResult,
  type ExecStreamOptions,
  type ExecStreamResult,
  type FileInfo,
  type LogStreamOptions,
  type PortForward,
  type PortForwardBinding,
  type RequestOptions,
  type StreamReader,
  type StreamWriter,
  type TTYSize,
  type VFSHookEvent,
  type VolumeInfo,
} from "./types.js";
import {
  b64decode,
  createParams,
  execParams,
  normalizeHosts,
  parseAllowList,
  parseBindings,
  parseContent,
  parseCreate,
  parseExec,
  parseExit,
  parseFiles,
  parsePortForward,
  parseVolumeCreate,
  parseVolumeList,
  portForwardParams,
  rawOutput,
  toBuffer,
  ttyParams,
  validateCreate,
  volumeName,
  type JSONObject,
} from "./wire.js";

/** stdin chunks stay far below the server's 10 MiB line limit after base64. */
const STDIN_CHUNK = 256 * 1024;

export function defaultConfig(config: Config = {}): Required<Config> {
  return {
    binaryPath: config.binaryPath ?? process.env.MATCHLOCK_BIN ?? "matchlock",
    useSudo: config.useSudo ?? false,
  };
}

function owner(): { uid: number; gid: number } {
  return {
    uid: typeof process.geteuid === "function" ? process.geteuid() : 0,
    gid: typeof process.getegid === "function" ? process.getegid() : 0,
  };
}

/** Writes chunks to a writer in order; `done()` waits for async writers. */
class Sink {
  private chain: Promise<void> = Promise.resolve();
  constructor(private readonly writer: StreamWriter | undefined) {}

  write(chunk: Buffer): void {
    const w = this.writer;
    if (!w || chunk.length === 0) return;
    if (typeof w === "function") {
      this.chain = this.chain.then(() => w(chunk)).catch(() => {});
    } else {
      w.write(chunk);
    }
  }

  done(): Promise<void> {
    return this.chain;
  }
}

/** A one-shot latch carrying the request id from `*.ready`, or undefined when the
 * request ended first. */
function latch(): { promise: Promise<number | undefined>; set: (v: number | undefined) => void } {
  let set: (v: number | undefined) => void = () => {};
  const promise = new Promise<number | undefined>((resolve) => {
    set = resolve;
  });
  return { promise, set };
}

function isBinary(x: unknown): x is BinaryLike {
  return typeof x === "string" || x instanceof Uint8Array || x instanceof ArrayBuffer;
}

async function* chunksOf(stdin: StreamReader): AsyncGenerator<Buffer> {
  if (isBinary(stdin)) {
    yield toBuffer(stdin); // a string or buffer is one input, not an iterable of chars
    return;
  }
  for await (const item of stdin as AsyncIterable<BinaryLike>) {
    const buf = toBuffer(typeof item === "string" || isBinary(item) ? item : Buffer.from(item as never));
    for (let i = 0; i < buf.length; i += STDIN_CHUNK) {
      yield buf.subarray(i, i + STDIN_CHUNK);
    }
  }
}

export class Client {
  private readonly config: Required<Config>;
  private conn: Connection | undefined;
  private starting: Promise<Connection> | undefined;
  private vmIDValue = "";
  private lastVMID = "";
  private closed = false;
  private closing: Promise<void> | undefined;
  private hookServer: HookServer | undefined;
  private vfsHooks: LocalVFSHooks = emptyVFSHooks();
  private safeHooksRunning = false;

  constructor(config: Config = {}) {
    this.config = defaultConfig(config);
  }

  get vmId(): string {
    return this.vmIDValue;
  }

  /** Starts `matchlock rpc` (requests also start it lazily). */
  async start(): Promise<void> {
    await this.connection();
  }

  private async connection(): Promise<Connection> {
    if (this.closed || this.closing) {
      throw new MatchlockError("client is closed");
    }
    if (this.conn?.running) {
      return this.conn;
    }
    if (!this.starting) {
      const { binaryPath, useSudo } = this.config;
      this.starting = Connection.start({
        command: useSudo ? "sudo" : binaryPath,
        args: useSudo ? [binaryPath, "rpc"] : ["rpc"],
        describe: binaryPath,
        detached: !useSudo,
      }).then(
        (conn) => {
          conn.onEvent = (params) => this.onEvent(params);
          conn.onExit = () => {
            void this.stopHookServer();
          };
          this.conn = conn;
          this.starting = undefined;
          return conn;
        },
        (err: unknown) => {
          this.starting = undefined;
          throw err;
        },
      );
    }
    return this.starting;
  }

  private async request(
    method: string,
    params?: JSONObject,
    options: RequestOptions = {},
    onNotification?: NotificationHandler,
  ) {
    const conn = await this.connection();
    return conn.request(method, params, options, onNotification);
  }

  /** Sends `close` (the server stops the VM within `timeoutSeconds`, default 2), then
   * ends the process. Errors are swallowed: close always leaves the client closed. */
  async close(timeoutSeconds = 0): Promise<void> {
    if (this.closed) return;
    if (this.closing) return this.closing;
    this.closing = (async () => {
      this.lastVMID = this.vmIDValue || this.lastVMID;
      this.vfsHooks = emptyVFSHooks();
      const t = timeoutSeconds > 0 ? timeoutSeconds : 2;
      try {
        const conn = this.conn ?? (await this.starting?.catch(() => undefined));
        if (conn?.running) {
          try {
            await conn.request("close", { timeout_seconds: t }, { timeoutMs: (t + 5) * 1000 });
          } catch {
            // best effort: the process is ended below either way
          }
          conn.closeInput();
          if (!(await conn.waitExit(t * 1000))) {
            await conn.kill();
          }
        }
      } finally {
        await this.stopHookServer();
        this.closed = true;
        this.closing = undefined;
      }
    })();
    return this.closing;
  }

  private async stopHookServer(): Promise<void> {
    const hs = this.hookServer;
    this.hookServer = undefined;
    await hs?.close().catch(() => {});
  }

  private runCLI(args: string[]): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile(this.config.binaryPath, args, { encoding: "utf8", maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
        if (err) {
          const detail = String(stderr || "").trim().split("\n").pop() || err.message;
          reject(new MatchlockError(`matchlock ${args.join(" ")}: ${detail}`));
          return;
        }
        resolve(String(stdout));
      });
    });
  }

  /** `matchlock rm <vm>` for the current (or last closed) VM. */
  async remove(): Promise<void> {
    const id = this.vmIDValue || this.lastVMID;
    if (!id) return;
    await this.runCLI(["rm", id]);
  }

  async volumeCreate(name: string, sizeMb = 10240): Promise<VolumeInfo> {
    const n = volumeName(name);
    if (!Number.isFinite(sizeMb) || sizeMb <= 0) {
      throw new MatchlockError("volume size must be > 0");
    }
    const out = await this.runCLI(["volume", "create", n, "--size", String(sizeMb), "--json"]);
    return parseVolumeCreate(out, n, sizeMb);
  }

  async volumeList(): Promise<VolumeInfo[]> {
    return parseVolumeList(await this.runCLI(["volume", "ls", "--json"]));
  }

  async volumeRemove(name: string): Promise<void> {
    await this.runCLI(["volume", "rm", volumeName(name)]);
  }

  /** `create` with the image's entrypoint started (detached) in the VM. */
  async launch(sandbox: Sandbox): Promise<string> {
    const opts = sandbox.options();
    opts.launchEntrypoint = true;
    return this.create(opts);
  }

  async create(opts: CreateOptions = {}): Promise<string> {
    const o = cloneCreateOptions(opts);
    validateCreate(o);
    const [wireVFS, localVFS] = compileVFSHooks(o.vfsInterception);
    let [wireNet, table] = compileNetworkHooks(o.networkInterception);
    const conn = await this.connection();
    await this.stopHookServer();
    if (table.size > 0) {
      this.hookServer = await HookServer.start(table);
      wireNet = { ...(wireNet ?? {}), callback_socket: this.hookServer.path };
    }
    let id: string;
    try {
      id = parseCreate(await conn.request("create", createParams(o, wireNet, wireVFS)));
    } catch (e) {
      await this.stopHookServer();
      throw e;
    }
    this.vmIDValue = id;
    this.vfsHooks = localVFS;
    if ((o.portForwards ?? []).length > 0) {
      await this.portForwardMappings(o.portForwardAddresses, o.portForwards ?? []);
    }
    return id;
  }

  // exec family

  async exec(command: string, options: ExecOptions = {}): Promise<ExecResult> {
    const params = execParams(command, options.workingDir ?? "", options.user ?? "");
    return parseExec(await this.request("exec", params, options));
  }

  async execWithDir(command: string, workingDir = "", options: RequestOptions = {}): Promise<ExecResult> {
    return this.exec(command, { ...options, workingDir });
  }

  async execStream(command: string, options: ExecStreamOptions = {}): Promise<ExecStreamResult> {
    const out = new Sink(options.stdout);
    const err = new Sink(options.stderr);
    const params = rawOutput(execParams(command, options.workingDir ?? "", options.user ?? ""));
    const result = await this.request("exec_stream", params, options, (method, p, raw) => {
      const data = raw ?? b64decode(p.data, `${method} data`);
      (method === "exec_stream.stderr" ? err : out).write(data);
    });
    await Promise.all([out.done(), err.done()]);
    return parseExit(result, "exec_stream");
  }

  async execStreamWithDir(
    command: string,
    workingDir = "",
    stdout?: StreamWriter,
    stderr?: StreamWriter,
    options: RequestOptions = {},
  ): Promise<ExecStreamResult> {
    return this.execStream(command, { ...options, workingDir, stdout, stderr });
  }

  /** stdin from `options.stdin` (a stream, iterable of chunks, string or buffer),
   * sent after `exec_pipe.ready`; EOF follows at its end (at once without stdin). */
  async execPipe(command: string, options: ExecPipeOptions = {}): Promise<ExecPipeResult> {
    const params = execParams(command, options.workingDir ?? "", options.user ?? "");
    return this.runWithInput("exec_pipe", params, options, options.stdin, options.stdout, options.stderr);
  }

  /** @deprecated Use execPipe with ExecPipeOptions. */
  async execPipeWithDir(
    command: string,
    workingDir = "",
    stdin?: StreamReader,
    stdout?: StreamWriter,
    stderr?: StreamWriter,
    options: RequestOptions = {},
  ): Promise<ExecPipeResult> {
    return this.execPipe(command, { ...options, workingDir, stdin, stdout, stderr });
  }

  /** A PTY: stdout and stderr arrive merged on `stdout`; `resize` yields [rows, cols]. */
  async execInteractive(command: string, options: ExecInteractiveOptions = {}): Promise<ExecInteractiveResult> {
    const params = ttyParams(
      command,
      options.workingDir ?? "",
      options.user ?? "",
      options.rows ?? 24,
      options.cols ?? 80,
    );
    return this.runWithInput("exec_tty", params, options, options.stdin, options.stdout, undefined, options.resize);
  }

  private async runWithInput(
    method: "exec_pipe" | "exec_tty",
    params: JSONObject,
    options: RequestOptions,
    stdin: StreamReader | undefined,
    stdout: StreamWriter | undefined,
    stderr: StreamWriter | undefined,
    resize?: AsyncIterable<TTYSize> | Iterable<TTYSize>,
  ): Promise<{ exitCode: number; durationMs: number }> {
    const conn = await this.connection();
    const out = new Sink(stdout);
    const err = new Sink(stderr);
    const ready = latch();
    let finished = false;
    const pumps: Promise<void>[] = [];
    const onNote: NotificationHandler = (m, p, raw) => {
      if (m === `${method}.ready`) {
        if (typeof p.id === "number") ready.set(p.id);
        return;
      }
      const data = raw ?? b64decode(p.data, `${m} data`);
      (m === "exec_pipe.stderr" ? err : out).write(data);
    };
    const pumpInput = async (): Promise<void> => {
      const id = await ready.promise;
      if (id === undefined) return;
      try {
        if (stdin !== undefined && stdin !== null) {
          for await (const chunk of chunksOf(stdin)) {
            if (finished) return;
            if (chunk.length > 0) {
              await conn.send(`${method}.stdin`, { id, data: chunk.toString("base64") });
            }
          }
        }
      } catch {
        // a failing stdin source ends the input, as EOF
      }
      if (!finished) await conn.send(`${method}.stdin_eof`, { id }).catch(() => {});
    };
    const pumpResize = async (): Promise<void> => {
      const id = await ready.promise;
      if (id === undefined || !resize) return;
      for await (const size of resize as AsyncIterable<TTYSize>) {
        if (finished) return;
        if (!Array.isArray(size) || size.length < 2) continue;
        const rows = Math.trunc(Number(size[0]));
        const cols = Math.trunc(Number(size[1]));
        if (!(rows > 0 && cols > 0 && rows <= 65535 && cols <= 65535)) continue;
        await conn.send("exec_tty.resize", { id, rows, cols }).catch(() => {});
      }
    };
    pumps.push(pumpInput().catch(() => {}));
    if (resize) pumps.push(pumpResize().catch(() => {}));
    try {
      const result = await conn.request(method, rawOutput(params), options, onNote);
      await Promise.all([out.done(), err.done()]);
      return parseExit(result, method);
    } finally {
      finished = true;
      ready.set(undefined);
      // Pumps blocked on a slow source are not awaited: the request is over.
      void Promise.all(pumps);
    }
  }

  // logs

  async log(options: RequestOptions = {}): Promise<string> {
    return parseContent(await this.request("log", undefined, options), "log").toString("utf8");
  }

  /** Follows the VM log into `options.stdout` until aborted (or the session ends). */
  async logStream(options: LogStreamOptions = {}): Promise<void> {
    const out = new Sink(options.stdout);
    await this.request("log_stream", undefined, options, (m, p) => {
      out.write(b64decode(p.data, "log_stream data"));
    });
    await out.done();
  }

  // files

  async writeFile(path: string, content: BinaryLike, options: RequestOptions = {}): Promise<void> {
    await this.writeFileMode(path, content, 0o644, options);
  }

  async writeFileMode(path: string, content: BinaryLike, mode: number, options: RequestOptions = {}): Promise<void> {
    let data = toBuffer(content);
    await this.applyActionHooks("write", path, data.length, mode);
    data = await this.applyMutateHooks(path, data, mode);
    await this.request("write_file", { path, content: data.toString("base64"), mode }, options);
  }

  async readFile(path: string, options: RequestOptions = {}): Promise<Buffer> {
    await this.applyActionHooks("read", path, 0, 0);
    return parseContent(await this.request("read_file", { path }, options), "read_file");
  }

  async listFiles(path: string, options: RequestOptions = {}): Promise<FileInfo[]> {
    await this.applyActionHooks("readdir", path, 0, 0);
    return parseFiles(await this.request("list_files", { path }, options));
  }

  // allow-list

  async allowListAdd(hosts: string | string[], options: RequestOptions = {}): Promise<AllowListResult> {
    const list = normalizeHosts(hosts);
    return parseAllowList(await this.request("allow_list_add", { hosts: list }, options), "added");
  }

  async allowListDelete(hosts: string | string[], options: RequestOptions = {}): Promise<AllowListResult> {
    const list = normalizeHosts(hosts);
    return parseAllowList(await this.request("allow_list_delete", { hosts: list }, options), "removed");
  }

  // port forwarding

  /** Specs `"[LOCAL:]REMOTE"`, on 127.0.0.1; replaces the previous forwards. */
  async portForward(...specs: string[]): Promise<PortForwardBinding[]> {
    return this.portForwardWithAddresses(undefined, ...specs);
  }

  async portForwardWithAddresses(addresses: string[] | undefined, ...specs: string[]): Promise<PortForwardBinding[]> {
    return this.portForwardMappings(addresses, specs.map(parsePortForward));
  }

  private async portForwardMappings(addresses: string[] | undefined, forwards: PortForward[]): Promise<PortForwardBinding[]> {
    if (forwards.length === 0) return [];
    return parseBindings(await this.request("port_forward", portForwardParams(addresses, forwards)));
  }

  // VFS hooks

  private async applyActionHooks(op: string, path: string, size: number, mode: number): Promise<void> {
    for (const hook of this.vfsHooks.action) {
      if (!hookMatches(hook, op, path)) continue;
      const decision = String((await hook.fn({ op, path, size, mode, ...owner() })) ?? "").trim().toLowerCase();
      if (decision === "" || decision === VFS_HOOK_ACTION_ALLOW) continue;
      if (decision === VFS_HOOK_ACTION_BLOCK) {
        throw new MatchlockError(
          `vfs action hook blocked operation: op=${op} path=${path} hook=${JSON.stringify(hook.name)}`,
        );
      }
      throw new MatchlockError(
        `invalid action_hook return value for ${JSON.stringify(hook.name)}: expected "allow"|"block", got ${JSON.stringify(decision)}`,
      );
    }
  }

  private async applyMutateHooks(path: string, data: Buffer, mode: number): Promise<Buffer> {
    let current = data;
    for (const hook of this.vfsHooks.mutate) {
      if (!hookMatches(hook, "write", path)) continue;
      const out = await hook.fn({ path, size: current.length, mode, ...owner() });
      if (out === null || out === undefined) continue;
      if (!isBinary(out)) {
        throw new MatchlockError(
          `invalid mutate_hook return type for ${JSON.stringify(hook.name)}: expected bytes|string|undefined`,
        );
      }
      current = toBuffer(out);
    }
    return current;
  }

  private onEvent(params: JSONObject): void {
    const event = parseFileEvent(params);
    if (!event) return;
    const { safe, dangerous } = this.vfsHooks;
    for (const hook of dangerous) {
      if (hookMatches(hook, event.op, event.path)) {
        void runHook(hook, () => hook.fn(this, event));
      }
    }
    const matching = safe.filter((h) => hookMatches(h, event.op, event.path));
    // Events that arrive while safe hooks run are dropped: a safe hook's own file
    // activity must not re-trigger it (recursion suppression, as the reference).
    if (matching.length === 0 || this.safeHooksRunning) return;
    this.safeHooksRunning = true;
    void (async () => {
      try {
        for (const hook of matching) {
          await runHook(hook, () => hook.fn(event));
        }
      } finally {
        this.safeHooksRunning = false;
      }
    })();
  }
}

async function runHook(hook: LocalVFSHook<unknown>, call: () => void | Promise<void>): Promise<void> {
  try {
    const run = Promise.resolve().then(call);
    if (hook.timeoutMs > 0) {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        run,
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, hook.timeoutMs);
          timer.unref();
        }),
      ]);
      if (timer) clearTimeout(timer);
    } else {
      await run;
    }
  } catch {
    // hooks are best effort: an exception must not break the client
  }
}

export type { VFSHookEvent };
