/** A secret the guest never sees: it gets a placeholder, and the host swaps in the real
 * value only on requests to the secret's host. */
import { Client, Sandbox } from "matchlock-sdk";
import { API_HOST, API_URL, IMAGE, check, run, withApi } from "./_common.js";

const REAL = process.env.EXAMPLE_API_KEY ?? "sk-example-real-value";

run(async () => {
  const sandbox = withApi(new Sandbox(IMAGE).addSecret("API_KEY", REAL, API_HOST));
  const client = new Client();
  try {
    await client.launch(sandbox);
    const seen = (await client.exec("echo $API_KEY")).stdout.trim();
    check(seen.startsWith("SANDBOX_SECRET_") && !seen.includes(REAL), "the guest sees a placeholder, not the value");
    if (API_URL) {
      const r = await client.exec(`curl -sS -H "Authorization: Bearer $API_KEY" ${API_URL}`);
      check(r.exitCode === 0, `request to ${API_HOST} went through`);
      console.log(r.stdout);
    }
  } finally {
    await client.close();
  }
});
