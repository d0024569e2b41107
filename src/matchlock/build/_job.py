"""One `matchlock build`: a builder VM runs the engine over the streamed context, the
result comes back as an OCI archive and goes into the image store under the tag.

    check()     every input checked before anything is taken (one-line errors)
    run()       cache lock -> builder image -> base images -> cache disk -> VM ->
                context + base images in -> engine build (output streamed) -> export ->
                import; the VM and the temp files always go, whatever happens

Base images come from matchlock's store first, else they are pulled as `pull` does,
then loaded into the engine's storage from an OCI archive (the VM never talks to a
registry). The engine sits behind `Engine` (_engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from matchlock.build import _cache, _context, _dockerfile
from matchlock.build._builder import ensure_builder
from matchlock.build._engine import CONTEXT, DOCKERFILE_DIR, Buildah, BuildSpec
from matchlock.errors import MatchlockError, NotFoundError, UsageError
from matchlock.image import BUILTIN_IMAGE, Image, ImageStore, normalize_name, parse_reference
from matchlock.net.types import NetworkConfig
from matchlock.sandbox import ExecRequest, Process, SandboxConfig

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
Output = Callable[[bytes], None]

CACHE_MOUNT = "/var/lib/containers"  # the persistent cache disk, in the builder VM
# Without the cache disk: the VM's own writable disk (ext4; the root is an overlay,
# which overlay storage cannot sit on).
SCRATCH_ROOT = "/run/matchlock/upper/containers"
OUT_REF = "localhost/matchlock-build-output:latest"
BUILD_TIMEOUT_S = 30 * 60
LOCK_POLL_S = 0.25
_CHUNK = 1 << 16
_STEP = re.compile(rb"^(?:\[\d+/\d+\] )?STEP \d+(?:/\d+)?: (.*)$")  # "[2/3] " in multi-stage
_EXIT = re.compile(r"exit status (\d+)")


class BuildFailed(MatchlockError):
    """The engine's build failed; `exit_code` is the failing step's when known."""

    def __init__(self, message: str, exit_code: int = 1, step: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.step = step


@dataclass(frozen=True, slots=True)
class BuildRequest:
    context: Path
    dockerfile: Path
    tag: str
    build_args: tuple[tuple[str, str], ...] = ()
    target: str = ""
    no_cache: bool = False
    cpus: float = 0  # 0: all host CPUs
    memory_mib: int = 0  # 0: all host RAM
    disk_mib: int = 10240
    cache_size_mib: int = _cache.DEFAULT_SIZE_MIB
    network: NetworkConfig = field(default_factory=NetworkConfig)
    kernel: str | None = None
    accel: str | None = None


@dataclass
class BuildResult:
    image: Image
    layers: int
    timings: dict[str, float] = field(default_factory=dict)


def host_memory_mib() -> int:
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) >> 20


def check(req: BuildRequest) -> str:
    """Validate without side effects; returns the normalised tag."""
    if not req.tag:
        raise UsageError("-t/--tag is required when building from a Dockerfile")
    ref = parse_reference(req.tag)
    if ref.digest:
        raise UsageError(f"tag {req.tag!r} contains a digest: use a name:tag")
    if not req.context.exists():
        raise UsageError(f"build context {req.context} does not exist")
    if not req.context.is_dir():
        raise UsageError(f"build context {req.context} is not a directory")
    if not req.dockerfile.is_file():
        raise UsageError(f"Dockerfile {req.dockerfile} not found: pass -f PATH, or add a "
                         "Dockerfile to the context")
    for k, _ in req.build_args:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise UsageError(f"build argument {k!r} is not a valid name")
    if req.disk_mib < 1024:
        raise UsageError(f"the build VM's disk must be at least 1024 MB (got {req.disk_mib})")
    if req.cache_size_mib < 1024:
        raise UsageError(f"the build cache must be at least 1024 MB (got {req.cache_size_mib})")
    _context.IgnoreRules.load(req.context)  # a bad pattern fails here, not in the VM
    return ref.name


def engine_name(image: str) -> str:
    """The fully qualified name the engine resolves a Dockerfile's reference to."""
    ref = parse_reference(image)
    return f"{ref.registry}/{ref.repository}:{ref.tag or 'latest'}"


