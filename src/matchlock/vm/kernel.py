"""Find (or fetch once) the guest kernel.

Resolution order:

1. ``explicit`` (the CLI's ``--kernel``), then env ``MATCHLOCK_KERNEL``: a kernel image
   path (``file://`` allowed) or a name that ``list_kernels`` gives (``matchlock kernel
   ls``), plus the aliases ``matchlock`` (our build) and ``debian`` (the cloud kernel,
   fetched if needed). A path's modules come from env ``MATCHLOCK_KERNEL_MODULES``, else
   from a ``modules`` dir beside the image (a ``lib/modules/<version>`` tree); a kernel
   whose virtio drivers are modules and that has neither is refused up front.
2. Unless env ``MATCHLOCK_DEFAULT_KERNEL=debian`` (see ``prefer_built``):
   matchlock's own build (``kernel_build``; ``cache_dir()/kernels/matchlock-*``), the one
   of the current config first. Built in, no modules.
3. The newest Debian cloud kernel already unpacked under ``cache_dir()/kernels/<version>/``
   (``vmlinuz``, ``config``, ``modules/...``, ``kernel.json``) (when our build is preferred
   but missing, with a one-line hint naming ``matchlock kernel build``). No apt call.
4. Otherwise fetch it: ``apt-cache depends linux-image-cloud-<arch>`` names the current
   package, ``apt-get download`` fetches it into a staging dir in the cache, we unpack it
   in Python (see ``_deb``) and rename the finished tree into place. An ``fcntl`` lock
   serialises concurrent fetchers; staging dirs start with "." and are never picked up.

For tests, env ``MATCHLOCK_APT_GET`` / ``MATCHLOCK_APT_CACHE`` replace the ``apt-get`` /
``apt-cache`` commands (split shell-style; e.g. ``MATCHLOCK_APT_GET=false`` simulates
having no network).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from matchlock._log import get_logger
from matchlock.errors import DependencyError, MatchlockError, NotFoundError
from matchlock.paths import cache_dir
from matchlock.vm.accel import host_machine as _machine
from matchlock.vm.kernel_build import BUILD_PREFIX

log = get_logger(__name__)

ENV_KERNEL = "MATCHLOCK_KERNEL"
ENV_KERNEL_MODULES = "MATCHLOCK_KERNEL_MODULES"
ENV_DEFAULT = "MATCHLOCK_DEFAULT_KERNEL"  # matchlock (default: our build) or debian
ENV_APT_GET = "MATCHLOCK_APT_GET"
ENV_APT_CACHE = "MATCHLOCK_APT_CACHE"

_FORMAT = 1  # bump when the layout of an unpacked kernel dir changes
_HINT = "run `matchlock kernel build`, or pass --kernel PATH (or set MATCHLOCK_KERNEL)"
BUILD_HINT = ("Booting the Debian cloud kernel: `matchlock kernel build` makes matchlock's own, "
              "which boots about twice as fast")
ALIAS_BUILT = "matchlock"
ALIAS_DEBIAN = "debian"
# Drivers every VM needs before its root is mounted. A kernel image without these names in
# it has them as modules (built-in drivers register under their name).
_PROBE_DRIVERS = (b"virtio_blk", b"virtio_console")


def _mod_name(name: str) -> str:
    """Canonical module name: file names may use '-', module names use '_'."""
    return name.removesuffix(".ko").replace("-", "_")


@functools.cache
def _module_index(modules_dir: Path) -> tuple[dict[str, Path], frozenset[str]]:
    found: dict[str, Path] = {}
    for root, _dirs, files in os.walk(modules_dir):
        for f in files:
            if f.endswith(".ko"):
                found.setdefault(_mod_name(f), Path(root, f))
    builtin: set[str] = set()
    try:
        text = (modules_dir / "modules.builtin").read_text()
    except FileNotFoundError:
        text = ""
    for line in text.split():
        builtin.add(_mod_name(os.path.basename(line)))
    return found, frozenset(builtin)


@dataclass(frozen=True, slots=True)
class Kernel:
    version: str  # e.g. "6.1.0-56-cloud-amd64"
    image: Path  # bootable kernel (bzImage) for QEMU -kernel
    modules_dir: Path | None  # .../lib/modules/<version>; None: drivers are built in
    name: str = field(default="", compare=False)  # as `kernel ls` shows it; "" for a path
    kind: str = field(default="path", compare=False)  # "matchlock" | "debian" | "path"
    patches: tuple[str, ...] = field(default=(), compare=False)  # a matchlock build's

    def module_path(self, name: str) -> Path | None:
        """The .ko file of module `name` ("virtio_blk" or "virtio-blk").

        None if it is built into the kernel (listed in modules.builtin, or the kernel has
        no modules dir at all). NotFoundError if it is neither.
        """
        if self.modules_dir is None:
            return None
        found, builtin = _module_index(self.modules_dir)
        key = _mod_name(name)
        if key in found:
            return found[key]
        if key in builtin:
            return None
        raise NotFoundError(
            f"kernel module {name!r} is neither built into kernel {self.version} nor present "
            f"in {self.modules_dir}; use a kernel that provides it ({_HINT})"
        )


# --------------------------------------------------------------------------- resolve


def prefer_built() -> bool:
    """Whether VMs boot our own build by default (when one exists): yes, unless
    MATCHLOCK_DEFAULT_KERNEL=debian."""
    return os.environ.get(ENV_DEFAULT, ALIAS_BUILT) != ALIAS_DEBIAN


def resolve_kernel(
    explicit: str | None = None, progress: Callable[[str], None] | None = None
) -> Kernel:
    """Return the guest kernel to boot (see the module docstring for the order)."""
    progress = progress or (lambda _msg: None)
    if explicit:
        return _user_kernel(explicit, "--kernel", progress)
    env = os.environ.get(ENV_KERNEL)
    if env:
        return _user_kernel(env, ENV_KERNEL, progress)
    if not prefer_built():
        return debian_kernel(progress)
    built = best_built()
    if built is not None:
        return built
    k = debian_kernel(progress)  # a failed fetch raises its own one line, naming the build
    progress(BUILD_HINT)
    return k


def debian_kernel(progress: Callable[[str], None] | None = None) -> Kernel:
    """The newest cached Debian cloud kernel, fetched first if there is none."""
    kernels = cache_dir() / "kernels"
    k = _newest_cached(kernels)
    if k is not None:
        return k
    return _fetch(kernels, progress or (lambda _msg: None))


def cached_kernel() -> Kernel | None:
    """The newest Debian kernel already in the cache, without fetching anything."""
    return _newest_cached(cache_dir() / "kernels")


def default_kernel() -> Kernel | None:
    """What a VM boots without --kernel / MATCHLOCK_KERNEL, if it is cached (no fetch)."""
    return (best_built() if prefer_built() else None) or cached_kernel()


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.startswith((".", "~"))


def _user_kernel(value: str, source: str,
                 progress: Callable[[str], None] = lambda _msg: None) -> Kernel:
    fix = (f"unset {ENV_KERNEL} to use the default kernel" if source == ENV_KERNEL
           else "omit --kernel to use the default kernel")
    if value.startswith("file://"):
        return _path_kernel(value.removeprefix("file://"), source, fix)
    if value == ALIAS_BUILT:
        k = best_built()
        if k is None:
            raise NotFoundError(
                f"no matchlock kernel is built yet (asked for by {source}): run "
                "`matchlock kernel build`, or " + fix)
        return k
    if value == ALIAS_DEBIAN:
        return debian_kernel(progress)
    if not _looks_like_path(value):
        for k in all_cached():
            if k.name == value:
                return k
        if not Path(value).is_file():
            raise NotFoundError(
                f"kernel {value} (from {source}) is neither a file nor a kernel that "
                f"`matchlock kernel ls` lists; fix the name or path, or {fix}")
    return _path_kernel(value, source, fix)


def _path_kernel(path: str, source: str, fix: str) -> Kernel:
    image = Path(path).expanduser()
    if not image.is_file():
        raise NotFoundError(
            f"kernel image {path} (from {source}) does not exist; fix the path or {fix}"
        )
    modules_dir: Path | None = None
    mods = os.environ.get(ENV_KERNEL_MODULES)
    if mods:
        modules_dir = Path(mods).expanduser()
        if not modules_dir.is_dir():
            raise NotFoundError(
                f"kernel modules dir {mods} (from {ENV_KERNEL_MODULES}) does not exist; "
                f"point it at a lib/modules/<version> directory or unset it"
            )
    elif (image.parent / "modules").is_dir():
        modules_dir = image.parent / "modules"
    elif _has_modular_drivers(image):
        raise NotFoundError(
            f"kernel {path} (from {source}) has its virtio drivers as modules, and there is "
            f"no `modules` directory beside it: put its lib/modules/<version> tree at "
            f"{image.parent / 'modules'}, set {ENV_KERNEL_MODULES}, or use a kernel with the "
            "drivers built in (`matchlock kernel build`)")
    version = (bzimage_version(image) or _banner_version(image)
               or (modules_dir.name if modules_dir else image.name))
    return Kernel(version=version, image=image.resolve(), modules_dir=modules_dir,
                  name="", kind="path")


def _kernel_bytes(image: Path) -> bytes | None:
    """The uncompressed kernel (ELF vmlinux / arm64 Image as is; bzImage unpacked), or None
    if `image` is no kernel we recognise."""
    try:
        with open(image, "rb") as f:
            head = f.read(0x210)
            if head[:4] == b"\x7fELF" or head[0x38:0x3C] == b"ARM\x64":
                return head + f.read()
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    from matchlock.vm._vmlinux import find_payload

    try:
        return find_payload(image.read_bytes())
    except OSError:
        return None


def _has_modular_drivers(image: Path) -> bool:
    """True only on evidence: a config beside the image says so, or a recognisable kernel
    image lacks the drivers' names. Unknown files are given the benefit of the doubt."""
    for cfg in (image.parent / "config", image.parent / ".config"):
        if cfg.is_file():
            try:
                text = cfg.read_text(errors="replace")
            except OSError:
                continue
            return bool(re.search(r"^CONFIG_VIRTIO_BLK=m$", text, re.M))
    data = _kernel_bytes(image)
    if data is None:
        return False
    return not all(name in data for name in _PROBE_DRIVERS)


