/** The SDK against the real `matchlock rpc` and real VMs (run under the e2e lock by
 * tests/e2e/test_typescript_sdk.py, which also checks for residue afterwards). */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { request } from "node:http";
import { createServer } from "node:net";
import { after, before, describe, test } from "node:test";
import { Client, MatchlockError, RPCError, Sandbox, TimeoutError } from "../../src/index.js";
import { BIN, Collector, Feed, IMAGE, listVMs, requireEnv } from "./env.js";

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

function httpGet(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path: "/", agent: false }, (res) => {
      let body = "";
      res.on("data", (d: Buffer) => (body += d.toString()));
      res.on("end", () => resolve(body));
    });
    req.on("error", reject);
    req.end();
  });
}

describe("one VM, every client method", () => {
  let client: Client;
  let vmId = "";
  const REAL = `sk-real-${randomBytes(6).toString("hex")}`;

  before(async () => {
    requireEnv();
    client = new Client({ binaryPath: BIN });
    vmId = await client.launch(
      new Sandbox(IMAGE)
        .withEnv("GREETING", "hi")
        .allowHost("api.test")
        .addSecret("API_KEY", REAL, "api.test")
        .withVFSInterception({
          rules: [
            { name: "guard", phase: "before", ops: ["write"], path: "/tmp/locked*", actionHook: () => "block" },
            { name: "stamp", ops: ["write"], path: "/tmp/*.stamp", mutateHook: (r) => `stamped ${r.size}` },
          ],
        }),
    );
  });

  after(async () => {
    await client?.close();
  });

  test("launch gives a VM id that matchlock list shows", () => {
    assert.match(vmId, /^vm-[0-9a-f]{8}$/);
    assert.equal(client.vmId, vmId);
    assert.ok(listVMs().includes(vmId), "matchlock list shows the running VM");
  });

  test("exec: buffered output, exit code, env, working dir, user", async () => {
    const r = await client.exec("echo $GREETING; echo oops >&2; exit 3");
    assert.deepEqual([r.exitCode, r.stdout, r.stderr], [3, "hi\n", "oops\n"]);
    assert.equal((await client.exec("pwd", { workingDir: "/tmp" })).stdout, "/tmp\n");
    assert.equal((await client.execWithDir("pwd", "/etc")).stdout, "/etc\n");
    assert.equal((await client.exec("id -u", { user: "65534" })).stdout, "65534\n");
  });

  test("exec output is byte-exact", async () => {
    const r = await client.exec("printf '\\000\\377\\342\\202\\254x'");
    assert.deepEqual(r.stdoutBytes, Buffer.from([0, 255, 0xe2, 0x82, 0xac, 0x78]));
  });

  test("a secret reaches the guest only as a placeholder", async () => {
    const seen = (await client.exec("echo $API_KEY")).stdout.trim();
    assert.match(seen, /^SANDBOX_SECRET_[0-9a-f]{32}$/);
    assert.ok(!seen.includes(REAL));
    const env = (await client.exec("cat /proc/self/environ | tr '\\0' '\\n'")).stdout;
    assert.ok(!env.includes(REAL), "the real value is nowhere in the guest's environment");
  });

  test("execStream streams both outputs in order", async () => {
    const out = new Collector();
    const err = new Collector();
    const r = await client.execStream("for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 4", {
      stdout: out.write,
      stderr: err.write,
    });
    assert.equal(r.exitCode, 4);
    assert.equal(out.text, "out1\nout2\nout3\n");
    assert.equal(err.text, "err1\nerr2\nerr3\n");
  });

  test("execPipe: stdin to the process, binary-safe, stderr apart", async () => {
    const payload = randomBytes(300_000);
    const chunks: Buffer[] = [];
    const err = new Collector();
    const r = await client.execPipe("cat; echo done >&2", {
      stdin: [payload.subarray(0, 1000), payload.subarray(1000)],
      stdout: (c) => {
        chunks.push(c);
      },
      stderr: err.write,
    });
    assert.equal(r.exitCode, 0);
    assert.ok(Buffer.concat(chunks).equals(payload), "stdin came back byte for byte");
    assert.equal(err.text, "done\n");
    const none = await client.execPipe("wc -c");
    assert.equal(none.exitCode, 0, "no stdin: EOF at once, the command ends");
  });

  test("execInteractive: a PTY with its size, then resized", async () => {
    const out = new Collector();
    const stdin = new Feed<string>();
    const resize = new Feed<[number, number]>();
    const done = client.execInteractive("PS1='$ ' sh", { rows: 30, cols: 100, stdin, stdout: out.write, resize });
    stdin.push("test -t 0 && echo IS-A-TTY; stty size\n");
    await out.until((s) => s.includes("IS-A-TTY") && /^30 100\r?$/m.test(s));
    resize.push([25, 90]);
    // Resize and input travel separately: ask until the new size shows.
    for (let i = 0; i < 50 && !/^25 90\r?$/m.test(out.text); i++) {
      const n = out.text.length;
      stdin.push("stty size\n");
      await out.until((s) => s.length > n && /\n\d+ \d+\r?\n/.test(s.slice(n)));
    }
    assert.match(out.text, /^25 90\r?$/m);
    stdin.push("exit 3\n");
    const r = await done;
    stdin.end();
    resize.end();
    assert.equal(r.exitCode, 3);
  });

  test("files: 5 MB binary round trip, modes, listing, errors", async () => {
    const big = randomBytes(5 * 1024 * 1024);
    await client.writeFileMode("/tmp/big.bin", big, 0o600);
    const back = await client.readFile("/tmp/big.bin");
    assert.ok(back.equals(big), "5 MB came back identical");
    assert.equal((await client.exec("md5sum /tmp/big.bin | cut -d' ' -f1")).stdout.trim(),
      (await import("node:crypto")).createHash("md5").update(big).digest("hex"));
    const entry = (await client.listFiles("/tmp")).find((f) => f.name === "big.bin");
    assert.ok(entry);
    assert.equal(entry.size, big.length);
    assert.equal(entry.mode & 0o777, 0o600);
    assert.equal(entry.isDir, false);
    await assert.rejects(client.readFile("/nonexistent/x"), (e: unknown) => e instanceof RPCError && e.code === RPCError.FILE_FAILED);
  });

  test("vfs local hooks: an action hook blocks, a mutate hook rewrites", async () => {
    await assert.rejects(client.writeFile("/tmp/locked.txt", "no"), /vfs action hook blocked operation: op=write path=\/tmp\/locked.txt/);
    assert.notEqual((await client.exec("test -e /tmp/locked.txt")).exitCode, 0, "nothing was written");
    await client.writeFile("/tmp/a.stamp", "12345");
    assert.equal((await client.readFile("/tmp/a.stamp")).toString(), "stamped 5");
    await client.writeFile("/tmp/plain.txt", "kept"); // positive control: no hook matches
    assert.equal((await client.readFile("/tmp/plain.txt")).toString(), "kept");
  });

  test("cancel (abort and timeout) kills the guest process group", async () => {
    const ac = new AbortController();
    const out = new Collector();
    const running = client.execStream("sleep 301 & sleep 302 & echo started; wait", { stdout: out.write, signal: ac.signal });
    const rejected = assert.rejects(running, (e: unknown) => e instanceof Error && e.name === "AbortError");
    await out.until((s) => s.includes("started"));
    const count = async (pat: string): Promise<number> =>
      Number((await client.exec(`ps -o args | grep -c '${pat}'`)).stdout.trim() || "0");
    const ps = (): Promise<number> => count("^sleep 30[12]");
    assert.equal(await ps(), 2, "positive control: both sleeps run");
    ac.abort();
    await rejected;
    let left = await ps();
    for (let i = 0; i < 100 && left > 0; i++) left = await ps();
    assert.equal(left, 0, "cancel killed the whole process group");

    await assert.rejects(client.exec("sleep 303", { timeoutMs: 500 }), (e: unknown) => e instanceof TimeoutError);
    left = await count("^sleep 303");
    for (let i = 0; i < 100 && left > 0; i++) left = await count("^sleep 303");
    assert.equal(left, 0, "timeout killed the command");
    assert.equal((await client.exec("echo still-usable")).stdout, "still-usable\n");
  });

  test("portForward: concurrent connections reach the guest server", async () => {
    assert.equal((await client.exec(
      "mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && " +
      "busybox httpd -p 127.0.0.1:8080 -h /tmp/www </dev/null >/dev/null 2>&1")).exitCode, 0);
    const port = await freePort();
    const bindings = await client.portForward(`${port}:8080`);
    assert.deepEqual(bindings, [{ address: "127.0.0.1", localPort: port, remotePort: 8080 }]);
    let first = "";
    for (let i = 0; i < 100 && first === ""; i++) {
      first = await httpGet(port).catch(() => ""); // the guest's httpd may still be starting
    }
    assert.equal(first, "hello-from-guest\n");
    const bodies = await Promise.all(Array.from({ length: 16 }, () => httpGet(port)));
    assert.deepEqual(new Set(bodies), new Set(["hello-from-guest\n"]));
    assert.equal(bodies.length, 16);
  });

  test("allow-list add and delete", async () => {
    const add = await client.allowListAdd(["extra.test, more.test", "extra.test"]);
    assert.deepEqual(add.changed, ["extra.test", "more.test"]);
    assert.deepEqual(add.allowedHosts, ["api.test", "extra.test", "more.test"]);
    const again = await client.allowListAdd("extra.test");
    assert.deepEqual(again.changed, [], "already present: nothing added");
    const del = await client.allowListDelete(["more.test"]);
    assert.deepEqual(del.changed, ["more.test"]);
    assert.deepEqual(del.allowedHosts, ["api.test", "extra.test"]);
  });

  test("log returns the VM log", async () => {
    assert.equal(typeof (await client.log()), "string");
  });
});

test("bad input to the real server: one-line RPC errors", async () => {
  requireEnv();
  const client = new Client({ binaryPath: BIN });
  try {
    await assert.rejects(client.exec("true"), (e: unknown) => e instanceof RPCError && e.code === RPCError.VM_FAILED && /VM not created/.test(e.rpcMessage));
    await assert.rejects(client.create({ image: "no/such-image-here:1" }), (e: unknown) => e instanceof RPCError && e.code === RPCError.VM_FAILED);
    await assert.rejects(client.create({}), (e: unknown) => e instanceof MatchlockError && !(e instanceof RPCError));
  } finally {
    await client.close();
  }
});

test("close leaves nothing behind; remove works after close", async () => {
  requireEnv();
  const client = new Client({ binaryPath: BIN });
  const id = await client.create({ image: IMAGE, noNetwork: true });
  assert.equal((await client.exec("echo up")).stdout, "up\n");
  assert.ok(listVMs().includes(id));
  await client.close();
  const row = listVMs().split("\n").find((l) => l.includes(id)) ?? "";
  assert.ok(!/running/i.test(row), `after close the VM is not running: ${JSON.stringify(row)}`);
  await client.remove();
  assert.ok(!listVMs().includes(id), "removed from matchlock list");
});
