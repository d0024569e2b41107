"""Build hook: compile the static guest runtime into the package (pip install . produces it),
copy the guest kernel config fragments beside it,
and record the commit the package was built from (matchlock/_build_info.py)."""

import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "src"))


def _commit() -> str:
    try:
        r = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


class BuildPyWithGuest(build_py):
    def run(self) -> None:
        super().run()
        from matchlock.guest_build import build_guest

        out = os.path.join(self.build_lib, "matchlock", "_guest", "matchlock-guest")
        build_guest(os.path.join(HERE, "guest"), out)
        # The guest kernel's config fragments and source patches, for `matchlock kernel build`.
        kdir = os.path.join(self.build_lib, "matchlock", "_guest", "kernel")
        os.makedirs(kdir, exist_ok=True)
        src = os.path.join(HERE, "guest", "kernel")
        for name in sorted(os.listdir(src)):
            if name.endswith((".config", ".patch")):
                shutil.copyfile(os.path.join(src, name), os.path.join(kdir, name))
        info = os.path.join(self.build_lib, "matchlock", "_build_info.py")
        with open(info, "w") as f:
            f.write(f'"""Written by setup.py at build time."""\n\nCOMMIT = "{_commit()}"\n')


setup(cmdclass={"build_py": BuildPyWithGuest})