def _banner_version(image: Path) -> str | None:
    """The release from "Linux version X" in an uncompressed image, if any."""
    try:
        with open(image, "rb") as f:
            head = f.read(4)
            if head != b"\x7fELF":
                return None
            data = head + f.read()
    except OSError:
        return None
    m = re.search(rb"Linux version (\S+) ", data)
    return m.group(1).decode("ascii", "replace") if m else None


def bzimage_version(image: Path) -> str | None:
    """The release string embedded in an x86 bzImage ("6.1.0-56-cloud-amd64"), if any."""
    try:
        with open(image, "rb") as f:
            hdr = f.read(0x210)
            if len(hdr) < 0x210 or hdr[0x202:0x206] != b"HdrS":
                return None
            (ptr,) = struct.unpack_from("<H", hdr, 0x20E)
            if not ptr:
                return None
            f.seek(ptr + 0x200)
            raw = f.read(256)
    except OSError:
        return None
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
    return text.split()[0] if text else None


def _arch() -> str:
    m = _machine().lower()
    if m in ("x86_64", "amd64"):
        return "amd64"
    if m in ("aarch64", "arm64"):
        return "arm64"
    raise DependencyError(
        f"no Debian cloud kernel for host architecture {_machine()}; {_HINT}"
    )


def _version_key(v: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", v)]


def _load(d: Path, arch: str) -> Kernel | None:
    try:
        meta = json.loads((d / "kernel.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != _FORMAT or meta.get("arch") != arch:
        return None
    image = d / "vmlinuz"
    mods = d / "modules"
    if not image.is_file():
        return None
    return Kernel(
        version=meta["version"], image=_pvh_image(d, image),
        modules_dir=mods if mods.is_dir() else None, name=d.name, kind="debian",
    )


def _pvh_image(d: Path, bzimage: Path) -> Path:
    """The uncompressed vmlinux beside the bzImage (extracted once), else the bzImage."""
    vmlinux = d / "vmlinux"
    if vmlinux.is_file():
        return vmlinux
    if (d / "vmlinux.none").exists():
        return bzimage
    from matchlock.vm._vmlinux import extract_vmlinux

    try:
        with _locked(d / ".vmlinux.lock"):  # not kernels/.lock: _fetch holds that one
            if vmlinux.is_file() or extract_vmlinux(bzimage, vmlinux):
                return vmlinux
            (d / "vmlinux.none").touch()  # remember: this kernel has no PVH entry
    except OSError as e:
        log.debug("cannot extract vmlinux from %s: %s", bzimage, e)
    return bzimage


def _newest_cached(kernels: Path) -> Kernel | None:
    try:
        arch = _arch()
        entries = [d for d in kernels.iterdir()
                   if not d.name.startswith((".", BUILD_PREFIX)) and d.is_dir()]
    except (FileNotFoundError, NotADirectoryError, DependencyError):
        return None
    found = [k for k in (_load(d, arch) for d in entries) if k is not None]
    if not found:
        return None
    return max(found, key=lambda k: _version_key(k.version))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cmd(env: str, default: str) -> list[str]:
    value = os.environ.get(env)
    return shlex.split(value) if value else [default]


def _run_apt(argv: list[str], shown: str, cwd: Path | None = None) -> str:
    def fail(why: str) -> DependencyError:
        return DependencyError(
            f"cannot fetch the guest kernel: `{shown}` failed: {why}; "
            f"connect to a Debian mirror, or {_HINT}"
        )

    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise fail(f"{argv[0]} not found (not a Debian-based host?)") from None
    except subprocess.TimeoutExpired:
        raise fail("timed out after 600 s") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("E:")]
        why = (errs or lines or [f"exit status {r.returncode}"])[-1]
        raise fail(why)
    return r.stdout


def _package_name(meta_pkg: str) -> str:
    out = _run_apt(
        [*_cmd(ENV_APT_CACHE, "apt-cache"), "depends", meta_pkg], f"apt-cache depends {meta_pkg}"
    )
    for m in re.finditer(r"^\s*\|?Depends:\s*(linux-image-\d\S*)", out, re.M):
        return m.group(1)
    raise DependencyError(
        f"cannot fetch the guest kernel: `apt-cache depends {meta_pkg}` names no "
        f"linux-image package; run `apt-get update`, or {_HINT}"
    )


def _package_size(pkg: str) -> int | None:
    try:
        r = subprocess.run(
            [*_cmd(ENV_APT_CACHE, "apt-cache"), "show", "--no-all-versions", pkg],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^Size:\s*(\d+)", r.stdout, re.M)
    return int(m.group(1)) if r.returncode == 0 and m else None


def _fetch(kernels: Path, progress: Callable[[str], None]) -> Kernel:
    arch = _arch()
    with _locked(kernels / ".lock"):
        k = _newest_cached(kernels)  # someone else may have fetched it meanwhile
        if k is not None:
            return k
        for stale in kernels.glob(".fetch-*"):  # left by a crashed fetch; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        meta_pkg = f"linux-image-cloud-{arch}"
        pkg = _package_name(meta_pkg)
        version = pkg.removeprefix("linux-image-").removesuffix("-unsigned")
        size = _package_size(pkg)
        size_txt = f" ({size / 1e6:.1f} MB)" if size else ""
        progress(f"Fetching guest kernel {pkg}{size_txt}…")
        import tempfile  # not at the top: `run` starts without it

        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=kernels))
        try:
            _run_apt(
                [*_cmd(ENV_APT_GET, "apt-get"), "download", pkg],
                f"apt-get download {pkg}",
                cwd=staging,
            )
            debs = sorted(staging.glob("*.deb"))
            if not debs:
                raise DependencyError(
                    f"cannot fetch the guest kernel: `apt-get download {pkg}` produced no "
                    f".deb file; connect to a Debian mirror, or {_HINT}"
                )
            progress("Unpacking kernel…")
            tree = staging / "tree"
            tree.mkdir()
            unpack_kernel_deb(debs[0], tree, version)
            (tree / "kernel.json").write_text(
                json.dumps(
                    {"format": _FORMAT, "version": version, "package": pkg, "arch": arch}, indent=1
                )
                + "\n"
            )
            final = kernels / version
            if final.exists():  # an unusable leftover (no/old kernel.json): replace it
                shutil.rmtree(final)
            os.rename(tree, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    k = _load(final, arch)
    if k is None:
        raise MatchlockError(f"unpacked kernel in {final} is unusable; delete it and retry")
    progress(f"Kernel ready: {version}")
    return k


def unpack_kernel_deb(deb: Path, dest: Path, version: str) -> None:
    """Extract vmlinuz, config and the modules tree of a linux-image .deb into `dest`."""
    mod_prefixes = (f"lib/modules/{version}/", f"usr/lib/modules/{version}/")

    def select(name: str) -> str | None:
        if name == f"boot/vmlinuz-{version}":
            return "vmlinuz"
        if name == f"boot/config-{version}":
            return "config"
        for p in mod_prefixes:
            if name.startswith(p) and len(name) > len(p):
                return "modules/" + name[len(p) :]
        return None

    from matchlock.vm import _deb  # tarfile and the decompressors: only when fetching

    _deb.extract_deb(deb, dest, select)
    if not (dest / "vmlinuz").is_file():
        raise MatchlockError(
            f"{deb.name} holds no boot/vmlinuz-{version}; the package layout changed: {_HINT}"
        )


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True, slots=True)
class KernelEntry:
    """One kernel in the cache, as `kernel ls` shows it."""

    kernel: Kernel
    path: Path  # its cache dir
    size: int  # bytes on disk
    created: str  # ISO 8601 (UTC)
    default: bool  # what a VM boots without --kernel
    current: bool  # a matchlock build of the config in this installation
    meta: dict


def _load_built(d: Path, arch: str) -> tuple[Kernel, dict] | None:
    try:
        meta = json.loads((d / "kernel.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("kind") != "matchlock" or meta.get("arch") != arch:
        return None
    from matchlock.vm.kernel_build import ARCHES

    image = d / ARCHES[arch].out
    if not image.is_file():
        return None
    k = Kernel(version=meta.get("version") or d.name, image=image, modules_dir=None,
               name=d.name, kind="matchlock", patches=tuple(meta.get("patches", ())))
    return k, meta


def _built(kernels: Path) -> list[tuple[Kernel, dict]]:
    from matchlock.vm.kernel_build import host_arch

    try:
        arch = host_arch().name
        dirs = sorted(kernels.glob(f"{BUILD_PREFIX}*"))
    except (OSError, DependencyError):
        return []
    return [x for x in (_load_built(d, arch) for d in dirs if d.is_dir()) if x is not None]


def _current_digest() -> str | None:
    from matchlock.vm.kernel_build import config_digest, host_arch

    try:
        return config_digest(host_arch())
    except (OSError, DependencyError):
        return None


def best_built() -> Kernel | None:
    """Our newest build, preferring one of the current config (an older config's build
    still beats the Debian kernel: same drivers, faster boot)."""
    found = _built(cache_dir() / "kernels")
    if not found:
        return None
    digest = _current_digest()

    def key(item: tuple[Kernel, dict]) -> tuple:
        _k, meta = item
        return (meta.get("config_digest") == digest,
                _version_key(str(meta.get("source_version", ""))), str(meta.get("built", "")))

    return max(found, key=key)[0]


def built_is_current(k: Kernel) -> bool:
    """Whether our build `k` is of the config in this installation."""
    for built, meta in _built(cache_dir() / "kernels"):
        if built.name == k.name:
            return meta.get("config_digest") == _current_digest()
    return False


def all_cached() -> list[Kernel]:
    """Every bootable kernel in the cache: our builds, then the Debian ones."""
    kernels = cache_dir() / "kernels"
    out = [k for k, _meta in _built(kernels)]
    try:
        arch = _arch()
        dirs = sorted(d for d in kernels.iterdir()
                      if d.is_dir() and not d.name.startswith((".", BUILD_PREFIX)))
    except (OSError, DependencyError):
        return out
    for d in dirs:
        try:
            meta = json.loads((d / "kernel.json").read_text())
        except (OSError, ValueError):
            continue
        # No vmlinux extraction here: listing must not write; _load does it on first boot.
        if meta.get("format") == _FORMAT and meta.get("arch") == arch and \
                (d / "vmlinuz").is_file():
            img = d / "vmlinux" if (d / "vmlinux").is_file() else d / "vmlinuz"
            mods = d / "modules"
            out.append(Kernel(version=meta["version"], image=img,
                              modules_dir=mods if mods.is_dir() else None,
                              name=d.name, kind="debian"))
    return out


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def list_kernels() -> list[KernelEntry]:
    """The cached kernels, our builds first; `default` marks what a VM boots by default."""
    import datetime

    kernels = cache_dir() / "kernels"
    default = default_kernel()
    digest = _current_digest()
    metas = {k.name: meta for k, meta in _built(kernels)}
    entries: list[KernelEntry] = []
    for k in all_cached():
        d = kernels / k.name
        meta = metas.get(k.name)
        if meta is None:
            try:
                meta = json.loads((d / "kernel.json").read_text())
            except (OSError, ValueError):
                meta = {}
        created = meta.get("built") or datetime.datetime.fromtimestamp(
            (d / "kernel.json").stat().st_mtime, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        entries.append(KernelEntry(
            kernel=k, path=d, size=_du(d), created=created,
            default=default is not None and default.name == k.name,
            current=k.kind == "matchlock" and meta.get("config_digest") == digest,
            meta=meta))
    return entries


def remove_kernel(name: str) -> Path:
    """Delete one cached kernel by its `kernel ls` name; returns the dir it was in."""
    kernels = cache_dir() / "kernels"
    if not name or _looks_like_path(name) or name.startswith(".") or \
            name not in {k.name for k in all_cached()}:
        raise NotFoundError(f"no cached kernel named {name!r}; "
                            "`matchlock kernel ls` lists them")
    d = kernels / name
    # Renamed first: a VM resolving kernels meanwhile sees it whole or not at all.
    gone = kernels / f".rm-{name}-{os.getpid()}"
    os.rename(d, gone)
    shutil.rmtree(gone, ignore_errors=True)
    return d


# --------------------------------------------------------------------------- TSC


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz (for the guest's ``tsc_early_khz=``), or None.

    Sources, best first: the kernel log's calibrated value ("tsc: Refined TSC clocksource
    calibration: N MHz", else "tsc: Detected N MHz"), then /proc/cpuinfo's "cpu MHz" when
    the CPU has a constant TSC. x86 only. Kept under the cache dir per host boot.
    """
    if _machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    sysfs = _sysfs_tsc_khz()
    if sysfs:
        return sysfs
    boot = _boot_id()
    cached = cache_dir() / "host-tsc-khz"
    if boot:
        # One `dmesg` per host boot, not per VM (~30 ms of every start): the rate is fixed
        # for the boot, and the log that holds it may have rotated by the next VM.
        try:
            was_boot, _, khz = cached.read_text().partition(" ")
            if was_boot == boot and khz.strip().isdigit():
                return int(khz)
        except OSError:
            pass
    khz = _measured_tsc_khz()
    if boot and khz:
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{boot} {khz}\n")
            os.replace(tmp, cached)
        except OSError:
            pass
    return khz


def _sysfs_tsc_khz() -> int | None:
    try:
        sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text().strip()
    except OSError:
        return None
    return int(sysfs) if sysfs.isdigit() and int(sysfs) > 0 else None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _measured_tsc_khz() -> int | None:
    log = _kernel_log()
    for pat in (
        r"Refined TSC clocksource calibration: ([\d.]+) MHz",
        r"tsc: Detected ([\d.]+) MHz",
    ):
        hits = re.findall(pat, log)
        if hits:
            return round(float(hits[-1]) * 1000)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if not re.search(r"^flags\s*:.*\bconstant_tsc\b", cpuinfo, re.M):
        return None
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    return round(float(m.group(1)) * 1000) if m else None


def _kernel_log() -> str:
    exe = shutil.which("dmesg") or next(
        (p for p in ("/usr/bin/dmesg", "/bin/dmesg") if os.path.exists(p)), None
    )
    if exe:
        try:
            r = subprocess.run([exe], capture_output=True, text=True, timeout=5)
            if r.returncode == 0:
                return r.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ""
