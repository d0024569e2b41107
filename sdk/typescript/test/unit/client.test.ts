/** Client against a scripted fake server: exact wire shapes, ids, notifications,
 * cancellation, timeouts, failures. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { Client, MatchlockError, RPCError, Sandbox, TimeoutError, defaultConfig } from "../../src/index.js";
import { FakeServer, b64, type Msg } from "./fake.js";

async function setup(): Promise<{ fake: FakeServer; client: Client }> {
  const fake = await new FakeServer().listen();
  const client = new Client({ binaryPath: fake.bin });
  return { fake, client };
}

async function started(): Promise<{ fake: FakeServer; client: Client }> {
  const s = await setup();
  await s.client.start();
  await s.fake.hello();
  return s;
}

async function createVM(fake: FakeServer, client: Client, sandbox = new Sandbox("img")): Promise<Msg> {
  const p = client.create(sandbox.options());
  const m = await fake.expect("create");
  fake.result(m.id, { id: "vm-abc12345" });
  assert.equal(await p, "vm-abc12345");
  return m;
}

async function finish(fake: FakeServer, client: Client): Promise<void> {
  const p = client.close();
  const m = await fake.expect("close");
  assert.deepEqual(m.params, { timeout_seconds: 2 });
  fake.result(m.id, {});
  for (;;) {
    const x = await fake.next();
    if (x.eof) break;
  }
  fake.hangUp();
  await p;
  await fake.stop();
}

test("starts `<binary> rpc` and numbers requests from 1", async () => {
  const { fake, client } = await setup();
  const p = client.exec("echo hi"); // lazily starts the process
  const hello = await fake.hello();
  assert.deepEqual(hello.argv, ["rpc"]);
  const m = await fake.expect("exec");
  assert.deepEqual(m, { jsonrpc: "2.0", method: "exec", id: 1, params: { command: "echo hi" } });
  fake.result(1, { exit_code: 3, stdout: b64("hi\n"), stderr: b64("warn"), duration_ms: 7 });
  const r = await p;
  assert.equal(r.exitCode, 3);
  assert.equal(r.stdout, "hi\n");
  assert.equal(r.stderr, "warn");
  assert.equal(r.durationMs, 7);
  await finish(fake, client);
});

test("defaultConfig: MATCHLOCK_BIN only when binaryPath is not given", () => {
  const old = process.env.MATCHLOCK_BIN;
  try {
    process.env.MATCHLOCK_BIN = "/opt/ml";
    assert.deepEqual(defaultConfig(), { binaryPath: "/opt/ml", useSudo: false });
    assert.equal(defaultConfig({ binaryPath: "x" }).binaryPath, "x");
    delete process.env.MATCHLOCK_BIN;
    assert.equal(defaultConfig().binaryPath, "matchlock");
    assert.equal(defaultConfig({ useSudo: true }).useSudo, true);
  } finally {
    if (old === undefined) delete process.env.MATCHLOCK_BIN;
    else process.env.MATCHLOCK_BIN = old;
  }
});

test("a missing binary is one clear MatchlockError", async () => {
  const client = new Client({ binaryPath: "/nonexistent/matchlock" });
  await assert.rejects(client.exec("true"), (e: unknown) => {
    assert.ok(e instanceof MatchlockError);
    assert.match((e as Error).message, /matchlock binary not found: "\/nonexistent\/matchlock" \(set MATCHLOCK_BIN/);
    return true;
  });
  await client.close();
});

test("create sends the reference's exact params, then port_forward", async () => {
  const { fake, client } = await started();
  const sb = new Sandbox("alpine:latest")
    .withCPUs(2)
    .withMemory(1024)
    .allowHost("api.test", "*.example.com")
    .addHost("api.test", "10.0.0.5")
    .addSecret("API_KEY", "sk-real", "api.test")
    .addSecretWithPlaceholder("TOKEN", "t", "PH_1")
    .withDNSServers("1.1.1.1")
    .withHostname("box")
    .withNetworkMTU(1400)
    .withEnv("A", "1")
    .withEnvMap({ B: "2" })
    .withUser("app")
    .withEntrypoint("sh", "-c")
    .withImageConfig({ workingDir: "/srv", cmd: ["echo hi"], env: { X: "y" } })
    .withPortForward(18080, 8080)
    .withPortForwardAddresses("127.0.0.1", "::1")
    .withKernel("file:///k");
  const p = client.launch(sb);
  const m = await fake.expect("create");
  assert.deepEqual(m.params, {
    image: "alpine:latest",
    resources: { cpus: 2, memory_mb: 1024, disk_size_mb: 5120, timeout_seconds: 300 },
    kernel: { ref: "file:///k" },
    network: {
      allowed_hosts: ["api.test", "*.example.com"],
      block_private_ips: true,
      add_hosts: [{ host: "api.test", ip: "10.0.0.5" }],
      secrets: {
        API_KEY: { value: "sk-real", hosts: ["api.test"] },
        TOKEN: { value: "t", hosts: [], placeholder: "PH_1" },
      },
      dns_servers: ["1.1.1.1"],
      hostname: "box",
      mtu: 1400,
    },
    env: { A: "1", B: "2" },
    image_config: { user: "app", working_dir: "/srv", entrypoint: ["sh", "-c"], cmd: ["echo hi"], env: { X: "y" } },
    launch_entrypoint: true,
  });
  fake.result(m.id, { id: "vm-1" });
  const pf = await fake.expect("port_forward");
  assert.deepEqual(pf.params, {
    forwards: [{ local_port: 18080, remote_port: 8080 }],
    addresses: ["127.0.0.1", "::1"],
  });
  fake.result(pf.id, { bindings: [{ address: "127.0.0.1", local_port: 18080, remote_port: 8080 }] });
  assert.equal(await p, "vm-1");
  assert.equal(client.vmId, "vm-1");
  await finish(fake, client);
});

test("create: minimal params, no network object, and the network branches", async () => {
  const { fake, client } = await started();
  const cases: [Sandbox, Msg][] = [
    [new Sandbox("img"), { image: "img", resources: { cpus: 1, memory_mb: 512, disk_size_mb: 5120, timeout_seconds: 300 } }],
    [new Sandbox("img").allowPrivateIPs(), { allowed_hosts: [], block_private_ips: false }],
    [new Sandbox("img").blockPrivateIPs().unsetBlockPrivateIPs(), {}],
    [new Sandbox("img").withNoNetwork().withHostname("h").addHost("a", "1.2.3.4"), { no_network: true, add_hosts: [{ host: "a", ip: "1.2.3.4" }], hostname: "h" }],
    [new Sandbox("img").withNetworkInterception(), { allowed_hosts: [], block_private_ips: true, intercept: true }],
    [new Sandbox("img").allowPrivate(" 198.18.0.2", "10.1.0.0/16", "fd00::/8", "198.18.0.2"),
      { allowed_hosts: [], block_private_ips: true, allow_private: ["198.18.0.2", "10.1.0.0/16", "fd00::/8"] }],
  ];
  for (const [sb, want] of cases) {
    const p = client.create(sb.options());
    const m = await fake.expect("create");
    if ("image" in want) assert.deepEqual(m.params, want);
    else if (Object.keys(want).length === 0) assert.equal(m.params.network, undefined);
    else assert.deepEqual(m.params.network, want);
    fake.result(m.id, { id: "vm-x" });
    await p;
  }
  await finish(fake, client);
});

test("create: bad options fail before anything is sent", async () => {
  const { fake, client } = await started();
  const bad: [CreateArg, RegExp][] = [
    [{}, /image is required \(e\.g\., alpine:latest\)/],
    [{ image: "i", networkMtu: -1 }, /network mtu must be > 0/],
    [new Sandbox("i").withNoNetwork().allowHost("x").options(), /no network cannot be combined/],
    [new Sandbox("i").withNoNetwork().withNetworkInterception().options(), /no network cannot be combined/],
    [new Sandbox("i").addHost("a b", "1.2.3.4").options(), /invalid add-host mapping: invalid host/],
    [new Sandbox("i").addHost("h", "999.1.1.1").options(), /invalid add-host mapping: invalid ip/],
    [new Sandbox("i").allowPrivate("10.0.0.300").options(), /invalid allowPrivate entry "10\.0\.0\.300": expected an IP address or CIDR/],
    [new Sandbox("i").allowPrivate("10.0.0.0/33").options(), /invalid allowPrivate entry/],
    [new Sandbox("i").allowPrivate("10.0.0.0/8/1").options(), /invalid allowPrivate entry/],
    [new Sandbox("i").allowPrivate("example.test").options(), /invalid allowPrivate entry/],
    [new Sandbox("i").withNoNetwork().allowPrivate("10.0.0.1").options(), /no network cannot be combined with allowPrivate/],
    [{ image: "i", vfsInterception: { rules: [{ hook: () => {}, dangerousHook: () => {} , phase: "after" }] } }, /more than one callback/],
    [{ image: "i", vfsInterception: { rules: [{ hook: () => {} }] } }, /must use phase=after/],
    [{ image: "i", vfsInterception: { rules: [{ actionHook: () => "allow", phase: "after" }] } }, /must use phase=before/],
    [{ image: "i", networkInterception: { rules: [{ action: "block", hook: () => null }] } }, /callback hooks cannot set action="block"/],
  ];
  for (const [opts, re] of bad) {
    await assert.rejects(client.create(opts), (e: unknown) => e instanceof MatchlockError && re.test((e as Error).message));
  }
  // The next request gets id 1: nothing was sent for the bad ones.
  const p = client.exec("true");
  const m = await fake.expect("exec");
  assert.equal(m.id, 1);
  fake.result(m.id, { exit_code: 0, stdout: "", stderr: "", duration_ms: 0 });
  await p;
  await finish(fake, client);
});
type CreateArg = Parameters<Client["create"]>[0];

test("output is byte-exact: binary bytes and UTF-8 split across chunks", async () => {
  const { fake, client } = await started();
  const bytes = Buffer.from([0, 255, 0xe2, 0x82, 0xac, 10, 128]);
  const p = client.exec("x");
  const m = await fake.expect("exec");
  // One response line, written in two pieces that split a multi-byte character.
  const line = Buffer.from(`${JSON.stringify({ jsonrpc: "2.0", result: { exit_code: 0, stdout: bytes.toString("base64"), stderr: "", duration_ms: 1, note: "€" }, id: m.id })}\n`);
  const cut = line.indexOf(Buffer.from("€")) + 1;
  fake.send(line.subarray(0, cut));
  const r = await Promise.race([p, new Promise((r) => setTimeout(() => r("pending"), 200))]);
  assert.equal(r, "pending", "no response before the newline");
  fake.send(line.subarray(cut));
  const res = await p;
  assert.deepEqual(res.stdoutBytes, bytes);
  await finish(fake, client);
});

test("responses out of order go to their own requests", async () => {
  const { fake, client } = await started();
  const a = client.exec("a");
  const b = client.exec("b");
  const ma = await fake.expect("exec");
  const mb = await fake.expect("exec");
  fake.send("not json at all\n");
  fake.result(mb.id, { exit_code: 2, stdout: b64("B"), stderr: "", duration_ms: 0 });
  fake.result(999, { exit_code: 9, stdout: "", stderr: "", duration_ms: 0 }); // unknown id: ignored
  fake.result(ma.id, { exit_code: 1, stdout: b64("A"), stderr: "", duration_ms: 0 });
  assert.equal((await a).stdout, "A");
  assert.equal((await b).stdout, "B");
  await finish(fake, client);
});

test("RPC errors keep code and message", async () => {
  const { fake, client } = await started();
  const p = client.readFile("/nope");
  const m = await fake.expect("read_file");
  assert.deepEqual(m.params, { path: "/nope" });
  fake.error(m.id, -32002, "guest file operation: open /nope: no such file or directory");
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof RPCError && e instanceof MatchlockError);
    assert.equal(e.code, RPCError.FILE_FAILED);
    assert.equal(e.rpcMessage, "guest file operation: open /nope: no such file or directory");
    assert.equal(e.message, "[-32002] guest file operation: open /nope: no such file or directory");
    assert.ok(e.isFileError() && !e.isVMError() && !e.isExecError());
    return true;
  });
  await finish(fake, client);
});

test("timeoutMs sends cancel for the request and rejects with TimeoutError", async () => {
  const { fake, client } = await started();
  const p = client.exec("sleep 100", { timeoutMs: 50 });
  const rejected = assert.rejects(p, (e: unknown) => e instanceof TimeoutError && /request exec \(id=1\) timed out after 50ms/.test((e as Error).message));
  const m = await fake.expect("exec");
  const c = await fake.expect("cancel");
  assert.deepEqual(c.params, { id: m.id });
  assert.ok(c.id > m.id);
  await rejected;
  fake.result(c.id, { cancelled: true });
  fake.error(m.id, -32003, "context canceled"); // the late final response is ignored
  const q = client.exec("true");
  const m2 = await fake.expect("exec");
  fake.result(m2.id, { exit_code: 0, stdout: "", stderr: "", duration_ms: 0 });
  assert.equal((await q).exitCode, 0);
  await finish(fake, client);
});

test("AbortSignal cancels: cancel on the wire, rejection with the reason", async () => {
  const { fake, client } = await started();
  const ac = new AbortController();
  const p = client.execStream("sleep 100", { signal: ac.signal });
  const m = await fake.expect("exec_stream");
  const reason = new Error("stop it");
  const rejected = assert.rejects(p, (e: unknown) => e === reason);
  ac.abort(reason);
  const c = await fake.expect("cancel");
  assert.deepEqual(c.params, { id: m.id });
  await rejected;
  // Already-aborted signal: nothing is sent at all.
  await assert.rejects(client.exec("x", { signal: AbortSignal.abort() }), /aborted|AbortError/i);
  const q = client.exec("y");
  const m2 = await fake.expect("exec");
  assert.equal(m2.params.command, "y");
  fake.result(m2.id, { exit_code: 0, stdout: "", stderr: "", duration_ms: 0 });
  await q;
  await finish(fake, client);
});

test("execStream delivers chunks in order to streams and functions", async () => {
  const { fake, client } = await started();
  const out: Buffer[] = [];
  const err: string[] = [];
  const p = client.execStream("x", {
    workingDir: "/tmp",
    user: "1000",
    stdout: async (c) => {
      await new Promise((r) => setTimeout(r, 5));
      out.push(c);
    },
    stderr: { write: (c: Buffer) => { err.push(c.toString()); return true; } } as unknown as NodeJS.WritableStream,
  });
  const m = await fake.expect("exec_stream");
  assert.deepEqual(m.params, { command: "x", working_dir: "/tmp", user: "1000", raw: true });
  fake.notify("exec_stream.stdout", { id: m.id, data: b64("one ") });
  fake.notify("exec_stream.stderr", { id: m.id, data: b64("e1") });
  fake.notify("exec_stream.stdout", { id: 4242, data: b64("not mine") });
  fake.notify("exec_stream.stdout", { id: m.id, data: b64("two") });
  fake.result(m.id, { exit_code: 0, duration_ms: 3 });
  assert.deepEqual(await p, { exitCode: 0, durationMs: 3 });
  assert.equal(Buffer.concat(out).toString(), "one two", "async writer finished before the result");
  assert.deepEqual(err, ["e1"]);
  await finish(fake, client);
});

/** What our server sends for an exec that asked for `raw: true` (rpc/_codec.py). */
function rawOut(method: string, id: number, data: Buffer): Buffer {
  const head = `{"jsonrpc":"2.0","method":"${method}","params":{"id":${id},"bytes":${data.length}}}\n`;
  return Buffer.concat([Buffer.from(head), data]);
}

