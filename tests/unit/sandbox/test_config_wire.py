"""SandboxConfig crosses a pipe to a detached supervisor as JSON: nothing may be lost."""

import json

from matchlock.net.types import NetworkConfig, PrivateException, Secret
from matchlock.sandbox import PortSpec, SandboxConfig


def test_wire_round_trip_keeps_every_field():
    cfg = SandboxConfig(
        image="img", cpus=2.0, memory_mib=1024, hostname="h",
        network=NetworkConfig(
            mode="intercept", allow_hosts=("api.test",), add_hosts=(("api.test", "198.18.0.5"),),
            secrets=(Secret("K", "v", ("api.test",), "SANDBOX_SECRET_" + "0" * 32),),
            dns_servers=("198.18.0.5",),
            allow_private=(PrivateException(net="198.18.0.5/32"),
                           PrivateException(host="db.internal", port=5432)),
            allow_private_ranges=True),
        env=(("A", "1"),), user="app", publish=(PortSpec(8080, 80),),
        addresses=("127.0.0.1", "::1"))
    assert SandboxConfig.from_wire(json.loads(json.dumps(cfg.to_wire()))) == cfg
