"""What the host needs to know about a Dockerfile before the engine reads it: the base
images its stages start from, so they can be handed to the engine from matchlock's store
(or pulled as `pull` does). Everything else is the engine's job: this is no interpreter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-+])([^}]*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


def _logical_lines(text: str) -> list[str]:
    """Instruction lines: continuations (`\\` at the end) joined, comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if cur and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        out.append(cur)
        cur = ""
    if cur:
        out.append(cur)
    return out


def _expand(word: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        val = env.get(name, "")
        if m.group(2) == "-":
            return val or m.group(3)
        if m.group(2) == "+":
            return m.group(3) if val else ""
        return val
    return _VAR.sub(sub, word)


def base_images(text: str, build_args: Mapping[str, str]) -> list[str]:
    """Image references the FROM lines name (stages and `scratch` left out), in order,
    with global ARGs (defaults overridden by `build_args`) expanded."""
    env: dict[str, str] = {}
    stages: set[str] = set()
    seen_from = False
    out: list[str] = []
    for line in _logical_lines(text):
        parts = line.split(None, 1)
        instr = parts[0].upper()
        rest = parts[1] if len(parts) > 1 else ""
        if instr == "ARG" and not seen_from:
            for item in rest.split():
                name, eq, default = item.partition("=")
                env[name] = build_args.get(name, default.strip("\"'") if eq else "")
        elif instr == "FROM":
            seen_from = True
            words = [w for w in rest.split() if not w.startswith("--")]
            if not words:
                continue
            ref = _expand(words[0], env)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if ref.lower() in stages or ref == "scratch" or not ref:
                continue
            if ref not in out:
                out.append(ref)
        elif instr in ("COPY", "ADD", "RUN"):
            # COPY --from=IMAGE (and RUN --mount=from=IMAGE) may name an image, not a stage.
            for m in re.finditer(r"(?:^|[\s,])(?:--)?from=([^\s,]+)", rest):
                ref = _expand(m.group(1), env)
                if ref.lower() not in stages and not ref.isdigit() and ref not in out:
                    out.append(ref)
    return out
