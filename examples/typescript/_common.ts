/** Shared bits of the examples: which image, the API endpoint, and a check that exits loudly. */
import type { Sandbox } from "matchlock-sdk";

export const IMAGE = process.env.MATCHLOCK_EXAMPLE_IMAGE || "matchlock/busybox";
export const API_URL = process.env.EXAMPLE_API_URL ?? "";
export const API_IP = process.env.EXAMPLE_API_IP ?? "";
export const API_HOST = API_URL ? new URL(API_URL).hostname : "api.example.test";

/** Point API_HOST at API_IP inside the VM, and allow that one private address. */
export function withApi(sandbox: Sandbox): Sandbox {
  return API_IP ? sandbox.addHost(API_HOST, API_IP).allowPrivate(API_IP) : sandbox;
}

export function check(cond: boolean, what: string): void {
  if (!cond) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
  console.log(`ok: ${what}`);
}

export function run(main: () => Promise<void>): void {
  main().catch((err: unknown) => {
    console.error(err instanceof Error ? `${err.name}: ${err.message}` : err);
    process.exit(1);
  });
}
