"""Per-request cost of interception rules in the proxy, against the same proxy without
rules, in one run (no VM): a keep-alive HTTPS client → InterceptProxy → HTTPS upstream on
127.0.0.2 (the unit tests' harness, tests/unit/net/test_proxy.py), callbacks answered by
the SDK's own HookServer over a real Unix socket.

    python3 bench/hooks.py [--requests 400] [--rounds 3]

Configurations: none (baseline), static (a before-rule setting a header + an after-rule
replacing a body string), callback-before (a before callback returning a header), both
callbacks (before + after). Prints p50/p90 per request and the p50 ratio to the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from tests.unit.net.test_proxy import UP_IP, Client, Env

    from matchlock.net.policy import normalise_glob
    from matchlock.net.proxy._rules import RuleSet, compile_rules
    from matchlock.sdk._hooks import LocalNetworkHook
    from matchlock.sdk._hookserver import HookServer
    from matchlock.sdk._types import NetworkHookRequestMutation, NetworkHookResult

    tmp = Path(tempfile.mkdtemp(prefix="bench-hooks-"))
    env = Env(tmp)

    def before(req):
        return NetworkHookResult(request=NetworkHookRequestMutation(
            headers={**(req.request_headers or {}), "X-Cb": ["1"]}))

    hooks = HookServer({"network_hook_1": LocalNetworkHook("b", "", 0, before),
                        "network_hook_2": LocalNetworkHook("a", "", 0, lambda req: None)})
    configs = {
        "none": [],
        "static": [{"name": "s", "set_headers": {"X-Static": "1"}},
                   {"name": "r", "phase": "after",
                    "body_replacements": [{"find": "ok", "replace": "OK"}]}],
        "callback-before": [{"name": "b", "callback_id": "network_hook_1"}],
        "callbacks-both": [{"name": "b", "callback_id": "network_hook_1"},
                           {"name": "a", "phase": "after", "callback_id": "network_hook_2"}],
    }
    ports = {}
    for name, rules in configs.items():
        compiled, sock = compile_rules({"rules": rules, "callback_socket": hooks.path},
                                       normalise_glob)
        proxy = env.proxy(rules=RuleSet(compiled, sock) if compiled else None)
        ports[name] = env.listen(proxy, UP_IP, env.up_port)

    samples: dict[str, list[float]] = {n: [] for n in configs}
    for _ in range(args.rounds):
        for name, port in ports.items():  # interleaved, so load drifts hit all alike
            c = Client(port, "api.test", env.ca_file)
            for _ in range(20):  # warm up: TLS handshake, upstream connection
                c.request("GET", "/x", "api.test")
            for _ in range(args.requests):
                t = time.perf_counter()
                status, _, _ = c.request("GET", "/x", "api.test")
                samples[name].append(time.perf_counter() - t)
                assert status == 200
            c.close()
    hooks.close()
    env.close()
    base = statistics.median(samples["none"])
    print(f"{'config':<16} {'p50 ms':>8} {'p90 ms':>8} {'p50 ratio':>10} {'+p50 us':>9}")
    for name, xs in samples.items():
        xs.sort()
        p50, p90 = statistics.median(xs), xs[int(len(xs) * 0.9)]
        print(f"{name:<16} {p50 * 1e3:8.3f} {p90 * 1e3:8.3f} {p50 / base:10.2f} "
              f"{(p50 - base) * 1e6:9.0f}")


if __name__ == "__main__":
    main()
