// sequence runs the scripted SDK sequence of tests/e2e/test_sdk_parity.py through the
// Go SDK and prints its results as one JSON object (the Python run must match).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"matchlock.dev/go/pkg/sdk"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sequence:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx := context.Background()
	c, err := sdk.NewClient(sdk.DefaultConfig())
	if err != nil {
		return err
	}
	defer c.Remove()
	defer c.Close(0)
	if _, err := c.Launch(sdk.New(os.Args[1]).WithEnv("GREETING", "hi").AddSecret("API_KEY", "sk-parity", "api.test")); err != nil {
		return err
	}
	out := map[string]any{}
	r, err := c.Exec(ctx, "echo $GREETING; echo err >&2; exit 3")
	if err != nil {
		return err
	}
	out["exec"] = []any{r.ExitCode, r.Stdout, r.Stderr}
	var so, se bytes.Buffer
	s, err := c.ExecStream(ctx, "for i in 1 2 3; do echo line$i; done; echo e >&2", &so, &se)
	if err != nil {
		return err
	}
	out["stream"] = []any{s.ExitCode, so.String(), se.String()}
	so.Reset()
	p, err := c.ExecPipe(ctx, "tr a-z A-Z", strings.NewReader("piped text\n"), &so, nil)
	if err != nil {
		return err
	}
	out["pipe"] = []any{p.ExitCode, so.String()}
	if err := c.WriteFileMode(ctx, "/tmp/parity.bin", []byte("\x00\x01binary\xff\n"), 0o600); err != nil {
		return err
	}
	data, err := c.ReadFile(ctx, "/tmp/parity.bin")
	if err != nil {
		return err
	}
	out["read"] = fmt.Sprintf("%x", data)
	files, err := c.ListFiles(ctx, "/tmp")
	if err != nil {
		return err
	}
	var listed []any
	for _, f := range files {
		if f.Name == "parity.bin" {
			listed = append(listed, []any{f.Name, f.Size, f.Mode & 0o777, f.IsDir})
		}
	}
	out["list"] = listed
	r, err = c.Exec(ctx, "echo $API_KEY")
	if err != nil {
		return err
	}
	out["secret_is_placeholder"] = strings.HasPrefix(r.Stdout, "SANDBOX_SECRET_") && !strings.Contains(r.Stdout, "sk-parity")
	_, err = c.ReadFile(ctx, "/tmp/missing")
	var re *sdk.RPCError
	if !errors.As(err, &re) {
		return fmt.Errorf("missing file: %v", err)
	}
	out["missing_code"] = re.Code
	return json.NewEncoder(os.Stdout).Encode(out)
}
