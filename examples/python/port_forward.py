"""A web server inside the VM, reached from the host through a forwarded port."""

from __future__ import annotations

import socket
import time
import urllib.request

from _common import IMAGE, check

from matchlock import Client, Sandbox

SERVE = ("mkdir -p /tmp/www && echo 'hello from the guest' > /tmp/www/index.html && "
         "busybox httpd -p 127.0.0.1:8080 -h /tmp/www </dev/null >/dev/null 2>&1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    local = free_port()
    with Client() as client:
        client.launch(Sandbox(IMAGE))
        check(client.exec(SERVE).exit_code == 0, "busybox httpd started in the guest")
        client.port_forward(f"{local}:8080")
        body = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the guest's server may still be starting
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=5) as resp:
                    body = resp.read()
                break
            except OSError:
                time.sleep(0.2)
        check(body == b"hello from the guest\n", f"127.0.0.1:{local} reaches guest port 8080")
        bindings = client.port_forward(f"{free_port()}:8080")  # replaces the earlier forward
        check(bindings[0].remote_port == 8080, f"re-forwarded: {bindings}")


if __name__ == "__main__":
    main()
