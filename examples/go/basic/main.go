// basic: boot a VM, run commands, move files in and out.
package main

import (
	"context"
	"strings"

	"matchlock.dev/examples/internal/ex"
	"matchlock.dev/go/pkg/sdk"
)

func main() {
	ctx := context.Background()
	client := ex.Client()
	defer ex.Finish(client)

	vmID, err := client.Launch(sdk.New(ex.Image()).WithEnv("GREETING", "hello"))
	ex.Must(err, "launch")
	ex.Check(strings.HasPrefix(vmID, "vm-"), "launched %s", vmID)

	r, err := client.Exec(ctx, "echo $GREETING from $(uname -s)")
	ex.Must(err, "exec")
	ex.Check(r.ExitCode == 0 && r.Stdout == "hello from Linux\n", "exec says %q", r.Stdout)

	r, err = client.Exec(ctx, "echo oops >&2; exit 42")
	ex.Must(err, "exec")
	ex.Check(r.ExitCode == 42 && r.Stderr == "oops\n", "a failing command is a result, not an error (exit %d)", r.ExitCode)

	script := "#!/bin/sh\necho \"args: $*\"\n"
	ex.Must(client.WriteFileMode(ctx, "/tmp/hello.sh", []byte(script), 0o755), "write")
	r, err = client.ExecWithDir(ctx, "./hello.sh a b", "/tmp")
	ex.Must(err, "exec")
	ex.Check(r.Stdout == "args: a b\n", "the written script runs: %q", r.Stdout)

	back, err := client.ReadFile(ctx, "/tmp/hello.sh")
	ex.Must(err, "read")
	ex.Check(string(back) == script, "read back %d bytes", len(back))

	files, err := client.ListFiles(ctx, "/tmp")
	ex.Must(err, "list")
	found := false
	for _, f := range files {
		found = found || (f.Name == "hello.sh" && f.Mode&0o777 == 0o755)
	}
	ex.Check(found, "/tmp lists hello.sh with mode 0755")
}
