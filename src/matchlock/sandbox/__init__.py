"""The Sandbox: one VM from image to teardown, with typed requests and results.

Names load on first use (PEP 562), so a face that needs one helper (say the env parsing
in `_command`) does not pay for QEMU, the network stack and the channel."""

from __future__ import annotations

from matchlock._lazy import lazy_names

_WHERE = {
    "ImageDefaults": "_command", "compose_argv": "_command", "compose_env": "_command",
    "SandboxConfig": "_config", "check_exec_size": "_exec_limits",
    "Binding": "_portspec", "PortForwarder": "_ports", "PortForwardError": "_ports",
    "PortSpec": "_portspec", "PortSpecError": "_portspec", "parse_addresses": "_portspec",
    "parse_port_spec": "_portspec",
    "ExecRequest": "_exec", "ExecResult": "_exec", "Process": "_exec",
    "VmDefaults": "_exec", "VmStopped": "_exec", "compose_request": "_exec",
    "CONSOLE_LOG": "_launch", "SUPERVISOR_LOG": "_launch", "VmLaunch": "_launch",
    "Sandbox": "_sandbox",
}

__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE, globals())