test("raw output payloads: exact bytes under any chunking, mixed with base64", async () => {
  const { fake, client } = await started();
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const p = client.execStream("x", {
    stdout: (c) => { out.push(c); },
    stderr: (c) => { err.push(c); },
  });
  const m = await fake.expect("exec_stream");
  assert.equal(m.params.raw, true);
  const tricky = Buffer.concat([Buffer.from('x\n{"jsonrpc":"2.0","id":1,"result":{}}\n'), Buffer.from([0, 0xff, 0x0a])]);
  const stream = Buffer.concat([
    rawOut("exec_stream.stdout", m.id, tricky),
    Buffer.from(`${JSON.stringify({ jsonrpc: "2.0", method: "exec_stream.stderr", params: { id: m.id, data: b64("E") } })}\n`),
    rawOut("exec_stream.stdout", 4242, Buffer.from("not mine\n")),
    rawOut("exec_stream.stderr", m.id, Buffer.alloc(0)),
    rawOut("exec_stream.stderr", m.id, Buffer.from("R")),
  ]);
  for (let i = 0; i < stream.length; i += 3) fake.send(stream.subarray(i, i + 3)); // split everywhere
  fake.result(m.id, { exit_code: 0, duration_ms: 1 });
  assert.deepEqual(await p, { exitCode: 0, durationMs: 1 });
  assert.deepEqual(Buffer.concat(out), tricky);
  assert.equal(Buffer.concat(err).toString(), "ER");
  await finish(fake, client);
});

