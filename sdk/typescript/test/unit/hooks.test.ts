/** Network callbacks through the SDK-hosted Unix socket (the test plays the server's
 * side of spec §4.1 on a real socket) and SDK-local VFS hooks (§4.2). */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { connect } from "node:net";
import { dirname } from "node:path";
import { test } from "node:test";
import { Client, MatchlockError, Sandbox, type NetworkHookRequest, type VFSHookEvent } from "../../src/index.js";
import { globMatch } from "../../src/glob.js";
import { FakeServer, b64, type Msg } from "./fake.js";

async function started(): Promise<{ fake: FakeServer; client: Client }> {
  const fake = await new FakeServer().listen();
  const client = new Client({ binaryPath: fake.bin });
  await client.start();
  await fake.hello();
  return { fake, client };
}

async function finish(fake: FakeServer, client: Client): Promise<void> {
  const p = client.close();
  fake.result((await fake.expect("close")).id, {});
  for (;;) if ((await fake.next()).eof) break;
  fake.hangUp();
  await p;
  await fake.stop();
}

/** What the server does per callback: connect, one line out, one line back. */
function call(socketPath: string, req: Msg): Promise<Msg> {
  return new Promise((resolve, reject) => {
    const s = connect(socketPath);
    let buf = "";
    s.on("connect", () => s.write(`${JSON.stringify(req)}\n`));
    s.on("data", (d) => (buf += d.toString()));
    s.on("end", () => {
      try {
        resolve(JSON.parse(buf.trim()) as Msg);
      } catch (e) {
        reject(e);
      }
    });
    s.on("error", reject);
  });
}

test("network hooks: wire rules, callback socket, verdicts over the socket", async () => {
  const { fake, client } = await started();
  const seen: NetworkHookRequest[] = [];
  const sb = new Sandbox("img").allowHost("api.test").withNetworkInterception({
    rules: [
      { name: "static", phase: "before", hosts: ["api.test"], setHeaders: { "X-A": "1" }, deleteHeaders: ["X-B"] },
      {
        name: "cb",
        phase: "before",
        hosts: ["api.test"],
        methods: ["GET"],
        path: "/v1/*",
        timeoutMs: 1500,
        hook: async (req) => {
          seen.push(req);
          return { action: "mutate", request: { headers: { "X-Hooked": ["yes"] }, query: {}, path: "/v2/x" } };
        },
      },
      {
        name: "after",
        phase: "after",
        hook: (req) => ({
          response: {
            headers: { "X-Intercepted": ["callback"] },
            bodyReplacements: [{ find: "a", replace: "b" }],
            setBody: Buffer.from([0, 255]),
          },
          action: req.statusCode === 200 ? "mutate" : "allow",
        }),
      },
      { name: "boom", hook: () => { throw new Error("hook failed here"); } },
      { name: "blocky", action: "block", path: "/admin" },
    ],
  });
  const p = client.create(sb.options());
  const m = await fake.expect("create");
  const net = m.params.network;
  const sock: string = net.interception.callback_socket;
  assert.ok(sock.endsWith("/hook.sock") && dirname(sock).includes("matchlock-network-hook-"));
  assert.equal(net.intercept, true);
  assert.deepEqual(net.interception.rules, [
    { action: "allow", name: "static", phase: "before", hosts: ["api.test"], set_headers: { "X-A": "1" }, delete_headers: ["X-B"] },
    { action: "allow", name: "cb", phase: "before", hosts: ["api.test"], methods: ["GET"], path: "/v1/*", timeout_ms: 1500, callback_id: "network_hook_2" },
    { action: "allow", name: "after", phase: "after", callback_id: "network_hook_3" },
    { action: "allow", name: "boom", callback_id: "network_hook_4" },
    { action: "block", name: "blocky", path: "/admin" },
  ]);
  fake.result(m.id, { id: "vm-1" });
  await p;

  const r1 = await call(sock, {
    callback_id: "network_hook_2", phase: "before", host: "api.test", method: "GET", path: "/v1/x",
    query: { k: "v" }, request_headers: { Authorization: ["Bearer x"] },
  });
  assert.deepEqual(r1, { action: "mutate", request: { headers: { "X-Hooked": ["yes"] }, query: {}, path: "/v2/x" } });
  assert.deepEqual(seen, [{
    phase: "before", host: "api.test", method: "GET", path: "/v1/x", query: { k: "v" },
    requestHeaders: { Authorization: ["Bearer x"] }, statusCode: 0, responseHeaders: undefined, isSSE: false,
  }]);
  const r2 = await call(sock, { callback_id: "network_hook_3", phase: "after", host: "h", method: "GET", path: "/", status_code: 200, response_headers: { A: ["1"] }, is_sse: true });
  assert.deepEqual(r2, {
    action: "mutate",
    response: { headers: { "X-Intercepted": ["callback"] }, body_replacements: [{ find: "a", replace: "b" }], set_body_base64: Buffer.from([0, 255]).toString("base64") },
  });
  assert.deepEqual(await call(sock, { callback_id: "network_hook_2", phase: "after" }), { error: "network hook phase mismatch" });
  assert.deepEqual(await call(sock, { callback_id: "network_hook_9", phase: "before" }), { error: "network hook callback not found" });
  assert.deepEqual(await call(sock, { callback_id: "network_hook_4", phase: "before" }), { error: "hook failed here" });
  // Concurrent calls are independent connections.
  const many = await Promise.all(Array.from({ length: 20 }, () => call(sock, { callback_id: "network_hook_2", phase: "before" })));
  assert.equal(many.filter((r) => r.action === "mutate").length, 20);

  await finish(fake, client);
  assert.equal(existsSync(dirname(sock)), false, "close removes the hook socket directory");
});

