/** Network interception: static rules, and a TypeScript callback that decides per
 * request (the SDK hosts the callback socket). A callback that throws or times out
 * blocks the request (matchlock fails closed). */
import { Client, Sandbox, type NetworkHookRequest, type NetworkHookResult } from "matchlock-sdk";
import { API_HOST, API_URL, IMAGE, check, run, withApi } from "./_common.js";

const seen: string[] = [];

function decide(req: NetworkHookRequest): NetworkHookResult | null {
  seen.push(`${req.method} ${req.host}${req.path}`);
  if (req.path.startsWith("/admin")) {
    return { action: "block" };
  }
  return { action: "mutate", request: { headers: { ...req.requestHeaders, "X-Agent": ["matchlock-example"] } } };
}

run(async () => {
  const sandbox = withApi(new Sandbox(IMAGE).allowHost(API_HOST)).withNetworkInterception({
    rules: [
      { name: "no-uploads", phase: "before", methods: ["PUT"], action: "block" },
      { name: "decide", phase: "before", hosts: [API_HOST], hook: decide, timeoutMs: 2000 },
      { name: "redact", phase: "after", hosts: [API_HOST], bodyReplacements: [{ find: "secret", replace: "[redacted]" }] },
    ],
  });
  const client = new Client();
  try {
    await client.launch(sandbox);
    if (!API_URL) {
      console.log("EXAMPLE_API_URL not set: rules installed, no request made");
      return;
    }
    const ok = await client.exec(`curl -sS -o /dev/null -w '%{http_code}' ${API_URL}`);
    check(ok.stdout === "200", "an allowed request passes, with X-Agent added");
    const blocked = await client.exec(`curl -sS -o /dev/null -w '%{http_code}' ${API_URL}admin`);
    check(blocked.stdout !== "200", "the callback blocked /admin");
    check(seen.length >= 2, `the callback saw: ${seen.join(", ")}`);
  } finally {
    await client.close();
  }
});