test("execPipe sends stdin only after ready, then EOF", async () => {
  const { fake, client } = await started();
  const out: Buffer[] = [];
  const p = client.execPipe("cat", {
    stdin: (async function* () {
      yield "hello ";
      yield Buffer.from([0, 1, 2]);
      yield new Uint8Array([3]);
    })(),
    stdout: (c) => {
      out.push(c);
    },
  });
  const m = await fake.expect("exec_pipe");
  assert.deepEqual(m.params, { command: "cat", raw: true });
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(fake.log.filter((x) => x.method === "exec_pipe.stdin").length, 0, "no input before ready");
  fake.notify("exec_pipe.ready", { id: m.id });
  const s1 = await fake.expect("exec_pipe.stdin");
  const s2 = await fake.expect("exec_pipe.stdin");
  const s3 = await fake.expect("exec_pipe.stdin");
  const eof = await fake.expect("exec_pipe.stdin_eof");
  assert.deepEqual([s1.params, s2.params, s3.params, eof.params], [
    { id: m.id, data: b64("hello ") },
    { id: m.id, data: Buffer.from([0, 1, 2]).toString("base64") },
    { id: m.id, data: Buffer.from([3]).toString("base64") },
    { id: m.id },
  ]);
  assert.ok(typeof s1.id === "number" && s1.id > m.id, "input messages carry their own id");
  fake.notify("exec_pipe.stdout", { id: m.id, data: b64("hello ") });
  fake.result(m.id, { exit_code: 0, duration_ms: 1 });
  assert.equal((await p).exitCode, 0);
  assert.equal(Buffer.concat(out).toString(), "hello ");
  // No stdin: EOF right after ready; a string is one chunk, not characters.
  const q = client.execPipe("true");
  const m2 = await fake.expect("exec_pipe");
  fake.notify("exec_pipe.ready", { id: m2.id });
  assert.deepEqual((await fake.expect("exec_pipe.stdin_eof")).params, { id: m2.id });
  fake.result(m2.id, { exit_code: 0, duration_ms: 1 });
  await q;
  const r = client.execPipe("cat", { stdin: "abc", user: "65534:65534" });
  const m3 = await fake.expect("exec_pipe");
  assert.equal(m3.params.user, "65534:65534");
  fake.notify("exec_pipe.ready", { id: m3.id });
  assert.equal((await fake.expect("exec_pipe.stdin")).params.data, b64("abc"));
  await fake.expect("exec_pipe.stdin_eof");
  fake.result(m3.id, { exit_code: 0, duration_ms: 1 });
  await r;
  await finish(fake, client);
});

