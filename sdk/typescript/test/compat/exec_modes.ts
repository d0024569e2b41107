// The reference's exec_modes example imports the SDK as a default export and casts it.
import matchlockSDK from "matchlock-sdk";

const { Client, Sandbox } = matchlockSDK as typeof import("matchlock-sdk");
type MatchlockClient = InstanceType<typeof Client>;

async function streamDemo(client: MatchlockClient): Promise<void> {
  const result = await client.execStream("echo a; sleep 1; echo b", {
    workingDir: "/tmp",
    stdout: process.stdout,
    stderr: process.stderr,
  });
  console.log(`exit=${result.exitCode} duration_ms=${result.durationMs}`);
}

async function pipeDemo(client: MatchlockClient): Promise<void> {
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const result = await client.execPipe("cat; echo e >&2", {
    workingDir: "/tmp",
    user: "65534:65534",
    stdin: [Buffer.from("hello\n")],
    stdout: (chunk) => {
      out.push(chunk);
    },
    stderr: (chunk) => {
      err.push(chunk);
    },
  });
  process.stdout.write(Buffer.concat(out).toString("utf8"));
  console.log(result.exitCode, Buffer.concat(err).length);
}

async function ttyDemo(client: MatchlockClient): Promise<void> {
  if (!process.stdin.isTTY || typeof process.stdin.setRawMode !== "function") {
    return;
  }
  process.stdin.resume();
  process.stdin.setRawMode(true);
  try {
    const result = await client.execInteractive("sh", {
      workingDir: "/tmp",
      stdin: process.stdin,
      stdout: process.stdout,
      rows: process.stdout.rows ?? 24,
      cols: process.stdout.columns ?? 80,
    });
    console.log(`code=${result.exitCode} duration_ms=${result.durationMs}`);
  } finally {
    process.stdin.setRawMode(false);
    process.stdin.pause();
  }
}

export async function main(): Promise<void> {
  const client = new Client();
  const sandbox = new Sandbox("alpine:latest");
  try {
    const vmId = await client.launch(sandbox);
    console.log(vmId);
    await streamDemo(client);
    await pipeDemo(client);
    await ttyDemo(client);
  } finally {
    await client.close();
    await client.remove();
  }
}

void main().catch((error) => {
  console.error(error);
  process.exit(1);
});
