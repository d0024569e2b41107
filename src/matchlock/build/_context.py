"""The build context: `.dockerignore` rules (Docker's semantics) and the tar stream of
what they let through. Pure apart from reading the context directory.

Rules (moby/patternmatcher): one pattern a line, `#` comments, blank lines skipped,
patterns cleaned and anchored at the context root, `*` and `?` never cross `/`, `**`
matches any number of directories, a leading `!` re-includes, the last matching rule
wins, and a rule that matches a directory matches everything under it.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from matchlock.errors import UsageError

MTIME_FLOOR = 0


@dataclass(frozen=True, slots=True)
class _Rule:
    pattern: str
    regex: re.Pattern[str]
    exclude: bool  # False: a `!` exception


def _translate(pattern: str) -> re.Pattern[str]:
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                    out.append("(?:.*/)?")  # zero or more whole directories
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                raise ValueError("unterminated [")
            body = pattern[i + 1:j]
            if body.startswith("^") or body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return re.compile("".join(out))


class IgnoreRules:
    def __init__(self, lines: list[str], source: str = ".dockerignore") -> None:
        self.rules: list[_Rule] = []
        for lineno, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclude = not line.startswith("!")
            if not exclude:
                line = line[1:].strip()
            line = posixpath.normpath(line).lstrip("/")
            if line in ("", "."):
                continue
            try:
                regex = _translate(line)
            except (ValueError, re.error) as e:
                raise UsageError(f"{source} line {lineno}: bad pattern {raw.strip()!r} ({e})"
                                 ) from None
            self.rules.append(_Rule(line, regex, exclude))

    @classmethod
    def load(cls, context: Path) -> IgnoreRules:
        path = context / ".dockerignore"
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return cls([])
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        return cls(text.splitlines(), str(path))

    @property
    def has_exceptions(self) -> bool:
        return any(not r.exclude for r in self.rules)

    def excluded(self, rel: str) -> bool:
        """Whether the context-relative path `rel` ("a/b.txt") is left out."""
        parts = rel.split("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        verdict = False
        for r in self.rules:
            if any(r.regex.match(p) for p in prefixes):
                verdict = r.exclude
        return verdict


def walk(context: Path, rules: IgnoreRules) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry sent, parents before children, sorted."""
    def visit(rel: str) -> Iterator[tuple[str, os.stat_result]]:
        base = context / rel if rel else context
        try:
            names = sorted(os.listdir(base))
        except OSError as e:
            raise UsageError(f"cannot read {base}: {e.strerror or e}") from None
        for name in names:
            child = f"{rel}/{name}" if rel else name
            st = os.lstat(context / child)
            is_dir = stat.S_ISDIR(st.st_mode)
            if rules.excluded(child):
                # An exception below an excluded directory may still bring files back.
                if is_dir and rules.has_exceptions:
                    yield from visit(child)
                continue
            yield child, st
            if is_dir:
                yield from visit(child)
    yield from visit("")


def write_tar(context: Path, out: BinaryIO, rules: IgnoreRules | None = None) -> int:
    """Write the context as an uncompressed tar to `out`; returns the entry count.
    Owners are root (as COPY makes them), special files are skipped, links kept."""
    rules = rules if rules is not None else IgnoreRules.load(context)
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for rel, st in walk(context, rules):
            ti = tarfile.TarInfo(rel)
            ti.mode = stat.S_IMODE(st.st_mode)
            ti.mtime = max(MTIME_FLOOR, int(st.st_mtime))
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            if stat.S_ISDIR(st.st_mode):
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif stat.S_ISLNK(st.st_mode):
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(context / rel)
                tf.addfile(ti)
            elif stat.S_ISREG(st.st_mode):
                ti.size = st.st_size
                with open(context / rel, "rb") as f:
                    tf.addfile(ti, f)
            else:
                continue  # sockets, fifos, devices: never part of an image
            count += 1
    return count