test("network hooks: the socket goes away when create fails", async () => {
  const { fake, client } = await started();
  const p = client.create(new Sandbox("img").withNetworkInterception({ rules: [{ hook: () => null }] }).options());
  const m = await fake.expect("create");
  const sock: string = m.params.network.interception.callback_socket;
  assert.ok(existsSync(sock));
  fake.error(m.id, -32000, "failed to build rootfs: nope");
  await assert.rejects(p, /\[-32000\] failed to build rootfs: nope/);
  assert.equal(existsSync(dirname(sock)), false);
  await finish(fake, client);
});

test("vfs: wire rules, emit_events for after-hooks, local action/mutate hooks", async () => {
  const { fake, client } = await started();
  const events: VFSHookEvent[] = [];
  const dangerous: string[] = [];
  let release: () => void = () => {};
  const slow = new Promise<void>((r) => (release = r));
  const sb = new Sandbox("img").mountMemory("/workspace").withWorkspace("/workspace").withVFSInterception({
    rules: [
      { name: "deny-create", phase: "before", ops: ["create"], path: "/workspace/*.exe", action: "block" },
      { name: "after", phase: "after", ops: ["write"], path: "/workspace/*", hook: async (e) => { events.push(e); await slow; } },
      { name: "danger", phase: "after", ops: ["write"], dangerousHook: (c, e) => { assert.ok(c instanceof Client); dangerous.push(e.path); } },
      { name: "guard", phase: "before", ops: ["write", "read"], path: "/workspace/secret*", actionHook: (r) => (r.op === "write" ? "block" : "allow") },
      { name: "rewrite", ops: ["write"], path: "/workspace/*.txt", mutateHook: (r) => `size was ${r.size}` },
    ],
  });
  const p = client.create(sb.options());
  const m = await fake.expect("create");
  assert.deepEqual(m.params.vfs, {
    mounts: { "/workspace": { type: "memory" } },
    workspace: "/workspace",
    interception: {
      emit_events: true,
      rules: [{ action: "block", name: "deny-create", phase: "before", ops: ["create"], path: "/workspace/*.exe" }],
    },
  });
  fake.result(m.id, { id: "vm-1" });
  await p;

  // Action hook blocks before anything goes on the wire.
  const before = fake.log.length;
  await assert.rejects(client.writeFile("/workspace/secret.key", "x"), (e: unknown) =>
    e instanceof MatchlockError && /vfs action hook blocked operation: op=write path=\/workspace\/secret.key hook="guard"/.test((e as Error).message));
  assert.equal(fake.log.length, before);
  // Mutate hook rewrites the content.
  const w = client.writeFile("/workspace/a.txt", "hello");
  const wm = await fake.expect("write_file");
  assert.equal(Buffer.from(wm.params.content, "base64").toString(), "size was 5");
  fake.result(wm.id, {});
  await w;
  // Not matching the glob: untouched (`*` does not cross `/`).
  const w2 = client.writeFile("/workspace/sub/a.txt", "hello");
  assert.equal(Buffer.from((await fake.expect("write_file")).params.content, "base64").toString(), "hello");
  fake.result(fake.log[fake.log.length - 1].id, {});
  await w2;

  // After-hooks fire on file events; events during a running safe hook are dropped.
  fake.notify("event", { type: "file", timestamp: 1, file: { op: "WRITE", path: "/workspace/f", size: 3, mode: 420, uid: 1, gid: 2 } });
  while (events.length === 0) await new Promise((r) => setTimeout(r, 5));
  fake.notify("event", { type: "file", timestamp: 2, file: { op: "write", path: "/workspace/g", size: 1 } });
  fake.notify("event", { type: "file", timestamp: 2, file: { op: "read", path: "/workspace/h" } });
  while (dangerous.length < 2) await new Promise((r) => setTimeout(r, 5));
  release();
  assert.deepEqual(events, [{ op: "write", path: "/workspace/f", size: 3, mode: 420, uid: 1, gid: 2 }]);
  assert.deepEqual(dangerous, ["/workspace/f", "/workspace/g"]);
  await finish(fake, client);
});

test("vfs: only local hooks means no vfs object on the wire", async () => {
  const { fake, client } = await started();
  const p = client.create({ image: "img", vfsInterception: { rules: [{ actionHook: () => "allow" }] } });
  const m = await fake.expect("create");
  assert.equal(m.params.vfs, undefined);
  fake.result(m.id, { id: "vm-1" });
  await p;
  await finish(fake, client);
});

test("glob: minimatch-like segments", () => {
  assert.ok(globMatch("/workspace/*", "/workspace/a"));
  assert.ok(!globMatch("/workspace/*", "/workspace/a/b"));
  assert.ok(globMatch("/workspace/**", "/workspace/a/b"));
  assert.ok(globMatch("/w/**/x.txt", "/w/x.txt"));
  assert.ok(globMatch("/w/?.[ch]", "/w/a.c"));
  assert.ok(!globMatch("/w/?.[!ch]", "/w/a.c"));
  assert.ok(globMatch("/w/.*", "/w/.hidden"));
  assert.ok(globMatch("/a+b(c)", "/a+b(c)"));
});

void b64;
