"""VFS hooks: rules applied to the guest's file operations, and file events.

A rule matches an operation by name (`ops`, empty = every op) and a path glob. A glob
without "/" matches the file's base name (`*.env`); one with "/" matches the whole guest
path, `*` not crossing "/" and `**` crossing it (`/workspace/**/secrets/*`).

- phase "before", action "block": the operation fails with `errno` (default EPERM), before
  the provider sees it.
- phase "before", action "mutate_write": a write's bytes are replaced by `mutate` (bytes,
  or a callable given the FileOp); the guest is told its own length was written.
- phase "before" with a `callback`: the callback decides: None/"allow" lets the operation
  go on, "block" fails it with `errno`, an int fails it with that errno; a raised OSError
  fails it with its errno. Runs on the VFS thread: a slow callback slows the guest's file
  system (it is the verdict the operation waits for).
- phase "after" with a `callback`: called with the completed operation's FileEvent, on the
  event thread (never on the VFS thread), in order, through a bounded queue: when the queue
  is full, events are dropped and counted (`dropped`).

`subscribe(fn)` gets every completed operation as a FileEvent (the RPC layer turns these
into `event` notifications); same thread and queue as after-callbacks.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

OPS = frozenset({
    "stat", "readdir", "open", "create", "mkdir", "chmod", "chown", "utimens", "remove",
    "rename", "symlink", "readlink", "link", "read", "write", "close", "sync", "truncate",
    "setxattr",
})
OP_ALIASES = {"read_dir": "readdir", "removeall": "remove", "remove_all": "remove",
              "unlink": "remove", "rmdir": "remove", "fsync": "sync", "setattr": "chmod"}
EVENT_QUEUE = 1024


@dataclass(frozen=True, slots=True)
class FileOp:
    """One guest file operation, as before-hooks see it."""

    op: str
    path: str
    new_path: str = ""
    size: int = 0
    offset: int = 0
    flags: int = 0
    mode: int = 0
    uid: int = 0
    gid: int = 0
    pid: int = 0
    data: bytes | None = None  # write: the bytes (before-hooks only)


@dataclass(frozen=True, slots=True)
class FileEvent:
    """A completed operation (wire form: {"type":"file","timestamp":ms,"file":{...}})."""

    op: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int
    timestamp_ms: int
    new_path: str = ""

    def to_wire(self) -> dict[str, Any]:
        f = {"op": self.op, "path": self.path, "size": self.size, "mode": self.mode,
             "uid": self.uid, "gid": self.gid}
        if self.new_path:
            f["new_path"] = self.new_path
        return {"type": "file", "timestamp": self.timestamp_ms, "file": f}


def compile_glob(pattern: str) -> Callable[[str], bool]:
    """A matcher for `pattern` (see the module docstring)."""
    if not pattern or pattern in ("*", "**"):
        return lambda path: True
    base_only = "/" not in pattern
    rx, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                rx.append("(?:.*/)?")  # "a/**/b" also matches "a/b"
                i += 1
            else:
                rx.append(".*")
            continue
        if c == "*":
            rx.append("[^/]*")
        elif c == "?":
            rx.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                rx.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                rx.append(f"[{body}]")
                i = j
        else:
            rx.append(re.escape(c))
        i += 1
    compiled = re.compile("".join(rx) + r"\Z", re.DOTALL)
    if base_only:
        return lambda path: compiled.match(path.rsplit("/", 1)[-1]) is not None
    return lambda path: compiled.match(path) is not None


def normalize_ops(ops: Iterable[str]) -> frozenset[str]:
    out = set()
    for o in ops:
        o = o.strip().lower()
        o = OP_ALIASES.get(o, o)
        if o not in OPS:
            raise ValueError(f"unknown VFS hook op {o!r} (known: {', '.join(sorted(OPS))})")
        out.add(o)
    return frozenset(out)


@dataclass(frozen=True)
class HookRule:
    name: str = ""
    phase: str = "before"
    ops: frozenset[str] = frozenset()
    path: str = ""
    action: str = "allow"
    errno: int = errno_mod.EPERM
    callback: Callable[..., Any] | None = None
    mutate: bytes | Callable[[FileOp], bytes] | None = None
    _match: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.phase not in ("before", "after"):
            raise ValueError(f"hook {self.name!r}: phase must be before or after")
        if self.action not in ("allow", "block", "mutate_write"):
            raise ValueError(f"hook {self.name!r}: action must be allow, block or mutate_write")
        if self.phase == "after" and self.action != "allow":
            raise ValueError(f"hook {self.name!r}: an after-hook cannot {self.action}")
        if self.action == "mutate_write" and self.mutate is None:
            raise ValueError(f"hook {self.name!r}: mutate_write needs mutate bytes or a callable")
        if not 0 < self.errno < 4096:
            raise ValueError(f"hook {self.name!r}: errno {self.errno} out of range")
        object.__setattr__(self, "ops", normalize_ops(self.ops))
        object.__setattr__(self, "_match", compile_glob(self.path))

    def matches(self, op: str, path: str) -> bool:
        return (not self.ops or op in self.ops) and self._match(path)


class HookEngine:
    def __init__(self, rules: Iterable[HookRule] = ()) -> None:
        self._before: list[HookRule] = []
        self._after: list[HookRule] = []
        self._subs: list[Callable[[FileEvent], None]] = []
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        self.active_before = False
        self.active_after = False
        self.active = False  # any rule or subscriber: paths are worth computing
        self.set_rules(rules)

    # -- configuration (any thread) ------------------------------------------------------

    def set_rules(self, rules: Iterable[HookRule]) -> None:
        rules = list(rules)
        with self._lock:
            self._before = [r for r in rules if r.phase == "before" and r.action != "allow"
                            or r.phase == "before" and r.callback is not None]
            self._after = [r for r in rules if r.phase == "after" and r.callback is not None]
            self._refresh()

    def subscribe(self, fn: Callable[[FileEvent], None]) -> Callable[[], None]:
        """Call `fn(event)` for every completed operation; returns an unsubscribe."""
        with self._lock:
            self._subs = [*self._subs, fn]
            self._refresh()

        def unsubscribe() -> None:
            with self._lock:
                self._subs = [s for s in self._subs if s is not fn]
                self._refresh()

        return unsubscribe

    def _refresh(self) -> None:
        self.active_before = bool(self._before)
        self.active_after = bool(self._after or self._subs)
        self.active = self.active_before or self.active_after
        if self.active_after and self._thread is None:
            self._queue = queue.Queue(EVENT_QUEUE)
            self._thread = threading.Thread(target=self._deliver, name="vfs-events",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._subs, self._after = [], []
            self._refresh()
            q, t = self._queue, self._thread
            self._thread = None
        if q is not None and t is not None:
            q.put(None)
            t.join(5)

    # -- the VFS thread's calls ----------------------------------------------------------

    def intercepts_writes(self, path: str) -> bool:
        """Whether a before-rule may act on writes to `path` (block, mutate, decide)."""
        return self.active_before and any(
            (not r.ops or "write" in r.ops) and r._match(path) for r in self._before)

    def before(self, op: str, path: str, req: Any, *, size: int = 0, offset: int = 0,
               flags: int = 0, mode: int = 0, new_path: str = "",
               data: memoryview | None = None) -> bytes | None:
        """Raise OSError to refuse the operation; return bytes to replace a write's data."""
        if not self.active_before:
            return None
        fop: FileOp | None = None
        out: bytes | None = None
        for rule in self._before:
            if not rule.matches(op, path):
                continue
            if fop is None:
                fop = FileOp(op, path, new_path, size, offset, flags, mode, req.uid, req.gid,
                             req.pid, bytes(data) if data is not None else None)
            if rule.action == "block":
                raise OSError(rule.errno, f"blocked by VFS hook {rule.name or rule.path}")
            if rule.action == "mutate_write":
                if op != "write" or data is None:
                    continue
                m = rule.mutate
                new = m(fop) if callable(m) else m
                if not isinstance(new, bytes | bytearray | memoryview):
                    raise OSError(errno_mod.EIO, f"VFS hook {rule.name}: mutate gave no bytes")
                out = bytes(new)
                fop = FileOp(op, path, new_path, len(out), offset, flags, mode, req.uid,
                             req.gid, req.pid, out)
                continue
            verdict = rule.callback(fop) if rule.callback is not None else None
            if verdict in (None, "allow", ""):
                continue
            if verdict == "block":
                raise OSError(rule.errno, f"blocked by VFS hook {rule.name or rule.path}")
            if isinstance(verdict, int) and 0 < verdict < 4096:
                raise OSError(verdict, f"blocked by VFS hook {rule.name or rule.path}")
            raise OSError(errno_mod.EIO, f"VFS hook {rule.name}: bad verdict {verdict!r}")
        return out

    def after(self, op: str, path: str, req: Any, *, attr: Any = None, size: int = 0,
              new_path: str = "") -> None:
        if not self.active_after:
            return
        ev = FileEvent(op, path, size, attr.mode if attr is not None else 0,
                       req.uid, req.gid, time.time_ns() // 1_000_000, new_path)
        q = self._queue
        if q is None:
            return
        try:
            q.put_nowait(ev)
        except queue.Full:
            self.dropped += 1

    # -- the event thread ----------------------------------------------------------------

    def _deliver(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            ev = q.get()
            if ev is None:
                return
            for rule in self._after:
                if rule.matches(ev.op, ev.path):
                    try:
                        rule.callback(ev)  # type: ignore[misc]
                    except Exception:  # noqa: BLE001 - a hook's bug is the hook's
                        log.exception("VFS after-hook %s failed", rule.name)
            for fn in self._subs:
                try:
                    fn(ev)
                except Exception:  # noqa: BLE001
                    log.exception("VFS event subscriber failed")