test("execInteractive: rows/cols, stdin and resize after ready", async () => {
  const { fake, client } = await started();
  const out: Buffer[] = [];
  const p = client.execInteractive("sh", {
    rows: 40,
    cols: 100,
    stdin: ["exit\n"],
    stdout: (c) => {
      out.push(c);
    },
    resize: [[50, 120], [0, 5], [30, 90]],
  });
  const m = await fake.expect("exec_tty");
  assert.deepEqual(m.params, { command: "sh", rows: 40, cols: 100, raw: true });
  fake.notify("exec_tty.ready", { id: m.id });
  const got: Msg[] = [];
  for (let i = 0; i < 4; i++) got.push(await fake.next());
  const resizes = got.filter((x) => x.method === "exec_tty.resize").map((x) => x.params);
  assert.deepEqual(resizes, [{ id: m.id, rows: 50, cols: 120 }, { id: m.id, rows: 30, cols: 90 }]);
  assert.deepEqual(got.filter((x) => x.method === "exec_tty.stdin").map((x) => x.params), [{ id: m.id, data: b64("exit\n") }]);
  assert.equal(got.filter((x) => x.method === "exec_tty.stdin_eof").length, 1);
  fake.notify("exec_tty.stdout", { id: m.id, data: b64("$ ") });
  fake.result(m.id, { exit_code: 0, duration_ms: 4 });
  assert.equal((await p).durationMs, 4);
  assert.equal(Buffer.concat(out).toString(), "$ ");
  await finish(fake, client);
});

