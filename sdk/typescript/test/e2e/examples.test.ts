/** examples/typescript/*.ts, compiled by the test build, run as a user runs them:
 * `new Client()` starts $MATCHLOCK_BIN; each program checks its own output. */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { IMAGE, listVMs, requireEnv } from "./env.js";

const HERE = dirname(fileURLToPath(import.meta.url));
const BUILT = join(HERE, "..", "..", "..", "..", "examples", "typescript");

// network_hooks.ts needs an HTTPS upstream: tests/e2e/test_typescript_sdk.py
// (test_typescript_network_hooks_example) runs it against one and reads its log.
const RUNNABLE = ["basic", "exec_modes", "secrets", "port_forward", "vfs_hooks"];

for (const name of RUNNABLE) {
  test(`example ${name}.ts`, async () => {
    requireEnv();
    const before = listVMs();
    const { code, stdout, stderr } = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
      execFile(process.execPath, [join(BUILT, `${name}.js`)], {
        env: { ...process.env, MATCHLOCK_EXAMPLE_IMAGE: IMAGE },
        timeout: 240_000,
      }, (err, stdout, stderr) => {
        const code = err ? (typeof err.code === "number" ? err.code : 1) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      });
    });
    assert.equal(code, 0, `${name}.ts failed:\n${stdout}\n${stderr}`);
    assert.match(stdout, /^ok: /m);
    assert.doesNotMatch(stdout, /FAILED/);
    const running = (s: string): string[] => s.split("\n").filter((l) => /running/i.test(l));
    assert.deepEqual(running(listVMs()), running(before), "the example left a VM running");
  });
}
