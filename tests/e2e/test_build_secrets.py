"""`matchlock build --secret`: a RUN step fetches from a private HTTPS index with a
secret; the index sees the real value, no layer of the result holds it.

The index is tests/e2e/_upstream.py in a test network namespace (own CA, trusted by the
host-side proxy through MATCHLOCK_UPSTREAM_CA), reached by name through --add-host. The
base image is debian:test (curl) from the local store.
"""

from __future__ import annotations

import gzip
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from matchlock.net.testing import write_test_pki
from tests.e2e.conftest import veth_netns

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
REAL = "sk-build-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    work = tmp_path_factory.mktemp("pkgindex")
    with veth_netns((2,)) as (ns, net):
        ip = f"{net}.2"
        ca, _, _ = write_test_pki(work, ["pkgs.test"])
        log = work / "upstream.jsonl"
        log.touch()
        cfg = {"log": str(log), "cert": str(work / "up-leaf.pem"),
               "key": str(work / "up-key.pem"), "https": [ip], "http": [], "raw": [],
               "udp": [], "dns": [ip, {}], "ready": str(work / "ready")}
        (work / "cfg.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable,
                                 str(HERE / "_upstream.py"), str(work / "cfg.json")],
                                stderr=open(work / "upstream.err", "wb"))  # noqa: SIM115
        try:
            deadline = time.monotonic() + 15
            while not (work / "ready").exists():
                assert proc.poll() is None, (work / "upstream.err").read_text()
                assert time.monotonic() < deadline, "index server did not start"
                time.sleep(0.05)
            yield {"ip": ip, "ca": ca, "log": log}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_build_secret_reaches_index_and_no_layer(ml, index, debian_image, tmp_path) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM debian:test\n"
        # The nonce keeps the RUN step out of the build cache: a cached step never runs.
        f"RUN --mount=type=secret,id=TOKEN echo run-{uuid.uuid4().hex} && "
        'curl -fsS -H "Authorization: Bearer $(cat /run/secrets/TOKEN)" '
        "https://pkgs.test/simple/pkg > /pkg.txt && cat /pkg.txt && "
        "echo placeholder-seen=$(cut -c1-15 /run/secrets/TOKEN)\n")
    p = ml("build", "--build-memory", "1024", "--build-cpus", "2", "-t", "e2e/secret:1",
           "--secret", "TOKEN@pkgs.test", "--add-host", f"pkgs.test:{index['ip']}",
           "--allow-private", index["ip"], str(tmp_path), timeout=1800,
           env={"TOKEN": REAL, "MATCHLOCK_UPSTREAM_CA": str(index["ca"])})
    err = p.stderr.decode()
    assert p.returncode == 0, err[-3000:]
    assert f"hello from {index['ip']}" in err, err
    assert "placeholder-seen=SANDBOX_SECRET_" in err, err  # the VM only had the placeholder
    assert REAL not in err and REAL not in p.stdout.decode()
    # The index got the real value (its own log), on the request the RUN step made.
    reqs = [json.loads(line) for line in index["log"].read_text().splitlines()]
    auth = [r["headers"].get("authorization") for r in reqs if r["kind"] == "req"]
    assert f"Bearer {REAL}" in auth, reqs
    # No blob of the stored result holds the real value; no layer holds the secret file
    # (the config's history may quote the RUN line, which names the path: not a leak).
    from matchlock.image import ImageStore

    out = tmp_path / "img.tar"
    with open(out, "wb") as f:
        ImageStore().export_oci("e2e/secret:1", f, "x")
    layers = 0
    with tarfile.open(out) as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.startswith("blobs/"):
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                if data[:2] == b"\x1f\x8b":
                    data = gzip.decompress(data)
                assert REAL.encode() not in data, m.name
                try:
                    with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                        files = [e.name for e in layer.getmembers() if not e.isdir()]
                except tarfile.TarError:
                    continue  # JSON: a manifest, index or config
                layers += 1
                # Buildah leaves the empty mount point run/secrets/ in the RUN layer.
                assert not any(n.lstrip("./").startswith("run/secrets/") for n in files), files
    assert layers >= 2
    r = ml("run", "--image", "e2e/secret:1", "--no-network", "cat", "/pkg.txt", timeout=300)
    assert r.stdout.decode().strip() == f"hello from {index['ip']} /simple/pkg"