test("files: writeFile modes, readFile bytes, listFiles", async () => {
  const { fake, client } = await started();
  const data = Buffer.from([0, 1, 2, 250, 251, 252]);
  const w = client.writeFileMode("/tmp/b.bin", new Uint8Array(data), 0o755);
  const m = await fake.expect("write_file");
  assert.deepEqual(m.params, { path: "/tmp/b.bin", content: data.toString("base64"), mode: 0o755 });
  fake.result(m.id, {});
  await w;
  const w2 = client.writeFile("/tmp/t", "text");
  assert.equal((await fake.expect("write_file")).params.mode, 0o644);
  fake.result(fake.log[fake.log.length - 1].id, {});
  await w2;
  const r = client.readFile("/tmp/b.bin");
  const mr = await fake.expect("read_file");
  fake.result(mr.id, { content: data.toString("base64") });
  const got = await r;
  assert.ok(got instanceof Uint8Array);
  assert.deepEqual(got, data);
  const l = client.listFiles("/tmp");
  const ml = await fake.expect("list_files");
  fake.result(ml.id, { files: [{ name: "d", size: 0, mode: 2147484141, mod_time: "x", is_dir: true }] });
  assert.deepEqual(await l, [{ name: "d", size: 0, mode: 2147484141, isDir: true }]);
  const l2 = client.listFiles("/empty");
  fake.result((await fake.expect("list_files")).id, { files: [] });
  assert.deepEqual(await l2, []);
  // Corrupt base64 is an error, never silently shortened bytes.
  const bad = client.readFile("/x");
  fake.result((await fake.expect("read_file")).id, { content: "@@@@" });
  await assert.rejects(bad, /invalid read_file content: bad base64/);
  await finish(fake, client);
});

