"""The lifecycle commands: exec, list, get, inspect, log, kill, rm, prune, gc, allow-list.

Each is a thin face: it reads the state DB or asks the VM's supervisor over its control
socket, and words the typed errors the lower boxes raise. Imports stay lazy: `exec` and
`list` should cost little more than Python's start-up.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from matchlock.errors import MatchlockError, UsageError, VmNotRunning, VmRunning

KILL_TIMEOUT_S = 10.0  # guest sync + poweroff, then QEMU is killed


def _db():  # noqa: ANN202 - StateDB
    from matchlock.state import StateDB

    return StateDB()


def _created(ts: str) -> str:
    return ts[:16].replace("T", " ")


def _split_hosts(values: tuple[str, ...]) -> list[str]:
    hosts = list(dict.fromkeys(h.strip() for v in values for h in v.split(",") if h.strip()))
    if not hosts:
        raise UsageError("invalid allow-list host: expected one or more hosts "
                         "(comma-separated)")
    return hosts


# -- exec ----------------------------------------------------------------------------------

@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a pseudo-terminal (with -i).")
@click.option("-w", "--workdir", default=None, help="Working directory (default: the VM's).")
@click.option("-u", "--user", default=None, help="uid, uid:gid, name or name:group "
              "(default: the VM's).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]",
              help="Set a variable for this command; KEY alone copies the host's.")
@click.argument("vm_id", metavar="ID")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def exec_(interactive: bool, tty: bool, workdir: str | None, user: str | None,
          env: tuple[str, ...], vm_id: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in the running VM ID: `matchlock exec ID -- CMD...`.

    The VM's environment, user and working directory apply unless overridden. The exit
    status is the command's. Ctrl-C stops the command (its process group), not the VM.
    """
    from matchlock.cli._exec import ExecArgs, parse_after_id, run_exec

    ea = parse_after_id(ExecArgs(interactive, tty, workdir, user, list(env)), list(command))
    rc = run_exec(vm_id, ea)
    sys.stdout.flush()
    raise SystemExit(rc)
# -- list / get / inspect / log --------------------------------------------------------------


