"""The Sandbox: one VM from image to teardown, with typed requests and results."""

from matchlock.sandbox._command import ImageDefaults, compose_argv, compose_env
from matchlock.sandbox._config import PortSpec, SandboxConfig
from matchlock.sandbox._exec import (
    ExecRequest,
    ExecResult,
    Process,
    VmDefaults,
    VmStopped,
    compose_request,
)
from matchlock.sandbox._sandbox import CONSOLE_LOG, SUPERVISOR_LOG, Sandbox

__all__ = [
    "CONSOLE_LOG",
    "SUPERVISOR_LOG",
    "ExecRequest",
    "ExecResult",
    "ImageDefaults",
    "PortSpec",
    "Process",
    "Sandbox",
    "SandboxConfig",
    "VmDefaults",
    "VmStopped",
    "compose_argv",
    "compose_env",
    "compose_request",
]