class _Tail:
    """The engine's output: streamed to `sink`, last lines and last step remembered."""

    def __init__(self, sink: Output) -> None:
        self.sink = sink
        self.lines: deque[bytes] = deque(maxlen=40)
        self.step = ""
        self.cached_steps = 0
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self.sink(data)
        self._buf += data
        *done, self._buf = self._buf.split(b"\n")
        for line in done:
            line = line.rstrip(b"\r")
            self.lines.append(line)
            m = _STEP.match(line)
            if m:
                self.step = m.group(1).decode(errors="replace")
            if line.startswith(b"--> Using cache"):
                self.cached_steps += 1

    def text(self) -> str:
        return b"\n".join(self.lines).decode(errors="replace")


class BuildJob:
    def __init__(self, req: BuildRequest, progress: Progress, output: Output,
                 store: ImageStore | None = None) -> None:
        self.req = req
        self.progress = progress
        self.output = output
        self.store = store or ImageStore()
        self.engine = Buildah()
        self.timings: dict[str, float] = {}
        self.tag = check(req)
        self.sup = None  # the builder VM's Supervisor, once started
        self.tail = _Tail(output)

    # -- host side -----------------------------------------------------------------

    def _bases(self) -> list[Image]:
        text = self.req.dockerfile.read_text(errors="replace")
        out = []
        for ref in _dockerfile.base_images(text, dict(self.req.build_args)):
            try:
                parse_reference(ref)
            except UsageError:
                raise UsageError(f"unknown base image {ref!r} in {self.req.dockerfile}: "
                                 "it is not a valid image reference") from None
            if normalize_name(ref) == BUILTIN_IMAGE:  # made here, as `run` makes it
                out.append(self.store.ensure_builtin())
                continue
            try:
                img = self.store.get(ref)
            except NotFoundError:
                self.progress(f"Base image {ref} is not stored; pulling it")
                try:
                    img = self.store.pull(ref, progress=self.progress).image
                except MatchlockError as e:
                    raise NotFoundError(f"unknown base image {ref!r}: {e}") from None
            out.append(img)
        return out

    def _config(self, builder: Image, cache_disk: Path | None) -> SandboxConfig:
        r = self.req
        cpus = r.cpus or float(os.cpu_count() or 1)
        memory = r.memory_mib or host_memory_mib()
        kw: dict = {}
        if cache_disk is not None:
            from matchlock.vfs import DiskSpec, MountConfig

            kw["mounts"] = MountConfig(disks=(DiskSpec(str(cache_disk), CACHE_MOUNT),))
        return SandboxConfig(image=builder.name, cpus=cpus, memory_mib=memory,
                             disk_size_mib=r.disk_mib, hostname="matchlock-build",
                             kernel=r.kernel, accel=r.accel, network=r.network, **kw)

    # -- guest side ----------------------------------------------------------------

    def _env(self, tmp: str) -> tuple[tuple[str, str], ...]:
        return (("HOME", "/root"), ("TMPDIR", tmp))

    async def _exec(self, script: str, *, tmp: str, stdin: Callable[[BinaryIO], object]
                    | None = None, sink: Output | None = None) -> int:
        """Run `script` (sh) in the builder VM as root; stdin from `stdin(fileobj)` run
        in a thread; output to `sink` (default: the engine output). Returns its code."""
        assert self.sup is not None
        proc: Process = await self.sup.sandbox.exec(ExecRequest(
            argv=("sh", "-c", script), env=self._env(tmp), user="root", cwd="/",
            stdin=stdin is not None))
        sink = sink or self.tail.feed
        try:
            feeder = asyncio.ensure_future(self._feed(proc, stdin)) if stdin else None
            while (chunk := await proc.read()) is not None:
                sink(chunk[1])
            if feeder is not None:
                await feeder
            return (await proc.wait()).exit_code
        except BaseException:
            await proc.cancel()
            raise

    async def _feed(self, proc: Process, writer: Callable[[BinaryIO], object]) -> None:
        """Pipe what `writer` writes (in a thread) into the process's stdin."""
        r, w = os.pipe()
        err: list[BaseException] = []

        def produce() -> None:
            try:
                with open(w, "wb", buffering=_CHUNK) as f:
                    writer(f)
            except BaseException as e:  # noqa: BLE001 - reported below
                err.append(e)

        t = threading.Thread(target=produce, name="build-feed", daemon=True)
        t.start()
        try:
            while data := await asyncio.to_thread(os.read, r, _CHUNK):
                await proc.write(data)
            await proc.close_stdin()
        finally:
            os.close(r)
            await asyncio.to_thread(t.join)
        if err and not isinstance(err[0], BrokenPipeError):
            raise err[0]

    async def _must(self, script: str, what: str, **kw) -> None:  # noqa: ANN003
        rc = await self._exec(script, **kw)
        if rc != 0:
            raise BuildFailed(f"{what} failed in the builder VM (exit {rc}): "
                              f"{self.tail.text().splitlines()[-1:] or ''}", rc)

    # -- the build ------------------------------------------------------------------

    async def run(self) -> BuildResult:
        t0 = time.monotonic()
        cache = None if self.req.no_cache else _cache.CacheLock()
        async with contextlib.AsyncExitStack() as stack:
            if cache is not None:
                stack.callback(cache.release)
                if not cache.try_acquire():
                    self.progress("Waiting for build cache lock…")
                    while not cache.try_acquire():
                        await asyncio.sleep(LOCK_POLL_S)
            self.timings["lock_s"] = time.monotonic() - t0
            bases = await asyncio.to_thread(self._bases)  # an unknown base fails fast
            builder = await asyncio.to_thread(ensure_builder, self.store, self.progress)
            disk = None
            if cache is not None:
                disk = await asyncio.to_thread(_cache.ensure_disk, self.req.cache_size_mib)
            host_tmp = Path(tempfile.mkdtemp(prefix="matchlock-build-output-",
                                             dir=_cache.cache_root()))
            stack.callback(shutil.rmtree, host_tmp, True)
            self.timings["prepare_s"] = time.monotonic() - t0
            from matchlock.supervisor import Supervisor

            self.sup = Supervisor(self._config(builder, disk), self.progress)
            stack.push_async_callback(self._remove_vm)
            self.progress(f"Starting the builder VM ({builder.name})")
            t = time.monotonic()
            await self.sup.start()
            self.timings["boot_s"] = time.monotonic() - t
            return await self._build(bases, disk is not None, host_tmp, t0)
        raise AssertionError("unreachable")

    async def _remove_vm(self) -> None:
        if self.sup is not None:
            if self.sup.sandbox.running and not self.req.no_cache:
                # A clean guest power-off (sync, unmount) first: the engine's writes to
                # the persistent cache disk must reach it before QEMU goes.
                await asyncio.shield(self.sup.stop(graceful=True, timeout=20))
            await asyncio.shield(self.sup.remove())

    async def _build(self, bases: list[Image], cached: bool, host_tmp: Path,
                     t0: float) -> BuildResult:
        eng = self.engine
        root = CACHE_MOUNT if cached else SCRATCH_ROOT
        tmp = f"{root}/tmp"
        quiet: Output = lambda _b: None  # noqa: E731

        t = time.monotonic()
        await self._must(f"{eng.prepare(root + '/storage')} && rm -rf {tmp} && mkdir -p "
                         f"{tmp} {CONTEXT} {DOCKERFILE_DIR}",
                         "preparing the engine", tmp=tmp)
        listing = bytearray()
        await self._exec(eng.list_images(), tmp=tmp, sink=listing.extend)
        have = {}
        for line in listing.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2:
                have[parts[1]] = "sha256:" + parts[0].removeprefix("sha256:")
        for img in bases:
            name = engine_name(img.name)
            want = await asyncio.to_thread(self.store.export_oci, img.name, None)
            if have.get(name) == want:
                self.progress(f"Base image {img.name} is in the build cache")
                continue
            self.progress(f"Loading base image {img.name} into the engine")
            archive = f"{tmp}/base.tar"

            def write(f: BinaryIO, img: Image = img, name: str = name) -> None:
                self.store.export_oci(img.name, f, name)

            await self._must(f"cat > {archive} && {eng.load(archive, name)}",
                             f"loading {img.name}", tmp=tmp, stdin=write, sink=quiet)
        self.timings["bases_s"] = time.monotonic() - t

        t = time.monotonic()
        rules = _context.IgnoreRules.load(self.req.context)
        counted: list[int] = []
        await self._must(f"tar -x -C {CONTEXT} -f -", "sending the build context", tmp=tmp,
                         stdin=lambda f: counted.append(
                             _context.write_tar(self.req.context, f, rules)))
        df_name = "Dockerfile"
        await self._must(f"cat > {DOCKERFILE_DIR}/{df_name}", "sending the Dockerfile",
                         tmp=tmp, stdin=lambda f: f.write(self.req.dockerfile.read_bytes()))
        self.timings["context_s"] = time.monotonic() - t
        self.progress(f"Sent the build context ({counted[0] if counted else 0} entries)")

        secrets = tuple(s.name for s in self.req.network.secrets)
        spec = BuildSpec(
            dockerfile_name=df_name, build_args=self.req.build_args, target=self.req.target,
            no_cache=self.req.no_cache, secrets=secrets,
            ca_bundle="/etc/ssl/certs/ca-certificates.crt"
            if self.sup is not None and self.sup.sandbox.net is not None
            and self.sup.sandbox.net.ca is not None else "")
        t = time.monotonic()
        rc = await self._exec(eng.build(spec, OUT_REF), tmp=tmp)
        self.timings["engine_build_s"] = time.monotonic() - t
        if rc != 0:
            raise self._failure(rc)

        t = time.monotonic()
        archive = f"{tmp}/out.tar"
        await self._must(f"rm -f {archive} && {eng.export(OUT_REF, archive)}",
                         "exporting the image", tmp=tmp)
        out = host_tmp / "image.tar"
        with open(out, "wb") as f:
            rc = await self._exec(f"cat {archive} && rm -f {archive}", tmp=tmp, sink=f.write)
        if rc != 0:
            raise BuildFailed(f"copying the built image out of the VM failed (exit {rc})", rc)
        self.timings["export_s"] = time.monotonic() - t
        await self._remove_vm()  # the VM's work is done; import needs no VM
        t = time.monotonic()

        def do_import() -> Image:
            with open(out, "rb") as f:
                return self.store.import_tar(self.tag, f, lambda m: log.debug("%s", m))

        img = await asyncio.to_thread(do_import)
        self.timings["import_s"] = time.monotonic() - t
        self.timings["total_s"] = time.monotonic() - t0
        return BuildResult(img, self.store.layer_count(img.name), self.timings)

    def _failure(self, rc: int) -> BuildFailed:
        text = self.tail.text()
        errs = [ln for ln in text.splitlines() if "error building at STEP" in ln
                or ln.startswith("Error:") or ln.startswith("error")]
        code = rc
        m = _EXIT.search(errs[-1]) if errs else None
        if m:
            code = int(m.group(1)) or rc
        step = self.tail.step
        msg = f"build failed at step {step!r} (exit {code})" if step else \
            f"build failed (exit {code})"
        if errs:
            msg += f": {errs[-1].strip()}"
        return BuildFailed(msg, code, step)
