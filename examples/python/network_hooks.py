"""Network interception: static rules, and a Python callback that decides per request.
A callback that raises or times out blocks the request (matchlock fails closed)."""

from __future__ import annotations

from _common import API_HOST, API_URL, IMAGE, check, with_api

from matchlock import (
    Client,
    NetworkBodyTransform,
    NetworkHookRequest,
    NetworkHookRequestMutation,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Sandbox,
)

seen: list[str] = []


def decide(req: NetworkHookRequest) -> NetworkHookResult | None:
    seen.append(f"{req.method} {req.host}{req.path}")
    if req.path.startswith("/admin"):
        return NetworkHookResult(action="block")
    headers = dict(req.request_headers or {})
    headers["X-Agent"] = ["matchlock-example"]
    return NetworkHookResult(action="mutate",
                             request=NetworkHookRequestMutation(headers=headers))


def main() -> None:
    rules = NetworkInterceptionConfig(rules=[
        NetworkHookRule(name="no-uploads", phase="before", methods=["PUT"], action="block"),
        NetworkHookRule(name="decide", phase="before", hosts=[API_HOST], hook=decide,
                        timeout_ms=2000),
        NetworkHookRule(name="redact", phase="after", hosts=[API_HOST],
                        body_replacements=[NetworkBodyTransform("secret", "[redacted]")]),
    ])
    sandbox = with_api(Sandbox(IMAGE).allow_host(API_HOST).with_network_interception(rules))
    with Client() as client:
        client.launch(sandbox)
        if not API_URL:
            print("EXAMPLE_API_URL not set: rules installed, no request made")
            return
        ok = client.exec(f"curl -sS -o /dev/null -w '%{{http_code}}' {API_URL}")
        check(ok.stdout == "200", "an allowed request passes, with X-Agent added")
        blocked = client.exec(f"curl -sS -o /dev/null -w '%{{http_code}}' {API_URL}admin")
        check(blocked.stdout != "200", "the callback blocked /admin")
        check(len(seen) >= 2, f"the callback saw: {seen}")


if __name__ == "__main__":
    main()
