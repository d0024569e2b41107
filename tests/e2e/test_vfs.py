"""Workspace and volumes end to end: real VMs, the guest's FUSE mount served by the host.

What the host directory holds afterwards is judged on the host (a manifest of paths,
modes, sizes and digests), never from what the guest printed alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import matchlock_cmd
from tests.e2e.conftest import NO_RESIDUE, residue

pytestmark = pytest.mark.e2e

BB = "matchlock/busybox"


def manifest(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def host_tree(root: Path) -> Path:
    (root / "src/lib").mkdir(parents=True)
    (root / "README").write_text("readme\n")
    (root / "src/main.c").write_text("int main(void) { return 0; }\n")
    (root / "src/lib/util.c").write_text("/* util */\n")
    (root / "data.bin").write_bytes(os.urandom(200_000))
    (root / "build.sh").write_text("#!/bin/sh\necho built\n")
    os.chmod(root / "build.sh", 0o755)
    os.symlink("README", root / "link")
    return root


def run(ml, *args: str, input: bytes | None = None, timeout: float = 300):
    p = ml("run", "--image", BB, *args, input=input, timeout=timeout)
    return p, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def test_snapshot_host_byte_identical_after_guest_edits(ml, qemu_present, tmp_path,
                                                        state_home):
    repo = host_tree(tmp_path / "repo")
    before = manifest(repo)
    script = r"""
set -e
cd /workspace/repo
echo edited >> README
printf 'XYZ' | dd of=data.bin bs=1 seek=100 conv=notrunc 2>/dev/null
truncate -s 5 src/main.c
rm src/lib/util.c
mv src/lib src/moved
mkdir -p new/deep && echo fresh > new/deep/file
chmod 700 build.sh
mv README README.old && echo replaced > README
ln README.old hard
rm link && ln -s /etc/passwd link
touch -d '2001-01-01 00:00' src/main.c
# the guest sees its own changes
grep -q edited README.old
test "$(cat README)" = replaced
test "$(wc -c < src/main.c)" -eq 5
test ! -e src/moved/util.c
test "$(cat new/deep/file)" = fresh
test "$(readlink link)" = /etc/passwd
test "$(stat -c %h hard)" -eq 2
echo GUEST-OK
"""
    p, out, err = run(ml, "-v", f"{repo}:/workspace/repo", "--", "sh", "-c", script)
    assert p.returncode == 0, err
    assert "GUEST-OK" in out
    assert manifest(repo) == before, "the snapshot wrote to the host directory"
    assert residue(state_home) == NO_RESIDUE


def test_snapshot_mount_time_does_not_grow_with_tree(ml, qemu_present, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    big = tmp_path / "big"
    big.mkdir()
    for i in range(8):  # 2 GiB of allocated data, plus many small files
        with open(big / f"blob{i}", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 256 << 20)
    for i in range(3000):
        (big / f"small{i}").write_bytes(b"x" * 100)

    def timed(src: Path) -> float:
        tpath = tmp_path / f"t-{src.name}.json"
        p = ml("run", "--image", BB, "-v", f"{src}:/workspace/src", "--", "ls",
               "/workspace/src", env={"MATCHLOCK_TIMINGS": str(tpath)})
        assert p.returncode == 0, p.stderr
        t = json.loads(tpath.read_text())
        return t["ready"]

    t_empty = timed(empty)
    t_big = timed(big)
    assert t_big < t_empty * 1.5 + 0.5, f"2 GiB tree: {t_big:.2f}s vs empty {t_empty:.2f}s"


def test_host_fs_writes_land_on_host_with_owner(ml, qemu_present, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old").write_text("old\n")
    script = r"""
