/** Network callbacks end to end: needs an HTTPS upstream for api.test at
 * MATCHLOCK_E2E_API_IP (trusted through MATCHLOCK_UPSTREAM_CA) and an image with curl
 * (MATCHLOCK_E2E_IMAGE). tests/e2e/test_typescript_sdk.py::test_typescript_network_hooks
 * provides both and judges by the upstream's own log: /mutate arrived carrying the
 * header the callback added, /slow (a callback past its deadline) never arrived. Kept
 * out of test/e2e/ because that suite runs without an upstream. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { Client, Sandbox, type NetworkHookRule } from "../../src/index.js";
import { BIN, listVMs, requireEnv } from "../e2e/env.js";

test("network callbacks: one mutates a header, one times out and blocks", async () => {
  requireEnv();
  const ip = process.env.MATCHLOCK_E2E_API_IP ?? "";
  const image = process.env.MATCHLOCK_E2E_IMAGE ?? "";
  assert.ok(ip && image, "MATCHLOCK_E2E_API_IP and MATCHLOCK_E2E_IMAGE must be set (run via tests/e2e/test_typescript_sdk.py)");
  const before = listVMs();
  let mutated = 0;
  let slow = 0;
  const rules: NetworkHookRule[] = [
    {
      name: "tag", phase: "before", hosts: ["api.test"], path: "/mutate*", timeoutMs: 5000,
      hook: (req) => {
        mutated++;
        const headers = { ...req.requestHeaders, "X-TS-Hook": [`${req.method} ${req.path}`] };
        return { action: "mutate", request: { headers } };
      },
    },
    {
      name: "slow", phase: "before", hosts: ["api.test"], path: "/slow*", timeoutMs: 300,
      hook: async () => {
        slow++;
        await sleep(3000);
        return null;
      },
    },
  ];
  const client = new Client({ binaryPath: BIN });
  try {
    await client.launch(new Sandbox(image).allowHost("api.test").addHost("api.test", ip).allowPrivate(ip)
      .withNetworkInterception({ rules }));
    const curl = async (path: string): Promise<string> =>
      (await client.exec(`curl -s -o /dev/null -w '%{http_code}' --max-time 30 https://api.test${path}`)).stdout;
    assert.equal(await curl("/mutate"), "200", "the mutated request did not go through");
    const start = Date.now();
    const blocked = await curl("/slow");
    const elapsed = Date.now() - start;
    assert.notEqual(blocked, "200", "a callback past its deadline must block the request");
    assert.ok(elapsed < 2900, `the blocked request waited for the slow callback: ${elapsed} ms`);
    assert.ok(mutated >= 1 && slow >= 1, `callbacks ran: mutate ${mutated}, slow ${slow}`);
    assert.match(client.vmId, /^vm-[0-9a-f]{8}$/);
  } finally {
    await client.close();
    await client.remove();
  }
  const running = (s: string): string[] => s.split("\n").filter((l) => /running/i.test(l));
  assert.deepEqual(running(listVMs()), running(before), "the test left a VM running");
});
