"""The Sandbox: one VM from image to teardown, with typed requests and results.

Names load on first use (PEP 562), so a face that needs one helper (say the env parsing
in `_command`) does not pay for QEMU, the network stack and the channel."""

from __future__ import annotations

from matchlock._lazy import lazy_names

_WHERE = {
    "ImageDefaults": "_command", "compose_argv": "_command", "compose_env": "_command",
    "SandboxConfig": "_config", "check_exec_size": "_exec_limits",
    "Binding": "_ports", "PortForwarder": "_ports", "PortForwardError": "_ports",
    "PortSpec": "_ports", "PortSpecError": "_ports", "parse_addresses": "_ports",
    "parse_port_spec": "_ports",
    "ExecRequest": "_exec", "ExecResult": "_exec", "Process": "_exec",
    "VmDefaults": "_exec", "VmStopped": "_exec", "compose_request": "_exec",
    "CONSOLE_LOG": "_sandbox", "SUPERVISOR_LOG": "_sandbox", "Sandbox": "_sandbox",
}

__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE, globals())
