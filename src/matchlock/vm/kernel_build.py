"""Build matchlock's own guest kernel from Debian's ``linux-source-6.1`` package.

Recipe (all in a staging dir under ``cache_dir()/kernels``)::

    tar xf /usr/src/linux-source-6.1.tar.xz
    patch -p1 < guest/kernel/{common,<arch>}-*.patch   (name order; in the config digest)
    make ARCH=<arch> tinyconfig
    cat guest/kernel/common.config guest/kernel/<arch>.config >> .config   (later lines win)
    make ARCH=<arch> olddefconfig
    nice make ARCH=<arch> -j<cores> vmlinux        (arm64: Image)

The result (``vmlinux`` or ``Image``, the final ``config``, ``kernel.json``) is renamed into
``kernels/matchlock-<source version>-<config digest>/``: the name *is* the cache key, so a
second build of the same source and config is a lookup. One builder at a time (``flock``
on ``kernels/.build.lock``); the others wait and then find the finished build. The source
tree (1.3 GB unpacked) is deleted afterwards.

For tests, env ``MATCHLOCK_KERNEL_SOURCE`` names another source tarball (its version is
then its file name, size and mtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from matchlock._log import get_logger
from matchlock.errors import DependencyError, MatchlockError, NotFoundError
from matchlock.paths import cache_dir
from matchlock.vm.accel import host_machine

log = get_logger(__name__)

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
ENV_SOURCE = "MATCHLOCK_KERNEL_SOURCE"
BUILD_PREFIX = "matchlock-"
# A build with this patch takes `lapic_bus_khz=` (no APIC timer calibration at boot).
APIC_BUS_PATCH = "x86_64-apic-bus-khz.patch"
_RECIPE = 1  # bump when the recipe above changes: it is part of the cache key

# In a source checkout the fragments sit in guest/kernel; an installed package carries a
# copy (setup.py puts it there).
_SOURCE_CONFIG_DIR = Path(__file__).resolve().parents[3] / "guest" / "kernel"
_PACKAGED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "_guest" / "kernel"

# Commands the build runs, and the Debian package of each (checked before any work).
_TOOLS = {"make": "make", "gcc": "gcc", "ld": "binutils", "bc": "bc", "flex": "flex",
          "bison": "bison", "tar": "tar", "xz": "xz-utils", "perl": "perl-base",
          "nice": "coreutils", "patch": "patch"}
# Headers the host-side build tools need (objtool: libelf; x86 only).
_HEADERS = {"gelf.h": "libelf-dev"}

# make's progress lines ("  CC      kernel/fork.o"): one per object, roughly.
_STEP = re.compile(rb"^\s+(CC|AS|AR|LD|HOSTCC|HOSTLD|GEN|CHK|UPD|SYSHDR|SYSTBL|WRAP|"
                   rb"MKELF|OBJCOPY|VDSO\w*|RELOCS|CPUSTR|POLICY|COPY)\s+\S")
# A first build's estimate of those lines (2256 for x86_64, this config); later builds use the
# count their predecessor recorded.
_DEFAULT_STEPS = 2300


@dataclass(frozen=True, slots=True)
class Arch:
    name: str  # our name for it, and the config fragment's: "x86_64" | "arm64"
    make_arch: str  # make ARCH=
    target: str  # make target
    image: str  # the built file, relative to the tree
    out: str  # its name in the cache dir


ARCHES = {
    "x86_64": Arch("x86_64", "x86_64", "vmlinux", "vmlinux", "vmlinux"),
    "arm64": Arch("arm64", "arm64", "Image", "arch/arm64/boot/Image", "Image"),
}


def host_arch() -> Arch:
    m = host_machine().lower()
    name = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(m)
    if name is None:
        raise DependencyError(f"no matchlock kernel config for architecture {host_machine()}")
    return ARCHES[name]


# --------------------------------------------------------------------------- inputs


def config_dir() -> Path:
    for d in (_SOURCE_CONFIG_DIR, _PACKAGED_CONFIG_DIR):
        if (d / "common.config").is_file():
            return d
    raise DependencyError(
        "the guest kernel config (guest/kernel/*.config) is missing from this installation; "
        "reinstall matchlock (pip install .)"
    )


def config_fragments(arch: Arch) -> list[Path]:
    d = config_dir()
    frags = [d / "common.config", d / f"{arch.name}.config"]
    for f in frags:
        if not f.is_file():
            raise DependencyError(f"kernel config fragment {f} is missing; reinstall matchlock")
    return frags


def source_patches(arch: Arch) -> list[Path]:
    """Our changes to Debian's source, applied in name order: `common-*.patch` and
    `<arch>-*.patch` beside the config fragments (`patch -p1` from the source root)."""
    d = config_dir()
    return sorted((p for p in d.glob("*.patch")
                   if p.name.startswith(("common-", f"{arch.name}-"))), key=lambda p: p.name)


def config_digest(arch: Arch) -> str:
    """Digest of everything that decides the kernel besides its source: recipe, config
    and patches."""
    h = hashlib.sha256(f"matchlock-kernel recipe={_RECIPE} arch={arch.name}\n".encode())
    for f in [*config_fragments(arch), *source_patches(arch)]:
        h.update(f.name.encode() + b"\n")
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Source:
    tarball: Path
    version: str  # the package version, e.g. "6.1.192-3"
    package: str


def find_source() -> Source:
    env = os.environ.get(ENV_SOURCE)
    if env:
        p = Path(env)
        if not p.is_file():
            raise NotFoundError(
                f"kernel source {env} (from {ENV_SOURCE}) does not exist; fix the path or "
                f"unset it to use Debian's {SOURCE_PACKAGE}"
            )
        st = p.stat()
        tag = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return Source(p, f"{_strip_ext(p.name)}+{tag.hexdigest()[:8]}", p.name)
    if not SOURCE_TARBALL.is_file():
        raise DependencyError(
            f"cannot build the guest kernel: {SOURCE_TARBALL} is missing; install Debian's "
            f"{SOURCE_PACKAGE} package (apt-get install {SOURCE_PACKAGE})"
        )
    return Source(SOURCE_TARBALL, _package_version(), SOURCE_PACKAGE)


def _strip_ext(name: str) -> str:
    return re.sub(r"\.tar(\.\w+)?$", "", name)


def _package_version() -> str:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    # Not installed through dpkg (copied in by hand): the tarball's size and time name it.
    st = SOURCE_TARBALL.stat()
    return f"unpackaged+{st.st_size:x}{st.st_mtime_ns:x}"[:32]


def build_name(source: Source, digest: str) -> str:
    return f"{BUILD_PREFIX}{source.version}-{digest}".replace("/", "_").replace(":", "_")


def missing_build_deps(arch: Arch) -> list[str]:
    """Debian packages whose tools or headers the build needs and this host lacks."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    pkgs: list[str] = []
    for tool, pkg in _TOOLS.items():
        if shutil.which(tool, path=path) is None and pkg not in pkgs:
            pkgs.append(pkg)
    if arch.name == "x86_64":
        for header, pkg in _HEADERS.items():
            if not any(Path(d, header).is_file()
                       for d in ("/usr/include", f"/usr/include/{host_machine()}-linux-gnu")):
                pkgs.append(pkg)
    return pkgs


