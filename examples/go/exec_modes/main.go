// exec_modes: buffered, streamed, piped (stdin in) and interactive (PTY) commands,
// and cancelling one through its context.
package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"strings"
	"time"

	"matchlock.dev/examples/internal/ex"
	"matchlock.dev/go/pkg/sdk"
)

func main() {
	ctx := context.Background()
	client := ex.Client()
	defer ex.Finish(client)
	_, err := client.Launch(sdk.New(ex.Image()))
	ex.Must(err, "launch")

	// Streamed: output arrives while the command runs.
	var out bytes.Buffer
	sr, err := client.ExecStream(ctx, "for i in 1 2 3; do echo tick $i; done", io.MultiWriter(&out, os.Stdout), os.Stderr)
	ex.Must(err, "exec stream")
	ex.Check(sr.ExitCode == 0 && out.String() == "tick 1\ntick 2\ntick 3\n", "streamed three lines")

	// Piped: stdin flows in, stdout/stderr flow out, as another user.
	var so, se bytes.Buffer
	pr, err := client.ExecPipeWithOptions(ctx, "id -u; tr a-z A-Z; echo to-stderr >&2", sdk.ExecPipeOptions{
		User: "65534", Stdin: strings.NewReader("piped input\n"), Stdout: &so, Stderr: &se,
	})
	ex.Must(err, "exec pipe")
	ex.Check(pr.ExitCode == 0 && so.String() == "65534\nPIPED INPUT\n" && se.String() == "to-stderr\n",
		"pipe mode: %q / %q", so.String(), se.String())

	// Interactive: a shell on a PTY (here fed from a pipe; pass os.Stdin in a terminal).
	stdinR, stdinW := io.Pipe()
	go func() {
		io.WriteString(stdinW, "[ -t 0 ] && echo on-a-tty; stty size; exit 3\n")
	}()
	var tty bytes.Buffer
	ir, err := client.ExecInteractive(ctx, "sh", &sdk.ExecInteractiveOptions{Rows: 30, Cols: 100, Stdin: stdinR, Stdout: &tty})
	ex.Must(err, "exec interactive")
	stdinW.Close()
	ex.Check(ir.ExitCode == 3 && strings.Contains(tty.String(), "on-a-tty") && strings.Contains(tty.String(), "30 100"),
		"interactive shell on a 30x100 PTY exited 3")

	// Cancelled: the context ends the guest command.
	cctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = client.Exec(cctx, "sleep 60")
	ex.Check(err == context.DeadlineExceeded && time.Since(start) < 10*time.Second, "a 60 s command cancelled by its context (%v)", err)
}
