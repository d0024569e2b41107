"""VFS hooks: file events from the guest's /workspace, and a hook that guards (and
rewrites) what the SDK itself writes."""

from __future__ import annotations

import threading

from _common import IMAGE, check

from matchlock import (
    Client,
    MatchlockError,
    Sandbox,
    VFSHookEvent,
    VFSHookRule,
    VFSInterceptionConfig,
)

written = threading.Event()
events: list[VFSHookEvent] = []


def on_write(event: VFSHookEvent) -> None:  # runs after the guest's write
    events.append(event)
    written.set()


def guard(req) -> str:  # runs before the SDK's own write_file / read_file / list_files
    return "block" if req.path.endswith(".key") else "allow"


def main() -> None:
    vfs = VFSInterceptionConfig(rules=[
        VFSHookRule(name="no-rm", phase="before", ops=["remove"], path="/workspace/keep*",
                    action="block"),
        VFSHookRule(name="log-writes", phase="after", ops=["write"], hook=on_write),
        VFSHookRule(name="guard", ops=["write"], action_hook=guard),
        VFSHookRule(name="stamp", path="/workspace/*.txt",
                    mutate_hook=lambda req: b"stamped by the SDK\n"),
    ])
    sandbox = (Sandbox(IMAGE).with_workspace("/workspace").mount_memory("/workspace")
               .with_vfs_interception(vfs))
    with Client() as client:
        client.launch(sandbox)
        client.exec("echo from the guest > /workspace/log.out")
        check(written.wait(30), f"the write reached the after-hook: {events}")
        try:
            client.write_file("/workspace/id.key", b"nope")
            check(False, "the guard blocks *.key")
        except MatchlockError as e:
            check("blocked" in str(e), "the guard blocks *.key")
        client.write_file("/workspace/note.txt", b"original")
        check(client.read_file("/workspace/note.txt") == b"stamped by the SDK\n",
              "the mutate hook rewrote the content")
        client.exec("touch /workspace/keep.me")
        r = client.exec("rm /workspace/keep.me")
        check(r.exit_code != 0, "the server-side rule refused the remove")


if __name__ == "__main__":
    main()