# --------------------------------------------------------------------------- progress


class BuildProgress:
    """What a build reports. The default reports nothing."""

    def phase(self, text: str) -> None:
        """A new stage ("Unpacking…", "Compiling…")."""

    def steps(self, done: int, total: int) -> None:
        """Compilation progress: `done` of about `total` steps (total may be exceeded)."""

    def message(self, text: str) -> None:
        """A line worth showing (a wait, a warning)."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    name: str
    path: Path  # the kernel's cache dir
    image: Path
    cached: bool
    seconds: float
    dropped: tuple[str, ...] = ()  # options asked for that olddefconfig did not keep


# --------------------------------------------------------------------------- build


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def build_kernel(progress: BuildProgress | None = None, jobs: int | None = None,
                 force: bool = False) -> BuildResult:
    """Build (or find in the cache) the kernel for this host's architecture."""
    progress = progress or BuildProgress()
    t0 = time.monotonic()
    arch = host_arch()
    digest = config_digest(arch)
    patches = source_patches(arch)  # once: what is applied is what kernel.json lists
    source = find_source()
    name = build_name(source, digest)
    root = kernels_dir()
    final = root / name
    if not force and _complete(final, arch):
        return BuildResult(name, final, final / arch.out, True, time.monotonic() - t0)
    missing = missing_build_deps(arch)
    if missing:
        raise DependencyError(
            f"cannot build the guest kernel: missing {', '.join(missing)} "
            f"(apt-get install {' '.join(missing)})"
        )
    with _build_lock(root / ".build.lock", progress):
        if not force and _complete(final, arch):  # another process built it meanwhile
            return BuildResult(name, final, final / arch.out, True, time.monotonic() - t0)
        for stale in root.glob(".build-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        import tempfile  # not at the top: `run` starts without it

        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            dropped, steps = _build_in(staging, source, arch, patches, jobs, progress,
                                       _expected_steps(root, arch))
            tree = staging / "out"
            meta = {
                "format": 1, "kind": "matchlock", "name": name, "arch": arch.name,
                "version": _release(staging / "src"), "source": source.package,
                "source_version": source.version, "config_digest": digest,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 1), "steps": steps,
                "patches": [p.name for p in patches],
            }
            (tree / "kernel.json").write_text(json.dumps(meta, indent=1) + "\n")
            if final.exists():  # a forced rebuild, or an unusable leftover
                old = root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tree, final)
        finally:
            progress.phase("Cleaning up the source tree…")
            shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(name, final, final / arch.out, False, time.monotonic() - t0,
                       tuple(dropped))


