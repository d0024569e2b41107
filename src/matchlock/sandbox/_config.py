"""`SandboxConfig`: everything a VM is started with, validated without I/O.

`to_wire`/`from_wire` carry it, secret values included, from `run -d` to the supervisor
it starts (over a pipe: never a file or argv). `public_view` is what may be stored or
shown: secrets without their values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from matchlock.errors import ConfigError
from matchlock.net.types import HookRule, NetworkConfig, PrivateException, Secret
from matchlock.sandbox._portspec import PortSpec
from matchlock.vfs._spec import DiskSpec, MountConfig, MountSpec
from matchlock.vm.spec import MIN_MEMORY_MIB, vcpus_for

MAX_DISK_SIZE_MIB = 1 << 20  # 1 TiB: sparse, but a typo of a few zeros should be caught
MIN_DISK_SIZE_MIB = 64


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    image: str
    cpus: float = 1.0
    memory_mib: int = 512
    disk_size_mib: int = 5120
    hostname: str = ""
    no_network: bool = False
    kernel: str | None = None
    accel: str | None = None
    machine: str | None = None
    pull: bool = False  # ask the image's registry again even when the image is stored
    network: NetworkConfig = field(default_factory=NetworkConfig)
    env: tuple[tuple[str, str], ...] = ()  # the VM's own variables (every exec gets them)
    user: str | None = None  # every exec's default user (None: the image's USER)
    # image_config overrides (RPC create): None = the image's own value. `image_env`
    # replaces the image's whole env; entrypoint/cmd replace when not None.
    image_working_dir: str = ""
    image_entrypoint: tuple[str, ...] | None = None
    image_cmd: tuple[str, ...] | None = None
    image_env: tuple[tuple[str, str], ...] | None = None
    publish: tuple[PortSpec, ...] = ()
    addresses: tuple[str, ...] = ("127.0.0.1",)
    mounts: MountConfig = field(default_factory=MountConfig)  # workspace, -v, --disk

    @property
    def net(self) -> NetworkConfig:
        """The network config in force: `no_network` wins (mode "none")."""
        if self.no_network and self.network.mode != "none":
            return dataclasses.replace(self.network, mode="none")
        return self.network

    def validate(self) -> int:
        """Check everything that needs no I/O; returns the vCPU count."""
        vcpus = vcpus_for(self.cpus)
        if type(self.memory_mib) is not int or self.memory_mib < MIN_MEMORY_MIB:
            raise ConfigError("memory_mib",
                              f"must be at least {MIN_MEMORY_MIB} MB (got {self.memory_mib})")
        if type(self.disk_size_mib) is not int or \
                not MIN_DISK_SIZE_MIB <= self.disk_size_mib <= MAX_DISK_SIZE_MIB:
            raise ConfigError("disk_size_mib",
                              f"must be between {MIN_DISK_SIZE_MIB} and {MAX_DISK_SIZE_MIB} MB "
                              f"(got {self.disk_size_mib})")
        if self.hostname and (len(self.hostname) > 63 or not all(
            c.isalnum() or c in "-." for c in self.hostname
        )):
            raise ConfigError("hostname", f"{self.hostname!r} is invalid: use letters, "
                              "digits, '-' and '.'")
        return vcpus

    def public_view(self) -> dict[str, Any]:
        """What may be stored (state DB, config.json) or shown (get, inspect)."""
        return {
            "image": self.image, "cpus": self.cpus, "memory_mb": self.memory_mib,
            "disk_size_mb": self.disk_size_mib, "hostname": self.hostname,
            "no_network": self.no_network, "kernel": self.kernel, "accel": self.accel,
            "machine": self.machine, "network": self.net.public_view(),
            "env": dict(self.env), "user": self.user,
            "image_config": {"working_dir": self.image_working_dir,
                             "entrypoint": self.image_entrypoint, "cmd": self.image_cmd,
                             "env": None if self.image_env is None else dict(self.image_env)},
            "ports": [{"local_port": p.local, "remote_port": p.remote} for p in self.publish],
            "addresses": list(self.addresses),
            "mounts": mounts_view(self.mounts),
        }

    def to_wire(self) -> dict[str, Any]:
        """Everything, secret values included: for a pipe to the supervisor only."""
        d = dataclasses.asdict(self)
        d["env"] = [list(p) for p in self.env]
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SandboxConfig:
        net = dict(d.get("network") or {})
        net["allow_hosts"] = tuple(net.get("allow_hosts", ()))
        net["add_hosts"] = tuple(tuple(p) for p in net.get("add_hosts", ()))
        net["secrets"] = tuple(Secret(s["name"], s["value"], tuple(s["hosts"]), s["placeholder"])
                               for s in net.get("secrets", ()))
        net["dns_servers"] = tuple(net.get("dns_servers", ()))
        net["allow_private"] = tuple(PrivateException(**e) for e in net.get("allow_private", ()))
        net["hook_rules"] = tuple(HookRule.from_wire(r) for r in net.get("hook_rules", ()))
        kw = dict(d)
        kw["network"] = NetworkConfig(**net)
        kw["env"] = tuple((str(k), str(v)) for k, v in d.get("env", ()))
        for k in ("image_entrypoint", "image_cmd"):
            if d.get(k) is not None:
                kw[k] = tuple(d[k])
        if d.get("image_env") is not None:
            kw["image_env"] = tuple((str(k), str(v)) for k, v in d["image_env"])
        kw["publish"] = tuple(PortSpec(p["local"], p["remote"]) for p in d.get("publish", ()))
        kw["addresses"] = tuple(d.get("addresses", ("127.0.0.1",)))
        m = d.get("mounts") or {}
        kw["mounts"] = MountConfig(
            workspace=m.get("workspace", ""),
            mounts=tuple(MountSpec(**x) for x in m.get("mounts", ())),
            disks=tuple(DiskSpec(**x) for x in m.get("disks", ())))
        return cls(**kw)


def mounts_view(m: MountConfig) -> dict[str, Any]:
    """The workspace, -v mounts and disks as `get`/`inspect` show them."""
    return {
        "workspace": m.workspace,
        "volumes": [{"guest_path": v.guest_path, "type": v.type, "host_path": v.host_path,
                     "readonly": v.readonly} for v in m.mounts],
        "disks": [{"host_path": x.host_path, "guest_path": x.guest_path,
                   "readonly": x.readonly, "volume": x.volume} for x in m.disks],
    }