set -e
cd /workspace/out
echo hello > made.txt
echo more >> made.txt
mkdir d && echo inner > d/f
mv old renamed
stat -c '%u:%g' renamed made.txt
"""
    p, out, err = run(ml, "-v", f"{out_dir}:/workspace/out:host_fs,uid=1000,gid=1001", "--",
                      "sh", "-c", script)
    assert p.returncode == 0, err
    # host files show the mount's owner; a file guest root made is root's
    assert out.split() == ["1000:1001", "0:0"]
    assert (out_dir / "made.txt").read_text() == "hello\nmore\n"
    assert (out_dir / "d/f").read_text() == "inner\n"
    assert (out_dir / "renamed").read_text() == "old\n" and not (out_dir / "old").exists()


def test_readonly_refuses_root_and_cannot_be_lifted(ml, qemu_present, tmp_path):
    data = host_tree(tmp_path / "data")
    before = manifest(data)
    script = r"""
cd /workspace/data
cat README > /dev/null && echo READ-OK
try() {
  if "$@" 2>/tmp/err; then echo "ALLOWED: $*"; else echo "refused: $* :: $(cat /tmp/err)"; fi
}
try sh -c 'echo x > README'
try sh -c 'echo x >> README'
try sh -c 'echo x > newfile'
try truncate -s 0 README
try chmod 777 README
try chown 1:1 README
try touch README
try rm README
try mv README moved
try mv src/main.c README
try ln README hard
try ln -s README sl
try mkdir nd
try rmdir src/lib
mount -o remount,rw /workspace 2>/dev/null; echo remount-rc=$?
try sh -c 'echo x > README'
echo x > /tmp/control && echo CONTROL-OK
"""
    p, out, err = run(ml, "-v", f"{data}:/workspace/data:ro", "--", "sh", "-c", script)
    assert p.returncode == 0, err
    assert "READ-OK" in out and "CONTROL-OK" in out
    assert "ALLOWED" not in out, out
    refusals = [ln for ln in out.splitlines() if ln.startswith("refused:")]
    assert len(refusals) == 15
    assert all("Read-only file system" in ln for ln in refusals), out
    assert manifest(data) == before


def test_escapes_fail(ml, ml_env, qemu_present, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = "HOST-SECRET-" + os.urandom(8).hex()
    (outside / "secret").write_text(marker)
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir/f").write_text("inside\n")
    os.symlink(str(outside), tree / "out")
    os.symlink(str(outside / "secret"), tree / "sec")
    os.symlink("../outside/secret", tree / "rel")
    shadow = Path("/etc/shadow")
    shadow_before = hashlib.sha256(shadow.read_bytes()).hexdigest() if shadow.exists() else ""
    script = r"""
cd /workspace/t
cat dir/f
cat sec out/secret rel 2>&1
cat ../../../$(echo "$OUTSIDE" | sed 's#^/##')/secret 2>&1
ls out/ 2>&1
ln -s /etc/shadow x && echo pwned > x; echo wrote-through=$?
ls -la /workspace/t/ > /dev/null
echo waiting
read go
cd /workspace/t/dir 2>&1
echo planted > /workspace/t/dir/planted 2>&1; echo plant-rc=$?
cat /workspace/t/dir/secret 2>&1
echo DONE
"""
    proc = subprocess.Popen(
        [*matchlock_cmd(), "run", "-i", "--image", BB, "-e", f"OUTSIDE={outside}",
         "-v", f"{tree}:/workspace/t:host_fs", "--", "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=ml_env,
    )
    assert proc.stdout is not None and proc.stdin is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.decode(errors="replace"))
        if line.strip() == b"waiting":
            break
    # the guest looked the directory up; now it becomes a symlink to outside
    os.rename(tree / "dir", tree / "dir.real")
    os.symlink(str(outside), tree / "dir")
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    rest, err = proc.communicate(timeout=300)
    out = "".join(lines) + rest.decode(errors="replace")
    print(out)
    assert proc.returncode == 0, err
    assert out.startswith("inside\n"), out  # positive control
    assert "DONE" in out
    assert marker not in out, "host file read through a symlink"
    assert sorted(os.listdir(outside)) == ["secret"], "something was planted outside"
    assert (outside / "secret").read_text() == marker
    if shadow_before:
        assert hashlib.sha256(shadow.read_bytes()).hexdigest() == shadow_before
    assert os.readlink(tree / "x") == "/etc/shadow"  # the link is data on the host


def test_big_file_and_posix_on_host_fs(ml, qemu_present, tmp_path):
    chunk = os.urandom(64 << 20)
    src = tmp_path / "src"
    src.mkdir()
    (src / "chunk").write_bytes(chunk)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    want = hashlib.sha256(chunk * 16).hexdigest()
    script = r"""