@click.command("list")
@click.option("--running", is_flag=True, help="Only running VMs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(running: bool, as_json: bool) -> None:
    """List VMs, newest first."""
    from matchlock.cli._output import print_table

    recs = [r for r in _db().list() if not running or r.running]
    if as_json:
        click.echo(json.dumps([{
            "id": r.id, "status": r.status, "image": r.image, "created_at": r.created_at,
            "pid": r.pid if r.owner_alive else 0, "cpus": r.cpus, "memory_mb": r.memory_mib,
            "ports": r.ports,
        } for r in recs], indent=2))
        return
    print_table(["ID", "STATUS", "IMAGE", "CREATED", "PID"],
                [[r.id, r.status, r.image, _created(r.created_at),
                  str(r.pid) if r.owner_alive else "-"] for r in recs])


@click.command()
@click.argument("vm_id", metavar="ID")
def get(vm_id: str) -> None:
    """Print a VM's record as JSON (its config without secret values)."""
    click.echo(json.dumps(_db().require(vm_id).public(), indent=2))


@click.command()
@click.argument("vm_id", metavar="ID")
def inspect(vm_id: str) -> None:
    """Print a VM's record, lifecycle history and resources as JSON."""
    db = _db()
    rec = db.require(vm_id)
    click.echo(json.dumps({
        "vm": rec.public(),
        "lifecycle": {"status": rec.status, "updated_at": rec.updated_at,
                      "last_error": rec.last_error},
        "history": [{"seq": h.seq, "status": h.status, "at": h.at, "pid": h.pid,
                     "detail": h.detail} for h in db.history(vm_id)],
        "resources": [{"kind": r.kind, "value": r.value, "taken_at": r.taken_at,
                       "released_at": r.released_at, "error": r.error}
                      for r in db.resources(vm_id)],
    }, indent=2))


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the VM stops.")
@click.argument("vm_id", metavar="ID")
def log(follow: bool, vm_id: str) -> None:
    """Print a VM's console log and its supervisor's log."""
    from matchlock.paths import vms_dir

    CONSOLE_LOG, SUPERVISOR_LOG = "vm.log", "supervisor.log"  # noqa: N806 - as sandbox names them

    db = _db()
    rec = db.require(vm_id)
    logs = vms_dir() / vm_id / "logs"
    paths = [logs / CONSOLE_LOG, logs / SUPERVISOR_LOG]
    offsets = dict.fromkeys(paths, 0)
    out = sys.stdout.buffer

    def drain() -> None:
        for p in paths:
            try:
                with open(p, "rb") as f:
                    if os.fstat(f.fileno()).st_size < offsets[p]:
                        offsets[p] = 0
                    f.seek(offsets[p])
                    while chunk := f.read(1 << 20):
                        out.write(chunk)
                        offsets[p] += len(chunk)
            except FileNotFoundError:
                pass
        out.flush()

    drain()
    if not follow:
        return
    try:
        while rec is not None and rec.status in ("creating", "starting", "running",
                                                  "stopping"):
            time.sleep(0.1)  # a log follower polls, as tail -f does
            drain()
            rec = db.get(vm_id)
        drain()
    except KeyboardInterrupt:
        pass


# -- kill / rm / prune / gc ------------------------------------------------------------------


def _kill_one(vm_id: str, timeout: float) -> None:
    from matchlock.supervisor.client import ControlClient

    db = _db()
    rec = db.require(vm_id)
    if rec.status not in ("creating", "starting", "running"):
        if rec.status == "crashed":
            raise VmNotRunning(vm_id, "crashed; `matchlock gc` cleans it up")
        raise VmNotRunning(vm_id, rec.status)
    try:
        with ControlClient(vm_id) as c:
            c.call("close", {"timeout_seconds": timeout}, timeout=timeout + 30)
        return
    except VmNotRunning:
        pass  # no control socket (yet): fall back to the owner, if it is still itself
    owner = rec.owner
    if owner is None or not owner.alive():
        raise VmNotRunning(vm_id, "crashed; `matchlock gc` cleans it up")
    import signal

    os.kill(owner.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout + 10
    while owner.alive() and time.monotonic() < deadline:
        time.sleep(0.05)


@click.command()
@click.option("--all", "all_", is_flag=True, help="Kill every running VM.")
@click.option("--timeout", type=click.FloatRange(min=0), default=KILL_TIMEOUT_S,
              show_default=True, metavar="SECONDS",
              help="Grace for the guest to sync and power off before QEMU is killed.")
@click.argument("vm_ids", nargs=-1, metavar="[ID]...")
def kill(all_: bool, timeout: float, vm_ids: tuple[str, ...]) -> None:
    """Stop VMs: guest sync and power-off, forced after --timeout. The VM is kept
    (stopped) until `rm`; a foreground `--rm` run removes its VM itself."""
    if not vm_ids and not all_:
        raise UsageError("VM ID required (or use --all)")
    if all_:
        for rec in _db().list():
            if rec.running:
                try:
                    _kill_one(rec.id, timeout)
                    click.echo(f"Killed {rec.id}")
                except MatchlockError as e:
                    click.echo(f"Failed to kill {rec.id}: {e}", err=True)
        return
    for vm_id in vm_ids:
        _kill_one(vm_id, timeout)
        click.echo(f"Killed {vm_id}")


def _remove(vm_id: str) -> None:
    from matchlock.sandbox._cleanup import reclaim

    db = _db()
    rec = db.require(vm_id)
    try:
        results = reclaim(db, rec, remove=True)
    except VmRunning:
        raise VmRunning(vm_id, f"running: stop it first with `matchlock kill {vm_id}`"
                        ) from None
    errs = [f"{r.kind}: {r.error}" for r in results if r.error]
    if errs:
        raise MatchlockError(f"cannot remove {vm_id}: {'; '.join(errs)} "
                             "(`matchlock gc` retries)", vm_id=vm_id)


@click.command()
@click.option("--stopped", is_flag=True, help="Remove every VM that is not running.")
@click.argument("vm_ids", nargs=-1, metavar="[ID]...")
def rm(stopped: bool, vm_ids: tuple[str, ...]) -> None:
    """Remove stopped VMs: their directory (logs) and records."""
    if not vm_ids and not stopped:
        raise UsageError("VM ID required (or use --stopped)")
    if stopped:
        from matchlock.state import ACTIVE

        for rec in _db().list():
            if rec.status not in ACTIVE:
                try:
                    _remove(rec.id)
                    click.echo(f"Removed {rec.id}")
                except MatchlockError as e:
                    click.echo(f"Failed to remove {rec.id}: {e}", err=True)
        return
    for vm_id in vm_ids:
        _remove(vm_id)
        click.echo(f"Removed {vm_id}")


@click.command()
def prune() -> None:
    """Remove every stopped or crashed VM."""
    from matchlock.state import ACTIVE

    n, failed = 0, []
    for rec in _db().list():
        if rec.status in ACTIVE:
            continue
        try:
            _remove(rec.id)
        except MatchlockError as e:
            failed.append(f"{rec.id}: {e}")
            continue
        click.echo(f"Pruned {rec.id}")
        n += 1
    click.echo(f"Pruned {n} VMs")
    if failed:
        raise MatchlockError("; ".join(failed))


@click.command()
@click.argument("vm_id", required=False, metavar="[ID]")
def gc(vm_id: str | None) -> None:
    """Reclaim what dead supervisors left: QEMU processes, network namespaces (with
    their TAP and nftables rules), sockets, disks and records. Never touches a VM whose
    supervisor is alive. A crashed VM is removed."""
    from matchlock.sandbox._cleanup import orphans, pending, reclaim, remove_orphans
    from matchlock.state import ACTIVE

    db = _db()
    recs = [db.require(vm_id)] if vm_id else db.list()
    failed = False
    for rec in recs:
        if rec.status in ACTIVE:
            click.echo(f"{rec.id}: skipped (VM is running)")
            continue
        crashed = rec.status == "crashed"
        left = pending(db.resources(rec.id), include_dir=crashed)
        if not left and not crashed:
            click.echo(f"{rec.id}: no resources to clean")
            continue
        results = reclaim(db, rec, remove=crashed)
        errs = [r for r in results if r.error]
        for r in errs:
            click.echo(f"{rec.id}: failed {r.kind}: {r.error}", err=True)
        failed = failed or bool(errs)
        done = sorted(r.kind for r in results if not r.error)
        click.echo(f"{rec.id}: cleaned {','.join(done) or 'record'}"
                   + (" (removed)" if crashed and not errs else ""))
    if vm_id is None:
        found = orphans(db)
        if any(found.values()):
            for err in remove_orphans(found):
                click.echo(f"orphans: failed {err}", err=True)
                failed = True
            click.echo("orphans: removed " + ", ".join(
                f"{len(v)} {k}" for k, v in found.items() if v))
    if failed:
        raise MatchlockError("gc could not clean everything (see above)")
    click.echo(f"Reconciled {len(recs)} VMs")


# -- allow-list ------------------------------------------------------------------------------


@click.group("allow-list", invoke_without_command=True)
@click.pass_context
def allow_list(ctx: click.Context) -> None:
    """Change a running VM's egress allow-list (for new connections, at once)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _allow_list_call(method: str, vm_id: str, hosts: tuple[str, ...]) -> dict:
    from matchlock.supervisor.client import ControlClient

    wanted = _split_hosts(hosts)
    rec = _db().require(vm_id)
    if not rec.running:
        raise VmNotRunning(vm_id, rec.status)
    with ControlClient(vm_id) as c:
        return c.call(method, {"hosts": wanted})


def _print_current(res: dict) -> None:
    current = res.get("allowed_hosts") or []
    if current:
        click.echo(f"Current allow-list: {','.join(current)}")
    elif res.get("allow_all"):
        click.echo("Current allow-list: (empty: all hosts allowed)")
    else:
        click.echo("Current allow-list: (empty: all hosts blocked)")


@allow_list.command("add")
@click.argument("vm_id", metavar="ID")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST[,HOST]...")
def allow_list_add(vm_id: str, hosts: tuple[str, ...]) -> None:
    """Allow more hosts (globs, comma-separated)."""
    res = _allow_list_call("allow_list_add", vm_id, hosts)
    added = res.get("added") or []
    click.echo(f"Added to {vm_id}: {','.join(added)}" if added
               else f"No new hosts were added to {vm_id}")
    _print_current(res)


@allow_list.command("delete")
@click.argument("vm_id", metavar="ID")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST[,HOST]...")
def allow_list_delete(vm_id: str, hosts: tuple[str, ...]) -> None:
    """Remove hosts; removing the last one blocks every host."""
    res = _allow_list_call("allow_list_delete", vm_id, hosts)
    removed = res.get("removed") or []
    click.echo(f"Removed from {vm_id}: {','.join(removed)}" if removed
               else f"No hosts were removed from {vm_id}")
    _print_current(res)


allow_list.add_command(allow_list_delete, "remove")


# -- port-forward ----------------------------------------------------------------------------


@click.command("port-forward")
@click.option("--address", "addresses", multiple=True, metavar="IP",
              help="Host addresses to listen on (default 127.0.0.1; comma-separated).")
@click.argument("vm_id", metavar="ID")
@click.argument("specs", nargs=-1, required=True, metavar="[LOCAL:]REMOTE...")
def port_forward(addresses: tuple[str, ...], vm_id: str, specs: tuple[str, ...]) -> None:
    """Forward host TCP ports to the running VM ID's ports until Ctrl-C."""
    from matchlock.cli._run_core import parse_addresses, parse_publish
    from matchlock.supervisor.client import ControlClient

    forwards = [{"local_port": p.local, "remote_port": p.remote} for p in parse_publish(specs)]
    addrs = list(parse_addresses(addresses))
    rec = _db().require(vm_id)
    if not rec.running:
        raise VmNotRunning(vm_id, rec.status)
    with ControlClient(vm_id) as c:
        res = c.call("port_forward", {"forwards": forwards, "addresses": addrs})
        for b in res.get("bindings", []):
            click.echo(f"Forwarding {b['address']}:{b['local_port']} -> "
                       f"sandbox:{b['remote_port']}", err=True)
        try:
            # The session holds the forwards: wait until the VM goes or Ctrl-C.
            c.sock.settimeout(None)
            while c.sock.recv(1 << 16):
                pass
        except KeyboardInterrupt:
            pass
