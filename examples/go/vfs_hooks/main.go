// vfs_hooks: VFS rules on a workspace mount. Plain rules run in the server (block a
// guest create); callback rules run here: an action hook vetoes the SDK's own
// WriteFile, a mutate hook rewrites it, an after-hook observes guest file events.
package main

import (
	"context"
	"fmt"
	"time"

	"matchlock.dev/examples/internal/ex"
	"matchlock.dev/go/pkg/sdk"
)

func main() {
	ctx := context.Background()
	events := make(chan sdk.VFSHookEvent, 16)
	cfg := &sdk.VFSInterceptionConfig{Rules: []sdk.VFSHookRule{
		{Name: "no-exe", Phase: sdk.VFSHookPhaseBefore, Ops: []sdk.VFSHookOp{sdk.VFSHookOpCreate},
			Path: "/workspace/*.exe", Action: sdk.VFSHookActionBlock},
		{Name: "veto-secrets", Ops: []sdk.VFSHookOp{sdk.VFSHookOpWrite}, Path: "/workspace/secret*",
			ActionHook: func(ctx context.Context, req sdk.VFSActionRequest) sdk.VFSHookAction { return sdk.VFSHookActionBlock }},
		{Name: "stamp", Phase: sdk.VFSHookPhaseBefore, Path: "/workspace/notes.txt",
			MutateHook: func(ctx context.Context, req sdk.VFSMutateRequest) ([]byte, error) {
				return []byte(fmt.Sprintf("stamped (%d bytes asked)\n", req.Size)), nil
			}},
		{Name: "audit", Phase: sdk.VFSHookPhaseAfter, Ops: []sdk.VFSHookOp{sdk.VFSHookOpWrite}, Path: "/workspace/*",
			Hook: func(ctx context.Context, e sdk.VFSHookEvent) error { events <- e; return nil }},
	}}
	client := ex.Client()
	defer ex.Finish(client)
	_, err := client.Launch(sdk.New(ex.Image()).WithWorkspace("/workspace").MountMemory("/workspace").WithVFSInterception(cfg))
	ex.Must(err, "launch")

	err = client.WriteFile(ctx, "/workspace/secret.txt", []byte("x"))
	ex.Check(err != nil, "the action hook vetoed WriteFile: %v", err)

	ex.Must(client.WriteFile(ctx, "/workspace/notes.txt", []byte("original")), "write")
	got, err := client.ReadFile(ctx, "/workspace/notes.txt")
	ex.Must(err, "read")
	ex.Check(string(got) == "stamped (8 bytes asked)\n", "the mutate hook rewrote the content: %q", got)

	r, err := client.Exec(ctx, "touch /workspace/tool.exe")
	ex.Must(err, "exec")
	ex.Check(r.ExitCode != 0, "the server's rule blocked creating tool.exe")

	select {
	case e := <-events:
		ex.Check(e.Op == sdk.VFSHookOpWrite, "after-hook saw %s %s", e.Op, e.Path)
	case <-time.After(10 * time.Second):
		ex.Check(false, "after-hook saw a write event")
	}
}