def _complete(d: Path, arch: Arch) -> bool:
    try:
        meta = json.loads((d / "kernel.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("kind") == "matchlock" and (d / arch.out).is_file()


def _expected_steps(root: Path, arch: Arch) -> int:
    best = 0
    for meta_path in root.glob(f"{BUILD_PREFIX}*/kernel.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("arch") == arch.name and isinstance(meta.get("steps"), int):
            best = max(best, meta["steps"])
    return best or _DEFAULT_STEPS


@contextmanager
def _build_lock(path: Path, progress: BuildProgress) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            progress.message(f"Waiting for another kernel build ({holder}) to finish…")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_in(staging: Path, source: Source, arch: Arch, patches: list[Path],
              jobs: int | None, progress: BuildProgress,
              expected: int) -> tuple[list[str], int]:
    logf = staging / "build.log"
    src = staging / "src"
    src.mkdir()
    progress.phase(f"Unpacking {source.package} {source.version} "
                   f"({source.tarball.stat().st_size / 1e6:.0f} MB)…")
    _run(["tar", "-xf", str(source.tarball), "-C", str(src), "--strip-components=1"],
         logf, "unpacking the kernel source")
    for p in patches:
        _run(["patch", "-p1", "--forward", "--batch", "-d", str(src), "-i", str(p)],
             logf, f"applying {p.name}")
    make = ["make", "-C", str(src), f"ARCH={arch.make_arch}",
            "KBUILD_BUILD_USER=matchlock", "KBUILD_BUILD_HOST=matchlock"]
    progress.phase("Configuring (tinyconfig + guest/kernel fragments)…")
    _run([*make, "tinyconfig"], logf, "make tinyconfig")
    frags = config_fragments(arch)
    with open(src / ".config", "a") as cfg:
        for f in frags:
            cfg.write(f"\n# ---- {f.name}\n")
            cfg.write(f.read_text())
    _run([*make, "olddefconfig"], logf, "make olddefconfig")
    dropped = unmet_options(src / ".config", frags)
    for opt in dropped:
        log.warning("kernel config: %s did not stick (unmet dependency)", opt)
    n = jobs or os.cpu_count() or 1
    progress.phase(f"Compiling {arch.target} ({n} jobs)…")
    steps = _compile(["nice", "-n", "10", *make, f"-j{n}", arch.target], logf, progress,
                     expected)
    out = staging / "out"
    out.mkdir()
    built = src / arch.image
    if not built.is_file():
        raise MatchlockError(f"kernel build produced no {arch.image}; see {_keep_log(logf)}")
    shutil.copyfile(built, out / arch.out)
    shutil.copyfile(src / ".config", out / "config")
    return dropped, steps


def _release(src: Path) -> str:
    try:
        return (src / "include/config/kernel.release").read_text().strip()
    except OSError:
        return ""


def _keep_log(logf: Path) -> Path:
    """Copy a failed build's log out of the staging dir (which is deleted) and name it."""
    kept = kernels_dir() / "last-build.log"
    try:
        shutil.copyfile(logf, kept)
    except OSError:
        return logf
    return kept


def _fail(what: str, logf: Path) -> MatchlockError:
    try:
        lines = logf.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    # The first error is the cause; make's own "*** [target] Error 2" lines only echo it.
    wrapper = re.compile(r"^make(\[\d+\])?: \*\*\* .*Error \d+")
    errs = [ln.strip() for ln in lines
            if re.search(r"\berror\b|\*\*\*", ln, re.I) and not wrapper.match(ln)]
    rest = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("$ ")]
    why = errs[0] if errs else (rest or ["no output"])[-1]
    return MatchlockError(f"kernel build failed in {what}: {why[:300]} "
                          f"(full log: {_keep_log(logf)})")


def _run(argv: list[str], logf: Path, what: str) -> None:
    with open(logf, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise DependencyError(f"cannot build the guest kernel: {e.filename} not found") \
                from None
    if r.returncode != 0:
        raise _fail(what, logf)


def _compile(argv: list[str], logf: Path, progress: BuildProgress, expected: int) -> int:
    done = 0
    progress.steps(0, expected)
    with open(logf, "ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        # Its own process group: on Ctrl-C every sub-make and compiler goes, not just the
        # top make (orphans would keep writing into the tree being deleted).
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if _STEP.match(line):
                    done += 1
                    progress.steps(done, max(expected, done))
            rc = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if rc != 0:
        raise _fail(f"make {argv[-1]}", logf)
    progress.steps(done, done)
    return done


# --------------------------------------------------------------------------- config check

_ASSIGN = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """A .config (or fragment) as {option: value}; "n" for `# X is not set`. Last wins."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _ASSIGN.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def unmet_options(config: Path, fragments: list[Path]) -> list[str]:
    """Options the fragments set that the final config does not have as asked."""
    want: dict[str, str] = {}
    for f in fragments:
        want.update(parse_config(f.read_text()))
    have = parse_config(config.read_text())
    return [f"{k}={v} (got {have.get(k, 'n')})" for k, v in want.items()
            if have.get(k, "n") != v]
