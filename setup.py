"""Build hook: compile the static guest runtime into the package (pip install . produces it)."""

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))


class BuildPyWithGuest(build_py):
    def run(self) -> None:
        super().run()
        from matchlock.guest_build import build_guest

        here = os.path.dirname(os.path.abspath(__file__))
        out = os.path.join(self.build_lib, "matchlock", "_guest", "matchlock-guest")
        build_guest(os.path.join(here, "guest"), out)


setup(cmdclass={"build_py": BuildPyWithGuest})