set -e
cd /workspace/out
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do cat /workspace/src/chunk; done > big
sha256sum big | cut -d' ' -f1
echo 0123456789 > t && truncate -s 4 t && truncate -s 8 t
echo first > a && echo second > b && mv b a
echo linked > h1 && ln h1 h2 && echo more >> h2
printf '#!/bin/sh\necho script-ran\n' > s.sh && chmod +x s.sh && ./s.sh
"""
    t0 = time.monotonic()
    p, out, err = run(ml, "--memory", "1024", "-v", f"{src}:/workspace/src:ro",
                      "-v", f"{out_dir}:/workspace/out:host_fs", "--", "sh", "-c", script,
                      timeout=900)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, err
    lines = out.split()
    assert lines[0] == want, "the guest read back other bytes"
    assert "script-ran" in lines
    h = hashlib.sha256()
    with open(out_dir / "big", "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    assert h.hexdigest() == want, "the host got other bytes"
    assert (out_dir / "t").read_bytes() == b"0123\0\0\0\0"
    assert (out_dir / "a").read_text() == "second\n"
    assert (out_dir / "h1").read_text() == "linked\nmore\n"
    assert os.stat(out_dir / "h1").st_ino == os.stat(out_dir / "h2").st_ino
    assert os.stat(out_dir / "s.sh").st_mode & 0o111
    print(f"1 GiB write+read on host_fs: {elapsed:.1f}s wall")


def test_tarball_workload_10k_files(ml, qemu_present, tmp_path):
    """Unpack 10,000 files into a snapshot mount, check every digest, compress it all
    (a build with the image's tools), delete it all; the host directory stays empty."""
    buf = io.BytesIO()
    digests = {}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(10_000):
            name = f"proj/d{i // 100:03}/f{i:05}.txt"
            data = f"file {i}\n".encode() * (1 + i % 7)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(ti, io.BytesIO(data))
            digests[name] = hashlib.sha256(data).hexdigest()
    src = tmp_path / "tarballs"
    src.mkdir()
    (src / "proj.tar").write_bytes(buf.getvalue())
    work = tmp_path / "work"
    work.mkdir()
    expected = "".join(f"{d}  {n}\n" for n, d in sorted(digests.items()))
    script = r"""
set -e
cd /workspace/w
tar xf /workspace/t/proj.tar
find proj -type f | wc -l
find proj -type f | sort | xargs sha256sum > /tmp/sums
sha256sum /tmp/sums | cut -d' ' -f1
tar czf proj.tgz proj && gzip -t proj.tgz && echo BUILD-OK
rm -rf proj proj.tgz
ls -A | wc -l
"""
    p, out, err = run(ml, "-v", f"{src}:/workspace/t:ro", "-v", f"{work}:/workspace/w",
                      "--", "sh", "-c", script, timeout=900)
    assert p.returncode == 0, err
    lines = out.split()
    assert lines[0] == "10000"
    assert lines[1] == hashlib.sha256(expected.encode()).hexdigest(), "unpacked bytes differ"
    assert lines[2] == "BUILD-OK" and lines[3] == "0"
    assert os.listdir(work) == []


def test_sqlite_on_host_fs(ml, debian_image, tmp_path):
    import sqlite3

    db_dir = tmp_path / "db"
    db_dir.mkdir()
    code = (
        "import sqlite3\n"
        "db = sqlite3.connect('/workspace/db/t.db')\n"
        "db.execute('create table t (k integer primary key, v text)')\n"
        "with db:\n"
        "    db.executemany('insert into t (v) values (?)', [(str(i),) for i in range(5000)])\n"
        "db.execute('pragma journal_mode=wal')\n"
        "with db:\n"
        "    db.execute(\"insert into t (v) values ('wal')\")\n"
        "print(db.execute('pragma integrity_check').fetchone()[0])\n"
        "db.close()\n"
    )
    p = ml("run", "--image", debian_image, "-v", f"{db_dir}:/workspace/db:host_fs", "--",
           "python3", "-c", code, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == b"ok"
    db = sqlite3.connect(db_dir / "t.db")  # the host reads what the guest wrote
    assert db.execute("select count(*) from t").fetchone() == (5001,)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()


def test_memory_workspace(ml, qemu_present):
    p, out, err = run(ml, "--workspace", "/workspace", "--", "sh", "-c",
                      "pwd; echo x > f && cat f && df -k . | tail -1 | wc -w")
    assert p.returncode == 0, err
    assert out.split()[:2] == ["/workspace", "x"]


def test_named_volume_persists_and_locks(ml, ml_env, qemu_present, tmp_path):
    p = ml("volume", "create", "cache", "--size", "64", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["name"] == "cache" and info["size"] == "64.0 MB"
    holder = None
    try:
        p, out, err = run(ml, "--disk", "@cache:/cache", "--", "sh", "-c",
                          "echo persisted > /cache/f && sync")
        assert p.returncode == 0, err
        holder = subprocess.Popen(
            [*matchlock_cmd(), "run", "-i", "--image", BB, "--disk", "@cache:/cache", "--",
             "sh", "-c", "cat /cache/f; read x"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=ml_env)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == b"persisted\n"  # the second VM sees the data
        # a third VM wants it read-write while the second holds it
        p2 = ml("run", "--image", BB, "--disk", "@cache:/cache", "--", "true")
        assert p2.returncode != 0
        msg = [ln for ln in p2.stderr.decode().splitlines() if ln.startswith("error:")]
        assert len(msg) == 1 and "in use by another VM" in msg[0], p2.stderr
        p3 = ml("volume", "rm", "cache")
        assert p3.returncode != 0 and b"in use" in p3.stderr
        holder.stdin.write(b"\n")
        holder.stdin.close()
        assert holder.wait(120) == 0
        p = ml("volume", "cp", "cache", "cache2")
        assert p.returncode == 0 and p.stdout == b"Copied volume cache to cache2\n"
        ls = json.loads(ml("volume", "ls", "--json").stdout)
        assert sorted(v["name"] for v in ls) == ["cache", "cache2"]
        p, out, err = run(ml, "--disk", "@cache2:/c:ro", "--", "cat", "/c/f")
        assert p.returncode == 0 and out == "persisted\n", err
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        for name in ("cache", "cache2"):
            ml("volume", "rm", name)
    assert json.loads(ml("volume", "ls", "--json").stdout) == []


@pytest.mark.parametrize("args,needle", [
    (["-v", "/no/such/dir:/workspace/x"], "does not exist"),
    (["-v", "{tmp}:/workspace/a", "-v", "{tmp}:/workspace/a/b"], "overlap"),
    (["-v", "{tmp}:/etc/x"], "outside the workspace"),
    (["-v", "{tmp}:/workspace/x:sideways"], "unknown mode"),
    (["-v", "{tmp}"], "HOST:GUEST"),
    (["--workspace", "/proc"], "cannot be /proc"),
    (["--disk", "/no/such.ext4:/data"], "does not exist"),
    (["--disk", "@no/slash:/data"], "invalid"),
    (["-v", "{tmp}:/workspace/x", "--disk", "{img}:/workspace/d"], "shadow"),
])
def test_bad_mount_input(ml, tmp_path, state_home, args, needle):
    img = tmp_path / "img.ext4"
    img.write_bytes(b"")
    args = [a.format(tmp=tmp_path, img=img) for a in args]
    p = ml("run", "--image", BB, *args, "true")
    err = p.stderr.decode()
    assert p.returncode != 0
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert residue(state_home)["vm_dirs"] == []


def test_bad_volume_names(ml):
    for args in (["create", "a/b"], ["create", "../x"], ["rm", "no-such"],
                 ["cp", "no-such", "x"]):
        p = ml("volume", *args)
        err = p.stderr.decode()
        assert p.returncode != 0 and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
