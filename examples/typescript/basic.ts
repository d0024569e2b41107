/** Launch a sandbox, run commands, move files in and out. */
import { Client, Sandbox } from "matchlock-sdk";
import { IMAGE, check, run } from "./_common.js";

run(async () => {
  const client = new Client(); // starts `matchlock rpc` ($MATCHLOCK_BIN or PATH) on first use
  try {
    const vmId = await client.launch(new Sandbox(IMAGE).withEnv("GREETING", "hello").withMemory(256));
    console.log("VM", vmId);

    const r = await client.exec("echo $GREETING from $(uname -s)");
    check(r.exitCode === 0 && r.stdout === "hello from Linux\n", "exec sees the env");
    check((await client.exec("exit 3")).exitCode === 3, "a failing command is a result");

    await client.writeFile("/tmp/hello.txt", "written by the SDK\n");
    check((await client.readFile("/tmp/hello.txt")).toString() === "written by the SDK\n", "file round trip");
    const names = (await client.listFiles("/tmp")).map((f) => f.name);
    check(names.includes("hello.txt"), "listFiles sees it");
    const cat = await client.exec("cat hello.txt", { workingDir: "/tmp" });
    check(cat.stdout === "written by the SDK\n", "the guest sees it too");
  } finally {
    await client.close(); // stops the VM
  }
});
