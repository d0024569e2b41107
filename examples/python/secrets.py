"""A secret the guest never sees: it gets a placeholder, and the host swaps in the real
value only on requests to the secret's host."""

from __future__ import annotations

import os

from _common import API_HOST, API_URL, IMAGE, check, with_api

from matchlock import Client, Sandbox

REAL = os.environ.get("EXAMPLE_API_KEY", "sk-example-real-value")


def main() -> None:
    sandbox = with_api(Sandbox(IMAGE).add_secret("API_KEY", REAL, API_HOST))
    with Client() as client:
        client.launch(sandbox)
        seen = client.exec("echo $API_KEY").stdout.strip()
        check(seen.startswith("SANDBOX_SECRET_") and REAL not in seen,
              "the guest sees a placeholder, not the value")
        if API_URL:  # the upstream receives the real value (it can echo it back to check)
            r = client.exec(f'curl -sS -H "Authorization: Bearer $API_KEY" {API_URL}')
            check(r.exit_code == 0, f"request to {API_HOST} went through")
            print(r.stdout)


if __name__ == "__main__":
    main()
