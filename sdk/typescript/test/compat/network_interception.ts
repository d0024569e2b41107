import { Client, type NetworkHookRequest, type NetworkHookResult, Sandbox } from "matchlock-sdk";

function onResponse(req: NetworkHookRequest): NetworkHookResult | null {
  if (req.statusCode !== 200) {
    return null;
  }
  return {
    action: "mutate",
    response: {
      headers: { "X-Intercepted": ["callback"] },
      setBody: Buffer.from('{"msg":"from-callback"}'),
    },
  };
}

export async function main(): Promise<void> {
  const client = new Client();
  const sandbox = new Sandbox("alpine:latest")
    .allowHost("httpbin.org")
    .withNetworkInterception({
      rules: [
        {
          name: "dynamic-response-callback",
          phase: "after",
          hosts: ["httpbin.org"],
          path: "/response-headers",
          hook: async (request) => onResponse(request),
        },
        { phase: "before", action: "block", hosts: ["evil.test"] },
        { phase: "before", setHeaders: { "X-A": "1" }, deleteQuery: ["q"], rewritePath: "/p" },
        { phase: "after", bodyReplacements: [{ find: "a", replace: "b" }], deleteResponseHeaders: ["X"] },
      ],
    });
  try {
    await client.launch(sandbox);
    const result = await client.exec("wget -S -O - http://httpbin.org/response-headers 2>&1");
    process.stdout.write(`${result.stdout}${result.stderr}`);
  } finally {
    await client.close();
    await client.remove();
  }
}
