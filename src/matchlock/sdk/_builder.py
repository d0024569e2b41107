"""`Sandbox`: the fluent builder of `CreateOptions` (every method of the reference
0.2.17 builder, plus `allow_private`)."""

from __future__ import annotations

import ipaddress

from matchlock.sdk._errors import MatchlockError
from matchlock.sdk._types import (
    CreateOptions,
    HostIPMapping,
    ImageConfig,
    MountConfig,
    NetworkInterceptionConfig,
    PortForward,
    Secret,
    VFSInterceptionConfig,
)


class Sandbox:
    """Fluent builder: `Sandbox("alpine:latest").allow_host("api.test").with_memory(1024)`.

    Every method returns the builder; `options()` returns the `CreateOptions` it built
    (the same object, so later calls keep changing it)."""

    def __init__(self, image: str) -> None:
        self._opts = CreateOptions(image=image)

    def options(self) -> CreateOptions:
        return self._opts

    # Machine

    def with_privileged(self) -> Sandbox:
        """Skip in-guest hardening (seccomp, capability drop, no_new_privs)."""
        self._opts.privileged = True
        return self

    def with_kernel(self, ref: str) -> Sandbox:
        """Guest kernel: "" (built-in), `file:///absolute/path`, or an OCI ref."""
        self._opts.kernel_ref = ref
        return self

    def with_cpus(self, cpus: float) -> Sandbox:
        self._opts.cpus = cpus
        return self

    def with_memory(self, mb: int) -> Sandbox:
        self._opts.memory_mb = mb
        return self

    def with_disk_size(self, mb: int) -> Sandbox:
        self._opts.disk_size_mb = mb
        return self

    def with_timeout(self, seconds: int) -> Sandbox:
        self._opts.timeout_seconds = seconds
        return self

    # Environment and image config

    def with_env(self, name: str, value: str) -> Sandbox:
        self._opts.env[name] = value
        return self

    def with_env_map(self, env: dict[str, str]) -> Sandbox:
        self._opts.env.update(env)
        return self

    def with_user(self, user: str) -> Sandbox:
        """Run commands as `uid`, `uid:gid` or a user name of the image."""
        self._image_config().user = user
        return self

    def with_entrypoint(self, *entrypoint: str) -> Sandbox:
        self._image_config().entrypoint = list(entrypoint)
        return self

    def with_image_config(self, config: ImageConfig) -> Sandbox:
        """Merge `config` into the image config: its non-empty fields win."""
        ic = self._image_config()
        if config.user:
            ic.user = config.user
        if config.working_dir:
            ic.working_dir = config.working_dir
        if config.entrypoint:
            ic.entrypoint = config.entrypoint
        if config.cmd:
            ic.cmd = config.cmd
        if config.env:
            ic.env = config.env
        return self

    def _image_config(self) -> ImageConfig:
        if self._opts.image_config is None:
            self._opts.image_config = ImageConfig()
        return self._opts.image_config

    # Network

    def allow_host(self, *hosts: str) -> Sandbox:
        """Allow egress to these host globs (`api.test`, `*.example.com`); the first one
        seals the network to the list."""
        self._opts.allowed_hosts.extend(hosts)
        return self

    def add_host(self, host: str, ip: str) -> Sandbox:
        """A static /etc/hosts entry in the guest."""
        self._opts.add_hosts.append(HostIPMapping(host=host, ip=ip))
        return self

    def block_private_ips(self) -> Sandbox:
        return self.with_block_private_ips(True)

    def with_block_private_ips(self, enabled: bool) -> Sandbox:
        self._opts.block_private_ips = enabled
        self._opts.block_private_ips_set = True
        return self

    def allow_private_ips(self) -> Sandbox:
        """Let the guest reach every private address (10/8, 192.168/16, 127/8, ...)."""
        return self.with_block_private_ips(False)

    def unset_block_private_ips(self) -> Sandbox:
        self._opts.block_private_ips = False
        self._opts.block_private_ips_set = False
        return self

    def allow_private(self, *addresses: str) -> Sandbox:
        """Extension: let the guest reach these private addresses or CIDRs
        (`"127.0.0.1"`, `"10.1.0.0/16"`) while every other private range stays blocked."""
        for raw in addresses:
            value = str(raw).strip()
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise MatchlockError(
                    f"invalid allow_private entry {raw!r}: expected an IP address or CIDR "
                    "(e.g. 127.0.0.1 or 10.0.0.0/8)") from None
            if value not in self._opts.allow_private:
                self._opts.allow_private.append(value)
        return self

    def with_network_mtu(self, mtu: int) -> Sandbox:
        self._opts.network_mtu = mtu
        return self

    def with_no_network(self) -> Sandbox:
        """No network interface at all."""
        self._opts.no_network = True
        return self

    def with_network_interception(
            self, config: NetworkInterceptionConfig | None = None) -> Sandbox:
        """Inspect HTTP(S) even without an allow-list or secrets; optional hook rules."""
        self._opts.force_interception = True
        self._opts.network_interception = config
        return self

    def with_dns_servers(self, *servers: str) -> Sandbox:
        self._opts.dns_servers.extend(servers)
        return self

    def with_hostname(self, hostname: str) -> Sandbox:
        self._opts.hostname = hostname
        return self

    def with_port_forward(self, local_port: int, remote_port: int) -> Sandbox:
        """Forward host `local_port` to guest `remote_port` once the VM is up."""
        self._opts.port_forwards.append(
            PortForward(local_port=local_port, remote_port=remote_port))
        return self

    def with_port_forward_addresses(self, *addresses: str) -> Sandbox:
        """Host addresses the port forwards bind (default 127.0.0.1)."""
        self._opts.port_forward_addresses.extend(addresses)
        return self

    # Secrets

    def add_secret(self, name: str, value: str, *hosts: str) -> Sandbox:
        """Expose `$name` in the guest as a placeholder; the host swaps in `value` on
        requests to `hosts` only."""
        self._opts.secrets.append(Secret(name=name, value=value, hosts=list(hosts)))
        return self

    def add_secret_with_placeholder(self, name: str, value: str, placeholder: str,
                                    *hosts: str) -> Sandbox:
        self._opts.secrets.append(
            Secret(name=name, value=value, hosts=list(hosts), placeholder=placeholder))
        return self

    # File system

    def with_workspace(self, path: str) -> Sandbox:
        self._opts.workspace = path
        return self

    def with_vfs_interception(self, config: VFSInterceptionConfig) -> Sandbox:
        self._opts.vfs_interception = config
        return self

    def mount(self, guest_path: str, config: MountConfig) -> Sandbox:
        self._opts.mounts[guest_path] = config
        return self

    def mount_host_dir(self, guest_path: str, host_path: str, *,
                       owner_uid: int | None = None,
                       owner_gid: int | None = None) -> Sandbox:
        return self.mount(guest_path, MountConfig(
            type="host_fs", host_path=host_path, owner_uid=owner_uid, owner_gid=owner_gid))

    def mount_host_dir_readonly(self, guest_path: str, host_path: str, *,
                                owner_uid: int | None = None,
                                owner_gid: int | None = None) -> Sandbox:
        return self.mount(guest_path, MountConfig(
            type="host_fs", host_path=host_path, readonly=True, owner_uid=owner_uid,
            owner_gid=owner_gid))

    def mount_memory(self, guest_path: str) -> Sandbox:
        return self.mount(guest_path, MountConfig(type="memory"))

    def mount_overlay(self, guest_path: str, host_path: str) -> Sandbox:
        """A copy-on-write snapshot of `host_path`: the guest's writes vanish with it."""
        return self.mount(guest_path, MountConfig(type="overlay", host_path=host_path))
