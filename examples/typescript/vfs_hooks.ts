/** VFS hooks that run in the SDK: an action hook guarding the SDK's own writes, and a
 * mutate hook rewriting what it writes. (After-hooks on guest file events need a VFS
 * mount, which this build's `matchlock rpc` does not serve yet.) */
import { Client, Sandbox, VFS_HOOK_OP_WRITE } from "matchlock-sdk";
import { IMAGE, check, run } from "./_common.js";

run(async () => {
  const decisions: string[] = [];
  const sandbox = new Sandbox(IMAGE).withVFSInterception({
    rules: [
      {
        name: "no-secrets",
        phase: "before",
        ops: [VFS_HOOK_OP_WRITE],
        path: "/etc/*",
        actionHook: (req) => {
          decisions.push(`${req.op} ${req.path}`);
          return "block";
        },
      },
      {
        name: "header",
        ops: [VFS_HOOK_OP_WRITE],
        path: "/tmp/*.txt",
        mutateHook: (req) => `# written by ${req.uid}:${req.gid}\n`,
      },
    ],
  });
  const client = new Client();
  try {
    await client.launch(sandbox);
    const blocked = await client.writeFile("/etc/passwd", "x").then(() => false, () => true);
    check(blocked && decisions.length === 1, "the action hook blocked a write to /etc");
    check((await client.exec("grep -c root /etc/passwd")).stdout.trim() !== "0", "/etc/passwd is untouched");
    await client.writeFile("/tmp/notes.txt", "original");
    const text = (await client.readFile("/tmp/notes.txt")).toString();
    check(text.startsWith("# written by "), "the mutate hook replaced the content");
    await client.writeFile("/tmp/data.bin", "original");
    check((await client.readFile("/tmp/data.bin")).toString() === "original", "other paths are left alone");
  } finally {
    await client.close();
  }
});
