"""Entry point run under fakeroot: `python -m matchlock.image._build SPEC.json`.

Writes JSON lines to stdout: {"progress": str}, then {"done": {...}} or {"error": str}.
"""

from __future__ import annotations

import json
import signal
import sys


def main(argv: list[str]) -> int:
    # The parent stops us with SIGINT; make sure it is not ignored (a shell running us in
    # the background would have us inherit SIG_IGN). Exiting then lets fakeroot's EXIT
    # trap stop its faked daemon.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from matchlock.errors import MatchlockError
    from matchlock.image._disk import build_inprocess

    def emit(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        with open(argv[0]) as f:
            spec = json.load(f)
        result = build_inprocess(spec, lambda msg: emit({"progress": msg}))
    except MatchlockError as e:
        from matchlock.image._layers import NoSpaceError

        emit({"error": str(e), "kind": "nospace" if isinstance(e, NoSpaceError) else ""})
        return 2
    emit({"done": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
