"""Shared bits of the examples: which image, and a check that exits loudly."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

IMAGE = os.environ.get("MATCHLOCK_EXAMPLE_IMAGE", "matchlock/busybox")
API_URL = os.environ.get("EXAMPLE_API_URL", "")
API_IP = os.environ.get("EXAMPLE_API_IP", "")
API_HOST = urlsplit(API_URL).hostname or "api.example.test"


def check(cond: bool, what: str) -> None:
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def with_api(sandbox):
    """Point API_HOST at API_IP inside the VM, and allow that one private address."""
    if API_IP:
        sandbox.add_host(API_HOST, API_IP).allow_private(API_IP)
    return sandbox
