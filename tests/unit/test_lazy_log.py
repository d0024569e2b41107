"""matchlock._log: a module logger that loads `logging` only when a record can go
somewhere (before anything imports logging, debug and info have nowhere to go)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_debug_and_info_do_not_import_logging_warning_does():
    p = _run("import sys\nfrom matchlock._log import get_logger\nlog = get_logger('x')\n"
             "log.debug('d %s', 1); log.info('i')\nprint('logging' in sys.modules)\n"
             "log.warning('w %s', 2)\nprint('logging' in sys.modules)\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "True"]
    assert p.stderr == "w 2\n"  # logging's last-resort handler, as with a plain logger


def test_records_reach_a_configured_logger():
    p = _run("import logging, sys\nlogging.basicConfig(level=logging.DEBUG, stream=sys.stdout,"
             " format='%(name)s %(levelname)s %(message)s')\n"
             "from matchlock._log import get_logger\nlog = get_logger('m.x')\n"
             "log.debug('d'); log.info('i'); log.error('e')\n"
             "print(log.isEnabledFor(logging.DEBUG))\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["m.x DEBUG d", "m.x INFO i", "m.x ERROR e", "True"]
