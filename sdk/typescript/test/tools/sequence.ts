/** The scripted SDK sequence of tests/e2e/test_sdk_parity.py through the TypeScript
 * SDK (the twin of sdk/go/internal/cmd/sequence): prints its results as one JSON
 * object, which must equal the Python and Go runs'. Usage: node sequence.js IMAGE */
import { Client, RPCError, Sandbox } from "../../src/index.js";

async function main(image: string): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  const client = new Client();
  try {
    await client.launch(new Sandbox(image).withEnv("GREETING", "hi").addSecret("API_KEY", "sk-parity", "api.test"));
    const r = await client.exec("echo $GREETING; echo err >&2; exit 3");
    out.exec = [r.exitCode, r.stdout, r.stderr];
    let so = "";
    let se = "";
    const s = await client.execStream("for i in 1 2 3; do echo line$i; done; echo e >&2", {
      stdout: (c) => { so += c.toString("utf8"); },
      stderr: (c) => { se += c.toString("utf8"); },
    });
    out.stream = [s.exitCode, so, se];
    so = "";
    const p = await client.execPipe("tr a-z A-Z", { stdin: "piped text\n", stdout: (c) => { so += c.toString("utf8"); } });
    out.pipe = [p.exitCode, so];
    await client.writeFileMode("/tmp/parity.bin", Buffer.from("\x00\x01binary\xff\n", "latin1"), 0o600);
    out.read = (await client.readFile("/tmp/parity.bin")).toString("hex");
    out.list = (await client.listFiles("/tmp"))
      .filter((f) => f.name === "parity.bin")
      .map((f) => [f.name, f.size, f.mode & 0o777, f.isDir]);
    const seen = (await client.exec("echo $API_KEY")).stdout;
    out.secret_is_placeholder = seen.startsWith("SANDBOX_SECRET_") && !seen.includes("sk-parity");
    try {
      await client.readFile("/tmp/missing");
      throw new Error("reading /tmp/missing succeeded");
    } catch (e) {
      if (!(e instanceof RPCError)) throw e;
      out.missing_code = e.code;
    }
  } finally {
    await client.close();
    await client.remove();
  }
  return out;
}

const image = process.argv[2];
if (!image) {
  console.error("usage: node sequence.js IMAGE");
  process.exit(2);
}
main(image).then(
  (out) => console.log(JSON.stringify(out)),
  (err: unknown) => {
    console.error("sequence:", err instanceof Error ? `${err.name}: ${err.message}` : err);
    process.exit(1);
  },
);
