/** Buffered, streamed, piped stdin, a PTY, and cancellation. */
import { Client, Sandbox, TimeoutError } from "matchlock-sdk";
import { IMAGE, check, run } from "./_common.js";

run(async () => {
  const client = new Client();
  try {
    await client.launch(new Sandbox(IMAGE));

    const buffered = await client.exec("echo out; echo err >&2");
    check(buffered.stdout === "out\n" && buffered.stderr === "err\n", "exec buffers both outputs");

    const streamed: string[] = [];
    const s = await client.execStream("for i in 1 2 3; do echo line$i; done", {
      stdout: (chunk) => {
        streamed.push(chunk.toString());
      },
      stderr: process.stderr,
    });
    check(s.exitCode === 0 && streamed.join("") === "line1\nline2\nline3\n", "execStream streams");

    const piped: Buffer[] = [];
    const p = await client.execPipe("tr a-z A-Z", {
      stdin: ["hello ", Buffer.from("pipe\n")],
      stdout: (chunk) => {
        piped.push(chunk);
      },
    });
    check(p.exitCode === 0 && Buffer.concat(piped).toString() === "HELLO PIPE\n", "execPipe feeds stdin");

    const tty: string[] = [];
    const t = await client.execInteractive("test -t 0 && stty size", {
      rows: 30,
      cols: 100,
      stdout: (chunk) => {
        tty.push(chunk.toString());
      },
    });
    check(t.exitCode === 0 && tty.join("").includes("30 100"), "execInteractive runs on a PTY of that size");

    const ac = new AbortController();
    const long = client.exec("sleep 300", { signal: ac.signal });
    ac.abort();
    check(await long.then(() => false, (e: unknown) => e instanceof Error && e.name === "AbortError"), "an AbortSignal cancels");
    const timedOut = await client.exec("sleep 300", { timeoutMs: 300 }).then(() => false, (e: unknown) => e instanceof TimeoutError);
    check(timedOut, "timeoutMs cancels too");
    check((await client.exec("echo alive")).stdout === "alive\n", "the VM is still usable");
  } finally {
    await client.close();
  }
});
