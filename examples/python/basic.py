"""Launch a sandbox, run commands, move files in and out."""

from __future__ import annotations

from _common import IMAGE, check

from matchlock import Client, Sandbox


def main() -> None:
    sandbox = Sandbox(IMAGE).with_env("GREETING", "hello").with_memory(256)
    with Client() as client:  # starts `matchlock rpc`; closing it stops the VM
        vm_id = client.launch(sandbox)
        print("VM", vm_id)

        r = client.exec("echo $GREETING from $(uname -s)")
        check(r.exit_code == 0 and r.stdout == "hello from Linux\n", "exec sees the env")
        check(client.exec("exit 3").exit_code == 3, "a failing command is a result")

        client.write_file("/tmp/hello.txt", "written by the SDK\n")
        check(client.read_file("/tmp/hello.txt") == b"written by the SDK\n", "file round trip")
        names = [f.name for f in client.list_files("/tmp")]
        check("hello.txt" in names, "list_files sees it")
        r = client.exec("cat /tmp/hello.txt", working_dir="/tmp")
        check(r.stdout == "written by the SDK\n", "the guest sees it too")


if __name__ == "__main__":
    main()