test("log and logStream", async () => {
  const { fake, client } = await started();
  const l = client.log();
  const m = await fake.expect("log");
  assert.equal(m.params, undefined, "no params key when there are none");
  fake.result(m.id, { content: b64("boot\n") });
  assert.equal(await l, "boot\n");
  const chunks: string[] = [];
  const ac = new AbortController();
  const s = client.logStream({ stdout: (c) => { chunks.push(c.toString()); }, signal: ac.signal });
  const ms = await fake.expect("log_stream");
  fake.notify("log_stream.data", { id: ms.id, data: b64("line1\n") });
  while (chunks.length === 0) await new Promise((r) => setTimeout(r, 5));
  const rejected = assert.rejects(s, /AbortError|aborted/i);
  ac.abort();
  assert.deepEqual((await fake.expect("cancel")).params, { id: ms.id });
  await rejected;
  assert.deepEqual(chunks, ["line1\n"]);
  await finish(fake, client);
});

test("allow-list add/delete normalize hosts", async () => {
  const { fake, client } = await started();
  const a = client.allowListAdd(["a.test, b.test", " a.test ", "c.test"]);
  const m = await fake.expect("allow_list_add");
  assert.deepEqual(m.params, { hosts: ["a.test", "b.test", "c.test"] });
  fake.result(m.id, { added: ["a.test", "b.test", "c.test"], allowed_hosts: ["x", "a.test", "b.test", "c.test"] });
  assert.deepEqual(await a, { changed: ["a.test", "b.test", "c.test"], allowedHosts: ["x", "a.test", "b.test", "c.test"] });
  const d = client.allowListDelete("b.test");
  const md = await fake.expect("allow_list_delete");
  assert.deepEqual(md.params, { hosts: ["b.test"] });
  fake.result(md.id, { removed: ["b.test"], allowed_hosts: null });
  assert.deepEqual(await d, { changed: ["b.test"], allowedHosts: [] });
  await assert.rejects(client.allowListAdd([" , "]), /at least one host is required/);
  await finish(fake, client);
});

