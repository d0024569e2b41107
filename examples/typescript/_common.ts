/** Shared bits of the examples: which image, and a check that exits loudly. */
export const IMAGE = process.env.MATCHLOCK_EXAMPLE_IMAGE || "matchlock/busybox";
export const API_URL = process.env.EXAMPLE_API_URL ?? "";
export const API_IP = process.env.EXAMPLE_API_IP ?? "";
export const API_HOST = API_URL ? new URL(API_URL).hostname : "api.example.test";

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
