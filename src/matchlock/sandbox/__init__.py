"""The Sandbox: one VM from image to teardown."""

from matchlock.sandbox._command import ImageDefaults, compose_argv, compose_env
from matchlock.sandbox._exec_limits import check_exec_size
from matchlock.sandbox._sandbox import Sandbox, SandboxConfig

__all__ = ["ImageDefaults", "Sandbox", "SandboxConfig", "check_exec_size", "compose_argv",
           "compose_env"]
