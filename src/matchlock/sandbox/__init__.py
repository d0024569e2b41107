"""The Sandbox: one VM from image to teardown."""

from matchlock.sandbox._command import ImageDefaults, compose_argv, compose_env
from matchlock.sandbox._exec_limits import check_exec_size
from matchlock.sandbox._ports import (
    Binding,
    PortForwarder,
    PortForwardError,
    PortSpec,
    PortSpecError,
    parse_addresses,
    parse_port_spec,
)
from matchlock.sandbox._sandbox import Sandbox, SandboxConfig

__all__ = [
    "Binding",
    "ImageDefaults",
    "PortForwardError",
    "PortForwarder",
    "PortSpec",
    "PortSpecError",
    "Sandbox",
    "SandboxConfig",
    "check_exec_size",
    "compose_argv",
    "compose_env",
    "parse_addresses",
    "parse_port_spec",
]
