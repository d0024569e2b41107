/** A web server inside the VM, reached from the host through a forwarded port. */
import { get } from "node:http";
import { createServer } from "node:net";
import { Client, Sandbox } from "matchlock-sdk";
import { IMAGE, check, run } from "./_common.js";

const SERVE =
  "mkdir -p /tmp/www && echo 'hello from the guest' > /tmp/www/index.html && " +
  "busybox httpd -p 127.0.0.1:8080 -h /tmp/www </dev/null >/dev/null 2>&1";

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

function fetchOnce(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    get({ host: "127.0.0.1", port, path: "/", agent: false }, (res) => {
      let body = "";
      res.on("data", (d: Buffer) => (body += d.toString()));
      res.on("end", () => resolve(body));
    }).on("error", reject);
  });
}

run(async () => {
  const client = new Client();
  try {
    await client.launch(new Sandbox(IMAGE));
    check((await client.exec(SERVE)).exitCode === 0, "busybox httpd started in the guest");
    const local = await freePort();
    const bindings = await client.portForward(`${local}:8080`);
    check(bindings[0]?.localPort === local && bindings[0]?.remotePort === 8080, `forwarded 127.0.0.1:${local}`);
    let body = "";
    for (let i = 0; i < 100 && !body; i++) {
      body = await fetchOnce(local).catch(() => ""); // the guest's server may still be starting
    }
    check(body === "hello from the guest\n", `127.0.0.1:${local} reaches guest port 8080`);
    const bodies = await Promise.all(Array.from({ length: 8 }, () => fetchOnce(local)));
    check(bodies.every((b) => b === body), "8 concurrent connections");
  } finally {
    await client.close();
  }
});
