import { Client, Sandbox } from "matchlock-sdk";

const sandbox = new Sandbox("alpine:latest")
  .withCPUs(2)
  .withMemory(1024)
  .allowHost("api.openai.com")
  .addSecret("API_KEY", process.env.API_KEY ?? "", "api.openai.com");

export async function quickstart(): Promise<void> {
  const client = new Client();
  try {
    await client.launch(sandbox);
    const result = await client.exec("echo hello from sandbox");
    console.log(result.stdout);
    await client.execStream("curl -s https://api.test/", { stdout: process.stdout, stderr: process.stderr });
  } finally {
    await client.close();
  }
}