test("portForward specs and bad specs", async () => {
  const { fake, client } = await started();
  const p = client.portForward("8080", "18081:81");
  const m = await fake.expect("port_forward");
  assert.deepEqual(m.params, {
    forwards: [{ local_port: 8080, remote_port: 8080 }, { local_port: 18081, remote_port: 81 }],
    addresses: ["127.0.0.1"],
  });
  fake.result(m.id, { bindings: [{ address: "127.0.0.1", local_port: 8080, remote_port: 8080 }] });
  assert.deepEqual(await p, [{ address: "127.0.0.1", localPort: 8080, remotePort: 8080 }]);
  await assert.rejects(client.portForward("1:2:3"), /expected \[LOCAL_PORT:\]REMOTE_PORT/);
  await assert.rejects(client.portForward("70000"), /must be in range 1-65535/);
  await assert.rejects(client.portForward("abc"), /invalid port value "abc"/);
  await finish(fake, client);
});

test("server exit fails pending requests; later calls say not running", async () => {
  process.env.FAKE_EXIT = "7";
  const { fake, client } = await started();
  delete process.env.FAKE_EXIT;
  const p = client.exec("x");
  const rejected = assert.rejects(p, /Matchlock process closed unexpectedly \(exit status 7\)/);
  await fake.expect("exec");
  fake.hangUp();
  await rejected;
  await client.close(); // nothing to talk to: returns at once
  await assert.rejects(client.exec("y"), /client is closed/);
  await fake.stop();
});

test("close sends close with the timeout, then EOF; the client stays closed", async () => {
  const { fake, client } = await started();
  await createVM(fake, client);
  const p = client.close(7);
  const m = await fake.expect("close");
  assert.deepEqual(m.params, { timeout_seconds: 7 });
  fake.result(m.id, {});
  for (;;) if ((await fake.next()).eof) break;
  fake.hangUp();
  await p;
  await assert.rejects(client.exec("x"), /client is closed/);
  await fake.stop();
});

test("volume helpers run the CLI with --json", async () => {
  const { fake, client } = await setup();
  const p = client.volumeList();
  const hello = await fake.hello();
  assert.deepEqual(hello.argv, ["volume", "ls", "--json"]);
  fake.send(JSON.stringify([{ name: "v1", size: "10.0 MB", path: "/p/v1.ext4" }]));
  fake.hangUp();
  assert.deepEqual(await p, [{ name: "v1", size: "10.0 MB", path: "/p/v1.ext4" }]);
  await fake.stop();
  await assert.rejects(client.volumeCreate("  "), /volume name is required/);
  await assert.rejects(client.volumeCreate("v", 0), /volume size must be > 0/);
});
