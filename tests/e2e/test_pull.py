"""Images from registries: Debian's docker-registry on 127.0.0.1, images pushed with skopeo.

What the registry served is read from its own access log. The images live in this module's
own store (MATCHLOCK_IMAGES_DIR), never in the user's `image ls`.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import matchlock_cmd
from tests.e2e._registry import Forwarder, Layout, Registry, TokenService, require_tools, tar_layer
from tests.e2e.conftest import busybox_rootfs_layer, debian_tarball

pytestmark = pytest.mark.e2e
BB_CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["cat", "/etc/marker"]}


def one_line_error(p) -> str:
    """The error of a failed command: one line, last; progress lines may come before it."""
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode != 0, p.stdout
    assert lines and lines[-1].startswith("error: "), lines
    assert [x for x in lines if "error" in x.lower()] == lines[-1:], lines
    assert "Traceback" not in p.stderr.decode()
    return lines[-1]


@pytest.fixture(scope="module")
def base_layer() -> bytes:
    return busybox_rootfs_layer()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pullstore")
    (d / "docker").mkdir()
    return {"MATCHLOCK_IMAGES_DIR": str(d / "images"), "DOCKER_CONFIG": str(d / "docker"),
            "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def mlp(ml, env, qemu_present):
    def run(*args: str, timeout: float = 300, extra: dict | None = None, check=False):
        return ml(*args, timeout=timeout, env={**env, **(extra or {})}, check=check)

    return run


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    require_tools()
    r = Registry(tmp_path_factory.mktemp("registry")).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return Layout(tmp_path_factory.mktemp("layout"))


def push_marker(registry: Registry, layout: Layout, base: bytes, repo: str, marker: str,
                config: dict | None = None, extra: dict | None = None) -> dict:
    """Push an image of two layers (busybox base + /etc/marker) to REPO; returns the
    manifest descriptor."""
    files = {"etc/marker": marker.encode() + b"\n", **(extra or {})}
    desc = layout.image([base, tar_layer(files)], config or BB_CONFIG)
    name = repo.replace("/", "-").replace(":", "-")
    layout.tag(desc, name)
    registry.push(f"oci:{layout.path}:{name}", repo)
    return desc


def layer_digests(layout: Layout, desc: dict) -> list[str]:
    m = json.loads((layout.path / "blobs/sha256" / desc["digest"][7:]).read_bytes())
    return [la["digest"] for la in m["layers"]]


# ---- pull and run ----------------------------------------------------------------------


def test_pull_then_run_and_warm_runs_stay_offline(mlp, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/single:1", "single-v1")
    ref = f"{registry.host}/e2e/single:1"
    p = mlp("pull", ref, check=True)
    out = p.stdout.decode()
    assert out.startswith(f"Pulling {ref}...\n") and "Digest: sha256:" in out and "Size: " in out
    err = p.stderr.decode()  # not a terminal: one plain line per layer
    assert "2 layer(s)" in err and err.count(": downloaded ") == 2, err
    mark = registry.mark()
    r = mlp("run", "--image", ref, check=True)  # image CMD: cat /etc/marker
    assert r.stdout == b"single-v1\n"
    assert registry.since(mark) == []  # a warm run never asks the registry
    again = mlp("pull", ref, check=True)
    assert b"is up to date" in again.stdout and registry.since(mark) == []
    ls = json.loads(mlp("image", "ls", "--json", check=True).stdout)
    [row] = [i for i in ls if i["tag"] == ref]
    assert row["source"] == "registry" and row["digest"].startswith("sha256:")
    assert row["platform"] == "linux/amd64"


def test_first_run_pulls_then_caches(mlp, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/auto:1", "auto")
    ref = f"{registry.host}/e2e/auto:1"
    mark = registry.mark()
    r = mlp("run", "--image", ref, "cat", "/etc/marker", check=True)
    assert r.stdout == b"auto\n"
    assert b"Built rootfs from " + ref.encode() in r.stderr
    assert any(p.endswith("/manifests/1") for _, p, _ in registry.since(mark))
    mark = registry.mark()
    r = mlp("run", "--image", ref, "cat", "/etc/marker", check=True)
    assert r.stdout == b"auto\n" and b"Built rootfs" not in r.stderr
    assert registry.since(mark) == []


def test_by_digest_and_local_tag(mlp, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/dig:1", "by-digest")
    out = mlp("pull", f"{registry.host}/e2e/dig:1", check=True).stdout.decode()
    digest = out.split("Digest: ")[1].split()[0]
    ref = f"{registry.host}/e2e/dig@{digest}"
    mark = registry.mark()
    p = mlp("pull", "-t", "mine/dig:v1", ref, check=True)
    assert b"Tagged: mine/dig:v1" in p.stdout
    # The image id is stored already: only the manifest and the config are asked for.
    assert [x.split("/")[-2] for _, x, _ in registry.since(mark)] == ["manifests", "blobs"]
    mark = registry.mark()
    r = mlp("run", "--image", "mine/dig:v1", "cat", "/etc/marker", check=True)
    assert r.stdout == b"by-digest\n" and registry.since(mark) == []
    ls = {i["tag"]: i for i in json.loads(mlp("image", "ls", "--json", check=True).stdout)}
    assert ls["mine/dig:v1"]["source"] == "tag" and ref in ls


@pytest.mark.parametrize("fmt", [None, "v2s2"])  # OCI index, docker manifest list
def test_multi_platform_index(mlp, registry, layout, base_layer, fmt):
    amd = layout.image([base_layer, tar_layer({"etc/marker": b"amd64\n"})], BB_CONFIG,
                       "amd64")
    # An "arm64" image we can still boot here: it tells us which one was chosen.
    arm = layout.image([base_layer, tar_layer({"etc/marker": b"arm64\n"})], BB_CONFIG,
                       "arm64")
    att = layout.image([tar_layer({"att": b"x"})], {}, "unknown")
    name = f"multi-{fmt}"
    layout.index([(att, {"os": "unknown", "architecture": "unknown"}),
                  (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                  (amd, {"os": "linux", "architecture": "amd64"})], name)
    repo = f"e2e/multi:{fmt or 'oci'}"
    registry.push(f"oci:{layout.path}:{name}", repo, all_=True, fmt=fmt)
    ref = f"{registry.host}/{repo}"
    assert mlp("run", "--image", ref, check=True).stdout == b"amd64\n"
    mark = registry.mark()
    p = mlp("pull", "--platform", "linux/arm64", ref, check=True)
    assert any("/blobs/" in x for _, x, _ in registry.since(mark))  # not the cached amd64
    assert mlp("run", "--image", ref, check=True).stdout == b"arm64\n"
    ls = {i["tag"]: i for i in json.loads(mlp("image", "ls", "--json", check=True).stdout)}
    assert ls[ref]["platform"] == "linux/arm64/v8"
    err = one_line_error(mlp("pull", "--platform", "linux/s390x", ref))
    assert "has no linux/s390x image" in err and "linux/amd64, linux/arm64/v8" in err
    assert p.returncode == 0


def test_run_pull_fetches_a_repushed_tag(mlp, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/moving:1", "first")
    ref = f"{registry.host}/e2e/moving:1"
    assert mlp("run", "--image", ref, check=True).stdout == b"first\n"
    push_marker(registry, layout, base_layer, "e2e/moving:1", "second")
    mark = registry.mark()
    assert mlp("run", "--image", ref, check=True).stdout == b"first\n"  # cached
    assert registry.since(mark) == []
    r = mlp("run", "--pull", "--image", ref, check=True)
    assert r.stdout == b"second\n"
    new = [x for _, x, _ in registry.since(mark) if "/blobs/" in x]
    assert len(new) == 2  # the new config and the new marker layer; the base is reused


def test_build_then_run_does_no_request_and_no_disk_build(mlp, registry, layout, base_layer,
                                                          env):
    push_marker(registry, layout, base_layer, "e2e/prebuilt:1", "prebuilt")
    ref = f"{registry.host}/e2e/prebuilt:1"
    b = mlp("build", ref, check=True)
    assert f"Built rootfs from {ref}".encode() in b.stdout
    disks = Path(env["MATCHLOCK_IMAGES_DIR"]) / "disks"
    before = {p.name: p.stat().st_mtime_ns for p in disks.iterdir()}
    mark = registry.mark()
    r = mlp("run", "--image", ref, check=True)
    assert r.stdout == b"prebuilt\n"
    assert registry.since(mark) == []
    assert b"Built rootfs" not in r.stderr and b"applying layer" not in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in disks.iterdir()} == before
    again = mlp("build", ref, check=True)
    assert b"already built" in again.stdout and registry.since(mark) == []


def test_debian_image_from_the_registry(mlp, registry):
    registry.push(f"docker-archive:{debian_tarball()}", "e2e/debian:bookworm")
    ref = f"{registry.host}/e2e/debian:bookworm"
    r = mlp("run", "--image", ref, "python3", "-c", "import ssl; print(ssl.OPENSSL_VERSION[:7])",
            timeout=600, check=True)
    assert r.stdout == b"OpenSSL\n"


# ---- the shared layer store ---------------------------------------------------------------


def test_second_image_downloads_only_its_new_layers(mlp, registry, layout, base_layer):
    # A base layer no earlier test pulled, shared by two images with different tops.
    fresh = f"base-{time.time_ns()}".encode()
    shared_base = tar_layer({"etc/fresh": fresh})
    c = layout.image([base_layer, shared_base, tar_layer({"etc/marker": b"c\n"})], BB_CONFIG)
    d = layout.image([base_layer, shared_base, tar_layer({"etc/marker": b"d\n"})], BB_CONFIG)
    layout.tag(c, "share-c")
    layout.tag(d, "share-d")
    registry.push(f"oci:{layout.path}:share-c", "e2e/share-c:1")
    registry.push(f"oci:{layout.path}:share-d", "e2e/share-d:1")
    _, shared, c_top = layer_digests(layout, c)
    _, shared_d, d_top = layer_digests(layout, d)
    assert shared == shared_d and c_top != d_top
    mlp("pull", f"{registry.host}/e2e/share-c:1", check=True)
    p = mlp("pull", f"{registry.host}/e2e/share-d:1", check=True)
    assert b"1 layer(s)" in p.stderr and b"2 already present" in p.stderr
    assert len(registry.blob_gets(shared)) == 1  # the shared layer came over the wire once
    assert len(registry.blob_gets(c_top)) == 1 and len(registry.blob_gets(d_top)) == 1
    r = mlp("run", "--image", f"{registry.host}/e2e/share-d:1", "cat", "/etc/fresh",
            "/etc/marker", check=True)
    assert r.stdout == fresh + b"d\n"


def store_state(env: dict) -> dict:
    root = Path(env["MATCHLOCK_IMAGES_DIR"])
    return {sub: sorted(p.name for p in (root / sub).iterdir())
            for sub in ("blobs/sha256", "disks", "tmp")}


def test_corrupt_blob_fails_naming_the_digest_and_changes_nothing(mlp, registry, layout,
                                                                 base_layer, env):
    desc = push_marker(registry, layout, base_layer, "e2e/corrupt:1", "corrupt")
    top = layer_digests(layout, desc)[1]
    data = registry.blob_file(top)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    before, ls = store_state(env), mlp("image", "ls", check=True).stdout
    err = one_line_error(mlp("pull", f"{registry.host}/e2e/corrupt:1"))
    assert top in err and "failed verification" in err and registry.host in err
    assert store_state(env) == before and mlp("image", "ls", check=True).stdout == ls


def test_killed_pull_registers_nothing_and_the_next_pull_succeeds(mlp, ml_env, env, registry,
                                                                  layout, base_layer):
    big = os.urandom(6 << 20)  # incompressible: the transfer is long enough to stall in
    push_marker(registry, layout, base_layer, "e2e/big:1", "big", extra={"big": big})
    fwd = Forwarder(registry.port, stall_after=3 << 20)
    try:
        ref = f"127.0.0.1:{fwd.port}/e2e/big:1"
        proc = subprocess.Popen([*matchlock_cmd(), "pull", ref], env={**ml_env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert fwd.stalled.wait(120), "the pull never got half way"
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert ref not in mlp("image", "ls", check=True).stdout.decode()
        leftover = store_state(env)["tmp"]
        assert leftover  # what the killed process staged, owned by nobody now
        fwd.release()
        p = mlp("pull", ref, check=True)
        assert b"Digest: " in p.stdout
        assert store_state(env)["tmp"] == []  # the dead pull's staging was swept
        r = mlp("run", "--image", ref, "sh", "-c", "wc -c < /big", check=True)
        assert r.stdout.strip() == str(len(big)).encode()
    finally:
        fwd.close()


def test_interrupted_pull_exits_cleanly(mlp, ml_env, env, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/sigint:1", "sigint",
                extra={"big": os.urandom(4 << 20)})
    fwd = Forwarder(registry.port, stall_after=2 << 20)
    proc = None
    try:
        ref = f"127.0.0.1:{fwd.port}/e2e/sigint:1"
        proc = subprocess.Popen([*matchlock_cmd(), "pull", ref], env={**ml_env, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert fwd.stalled.wait(120)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert err.decode().strip().splitlines()[-1] == "error: aborted"
        assert "Traceback" not in err.decode()
        assert ref not in mlp("image", "ls", check=True).stdout.decode()
        assert store_state(env)["tmp"] == []  # a clean exit removes its own staging
    finally:
        if proc is not None and proc.poll() is None:  # it ignored the signal: end it,
            proc.kill()  # or it holds its staging into the next test
            proc.wait()
        fwd.close()


def test_two_concurrent_pulls_of_one_image(mlp, ml_env, env, registry, layout, base_layer):
    desc = push_marker(registry, layout, base_layer, "e2e/race:1", "race",
                       extra={"pad": os.urandom(1 << 20)})
    ref = f"{registry.host}/e2e/race:1"
    procs = [subprocess.Popen([*matchlock_cmd(), "pull", ref], env={**ml_env, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    top = layer_digests(layout, desc)[1]
    assert len(registry.blob_gets(top)) == 1  # the second waited for the first
    assert store_state(env)["tmp"] == []
    assert mlp("run", "--image", ref, check=True).stdout == b"race\n"


def test_image_rm_while_a_vm_uses_the_image(mlp, ml_env, env, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/inuse:1", "still here")
    ref = f"{registry.host}/e2e/inuse:1"
    mlp("pull", ref, check=True)
    vm = subprocess.Popen(
        [*matchlock_cmd(), "run", "-i", "--image", ref, "sh", "-c",
         "echo ready; read x; cat /etc/marker"],
        env={**ml_env, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert vm.stdout.readline() == b"ready\n"
        assert mlp("image", "rm", ref, check=True).stdout == f"Removed {ref}\n".encode()
        assert ref not in mlp("image", "ls", check=True).stdout.decode()
        gc = mlp("image", "gc", check=True).stdout.decode()
        assert "1 still in use" in gc
        out, _ = vm.communicate(b"go\n", timeout=120)
        assert vm.returncode == 0 and out == b"still here\n"
    finally:
        if vm.poll() is None:
            vm.kill()
    gc = mlp("image", "gc", check=True).stdout.decode()
    assert "Removed 1 unreferenced disks" in gc


# ---- auth -----------------------------------------------------------------------------------


def write_docker_config(env: dict, cfg: dict) -> None:
    Path(env["DOCKER_CONFIG"], "config.json").write_text(json.dumps(cfg))


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture
def clean_docker_config(env):
    yield
    Path(env["DOCKER_CONFIG"], "config.json").unlink(missing_ok=True)


def test_basic_auth_registry(mlp, env, tmp_path, layout, base_layer, clean_docker_config):
    require_tools()
    hashed = bcrypt.hashpw(b"pw-bob", bcrypt.gensalt()).decode()
    (tmp_path / "htpasswd").write_text(f"bob:{hashed}\n")
    reg = Registry(tmp_path / "reg", auth={"htpasswd": {
        "realm": "mltest", "path": str(tmp_path / "htpasswd")}}).start()
    try:
        desc = layout.image([base_layer, tar_layer({"etc/marker": b"basic\n"})], BB_CONFIG)
        layout.tag(desc, "basic")
        reg.push(f"oci:{layout.path}:basic", "e2e/basic:1", creds="bob:pw-bob")
        ref = f"{reg.host}/e2e/basic:1"
        err = one_line_error(mlp("pull", ref))
        assert f"registry {reg.host} needs credentials" in err and "docker login" in err
        write_docker_config(env, {"auths": {reg.host: {"auth": b64("bob:wrong")}}})
        err = one_line_error(mlp("pull", ref))
        assert "rejected the credentials for bob" in err and "config.json" in err
        write_docker_config(env, {"auths": {f"http://{reg.host}": {"auth": b64("bob:pw-bob")}}})
        assert mlp("run", "--image", ref, check=True).stdout == b"basic\n"
        statuses = [s for _, p, s in reg.requests() if p.endswith("/manifests/1")]
        assert 401 in statuses and 200 in statuses  # challenged, then let in
    finally:
        reg.stop()


def test_bearer_token_registry(mlp, env, tmp_path, layout, base_layer, clean_docker_config):
    require_tools()
    tokens = TokenService(tmp_path / "tok", "alice", "pw-alice")
    reg = Registry(tmp_path / "reg", auth=tokens.registry_auth()).start()
    try:
        desc = layout.image([base_layer, tar_layer({"etc/marker": b"bearer\n"})], BB_CONFIG)
        layout.tag(desc, "bearer")
        reg.push(f"oci:{layout.path}:bearer", "e2e/bearer:1", creds="alice:pw-alice")
        ref = f"{reg.host}/e2e/bearer:1"
        tokens.requests.clear()
        err = one_line_error(mlp("pull", ref))  # anonymous: the token service says no
        assert f"registry {reg.host} needs credentials for" in err
        # Credentials through a credential helper, as `docker login` with one writes them.
        helper_dir = tmp_path / "bin"
        helper_dir.mkdir()
        helper = helper_dir / "docker-credential-mltest"
        helper.write_text("#!/bin/sh\nread server\n"
                          f'[ "$server" = "{reg.host}" ] || exit 1\n'
                          f"cat {tmp_path / 'secret.json'}\n")
        helper.chmod(0o755)
        path = f"{helper_dir}:{os.environ['PATH']}"
        (tmp_path / "secret.json").write_text(json.dumps({"Username": "alice",
                                                          "Secret": "nope"}))
        write_docker_config(env, {"credHelpers": {reg.host: "mltest"}})
        err = one_line_error(mlp("pull", ref, extra={"PATH": path}))
        assert "rejected the credentials for alice (from credential helper " \
               "docker-credential-mltest)" in err
        (tmp_path / "secret.json").write_text(json.dumps({"Username": "alice",
                                                          "Secret": "pw-alice"}))
        tokens.requests.clear()
        r = mlp("run", "--image", ref, extra={"PATH": path}, check=True)
        assert r.stdout == b"bearer\n"
        [req] = tokens.requests  # one token for the whole pull
        assert req["query"]["scope"] == ["repository:e2e/bearer:pull"]
        assert req["query"]["service"] == ["mltest-registry"]
        assert req["auth"] == "Basic " + b64("alice:pw-alice")
        assert any(s == 200 and p.endswith("/manifests/1") for _, p, s in reg.requests())
    finally:
        reg.stop()
        tokens.close()


# ---- errors ---------------------------------------------------------------------------------


def test_one_line_errors(mlp, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/errs:1", "x")
    err = one_line_error(mlp("pull", f"{registry.host}/e2e/nosuchrepo:1"))
    assert f"repository e2e/nosuchrepo not found on {registry.host}" in err
    assert "image import" in err
    err = one_line_error(mlp("pull", f"{registry.host}/e2e/errs:nosuchtag"))
    assert f"e2e/errs has no tag nosuchtag on {registry.host} (it has: 1)" in err
    dead = Registry(registry.root / "dead")  # a port nobody listens on
    t0 = time.monotonic()
    err = one_line_error(mlp("run", "--image", f"{dead.host}/e2e/errs:1", "true"))
    assert time.monotonic() - t0 < 30
    assert f"cannot reach registry {dead.host} (connection refused)" in err
    assert "matchlock image import" in err
    err = one_line_error(mlp("pull", "--platform", "linux", f"{registry.host}/e2e/errs:1"))
    assert "invalid platform" in err
    err = one_line_error(mlp("pull", "UPPER/case"))
    assert "invalid image reference" in err


def test_http_proxy_is_honoured(mlp, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/proxied:1", "proxied")
    proxy = Forwarder(registry.port)  # the registry answers absolute-form requests itself
    try:
        ref = f"{registry.host}/e2e/proxied:1"
        p = mlp("pull", ref, extra={"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}",
                                    "NO_PROXY": ""}, check=True)
        assert b"Digest:" in p.stdout and proxy.connections >= 1
        seen = proxy.connections
        mlp("pull", "--force", ref, extra={"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}",
                                           "NO_PROXY": "127.0.0.1"}, check=True)
        assert proxy.connections == seen  # NO_PROXY: straight to the registry
    finally:
        proxy.close()


def test_progress_quiet_prints_only_the_name(mlp, registry, layout, base_layer):
    push_marker(registry, layout, base_layer, "e2e/quiet:1", "q")
    ref = f"{registry.host}/e2e/quiet:1"
    p = mlp("pull", "--quiet", ref, check=True)
    assert p.stdout == f"{ref}\n".encode() and p.stderr == b""
