package sdk_test

// Compile-time check that the exported API keeps the reference Go SDK's names and
// signatures (github.com/jingkaihe/matchlock/pkg/sdk, as used by its README and
// examples/go programs): a program written against it must build here with only the
// import path changed. Each line pins one signature; a drift fails `go vet`/`go test`.

import (
	"context"
	"io"
	"time"

	"matchlock.dev/go/pkg/api"
	"matchlock.dev/go/pkg/sdk"
)

type (
	ctx = context.Context
	C   = *sdk.Client
	B   = *sdk.SandboxBuilder
)

var (
	_ func() sdk.Config                                                                          = sdk.DefaultConfig
	_ func(sdk.Config) (*sdk.Client, error)                                                      = sdk.NewClient
	_ func(string) *sdk.SandboxBuilder                                                           = sdk.New
	_                                                                                            = sdk.Config{BinaryPath: "", UseSudo: false}
	_ func(C) string                                                                             = (*sdk.Client).VMID
	_ func(C, time.Duration) error                                                               = (*sdk.Client).Close
	_ func(C) error                                                                              = (*sdk.Client).Remove
	_ func(C, string, int) (*sdk.VolumeInfo, error)                                              = (*sdk.Client).VolumeCreate
	_ func(C) ([]sdk.VolumeInfo, error)                                                          = (*sdk.Client).VolumeList
	_ func(C, string) error                                                                      = (*sdk.Client).VolumeRemove
	_ func(C, sdk.CreateOptions) (string, error)                                                 = (*sdk.Client).Create
	_ func(C, B) (string, error)                                                                 = (*sdk.Client).Launch
	_ func(C, ctx, string) (*sdk.ExecResult, error)                                              = (*sdk.Client).Exec
	_ func(C, ctx, string, string) (*sdk.ExecResult, error)                                      = (*sdk.Client).ExecWithDir
	_ func(C, ctx, string, io.Writer, io.Writer) (*sdk.ExecStreamResult, error)                  = (*sdk.Client).ExecStream
	_ func(C, ctx, string, string, io.Writer, io.Writer) (*sdk.ExecStreamResult, error)          = (*sdk.Client).ExecStreamWithDir
	_ func(C, ctx, string, io.Reader, io.Writer, io.Writer) (*sdk.ExecPipeResult, error)         = (*sdk.Client).ExecPipe
	_ func(C, ctx, string, string, io.Reader, io.Writer, io.Writer) (*sdk.ExecPipeResult, error) = (*sdk.Client).ExecPipeWithDir
	_ func(C, ctx, string, sdk.ExecPipeOptions) (*sdk.ExecPipeResult, error)                     = (*sdk.Client).ExecPipeWithOptions
	_ func(C, ctx, string, *sdk.ExecInteractiveOptions) (*sdk.ExecInteractiveResult, error)      = (*sdk.Client).ExecInteractive
	_ func(C, ctx, string, []byte) error                                                         = (*sdk.Client).WriteFile
	_ func(C, ctx, string, []byte, uint32) error                                                 = (*sdk.Client).WriteFileMode
	_ func(C, ctx, string) ([]byte, error)                                                       = (*sdk.Client).ReadFile
	_ func(C, ctx, string) ([]sdk.FileInfo, error)                                               = (*sdk.Client).ListFiles
	_ func(C, ctx) (string, error)                                                               = (*sdk.Client).Log
	_ func(C, ctx, io.Writer) error                                                              = (*sdk.Client).LogStream
	_ func(C, ctx, ...string) ([]api.PortForwardBinding, error)                                  = (*sdk.Client).PortForward
	_ func(C, ctx, []string, ...string) ([]api.PortForwardBinding, error)                        = (*sdk.Client).PortForwardWithAddresses
	_ func(C, ctx, ...string) (*sdk.AllowListUpdate, error)                                      = (*sdk.Client).AllowListAdd
	_ func(C, ctx, ...string) (*sdk.AllowListUpdate, error)                                      = (*sdk.Client).AllowListDelete

	_ func(B) B                                    = (*sdk.SandboxBuilder).WithPrivileged
	_ func(B, float64) B                           = (*sdk.SandboxBuilder).WithCPUs
	_ func(B, int) B                               = (*sdk.SandboxBuilder).WithMemory
	_ func(B, int) B                               = (*sdk.SandboxBuilder).WithDiskSize
	_ func(B, int) B                               = (*sdk.SandboxBuilder).WithTimeout
	_ func(B, string) B                            = (*sdk.SandboxBuilder).WithWorkspace
	_ func(B, *sdk.VFSInterceptionConfig) B        = (*sdk.SandboxBuilder).WithVFSInterception
	_ func(B, string, string) B                    = (*sdk.SandboxBuilder).WithEnv
	_ func(B, map[string]string) B                 = (*sdk.SandboxBuilder).WithEnvMap
	_ func(B, ...string) B                         = (*sdk.SandboxBuilder).AllowHost
	_ func(B, string, string) B                    = (*sdk.SandboxBuilder).AddHost
	_ func(B) B                                    = (*sdk.SandboxBuilder).BlockPrivateIPs
	_ func(B, bool) B                              = (*sdk.SandboxBuilder).WithBlockPrivateIPs
	_ func(B) B                                    = (*sdk.SandboxBuilder).AllowPrivateIPs
	_ func(B) B                                    = (*sdk.SandboxBuilder).UnsetBlockPrivateIPs
	_ func(B, string, string, ...string) B         = (*sdk.SandboxBuilder).AddSecret
	_ func(B, ...string) B                         = (*sdk.SandboxBuilder).WithDNSServers
	_ func(B, string) B                            = (*sdk.SandboxBuilder).WithHostname
	_ func(B, int) B                               = (*sdk.SandboxBuilder).WithNetworkMTU
	_ func(B) B                                    = (*sdk.SandboxBuilder).WithNoNetwork
	_ func(B, ...*sdk.NetworkInterceptionConfig) B = (*sdk.SandboxBuilder).WithNetworkInterception
	_ func(B, int, int) B                          = (*sdk.SandboxBuilder).WithPortForward
	_ func(B, ...string) B                         = (*sdk.SandboxBuilder).WithPortForwardAddresses
	_ func(B, string, sdk.MountConfig) B           = (*sdk.SandboxBuilder).Mount
	_ func(B, string, string) B                    = (*sdk.SandboxBuilder).MountHostDir
	_ func(B, string, string) B                    = (*sdk.SandboxBuilder).MountHostDirReadonly
	_ func(B, string) B                            = (*sdk.SandboxBuilder).MountMemory
	_ func(B, string, string) B                    = (*sdk.SandboxBuilder).MountOverlay
	_ func(B, string) B                            = (*sdk.SandboxBuilder).WithUser
	_ func(B, ...string) B                         = (*sdk.SandboxBuilder).WithEntrypoint
	_ func(B, *sdk.ImageConfig) B                  = (*sdk.SandboxBuilder).WithImageConfig
	_ func(B) sdk.CreateOptions                    = (*sdk.SandboxBuilder).Options

	_ sdk.NetworkHookFunc      = func(context.Context, sdk.NetworkHookRequest) (*sdk.NetworkHookResult, error) { return nil, nil }
	_ sdk.VFSHookFunc          = func(context.Context, sdk.VFSHookEvent) error { return nil }
	_ sdk.VFSDangerousHookFunc = func(context.Context, *sdk.Client, sdk.VFSHookEvent) error { return nil }
	_ sdk.VFSMutateHookFunc    = func(context.Context, sdk.VFSMutateRequest) ([]byte, error) { return nil, nil }
	_ sdk.VFSActionHookFunc    = func(context.Context, sdk.VFSActionRequest) sdk.VFSHookAction { return sdk.VFSHookActionAllow }

	_ error = &sdk.RPCError{Code: sdk.ErrCodeVMFailed, Message: ""}
	_       = []int{sdk.ErrCodeParse, sdk.ErrCodeInvalidRequest, sdk.ErrCodeMethodNotFound, sdk.ErrCodeInvalidParams,
		sdk.ErrCodeInternal, sdk.ErrCodeExecFailed, sdk.ErrCodeFileFailed, sdk.ErrCodeCancelled}
	_ = []string{sdk.NetworkHookPhaseBefore, sdk.NetworkHookPhaseAfter, sdk.NetworkHookActionAllow,
		sdk.NetworkHookActionBlock, sdk.NetworkHookActionMutate, sdk.VFSHookPhaseBefore, sdk.VFSHookPhaseAfter,
		sdk.VFSHookActionBlock, sdk.VFSHookOpStat, sdk.VFSHookOpReadDir, sdk.VFSHookOpOpen, sdk.VFSHookOpCreate,
		sdk.VFSHookOpMkdir, sdk.VFSHookOpChmod, sdk.VFSHookOpRemove, sdk.VFSHookOpRemoveAll, sdk.VFSHookOpRename,
		sdk.VFSHookOpSymlink, sdk.VFSHookOpReadlink, sdk.VFSHookOpRead, sdk.VFSHookOpWrite, sdk.VFSHookOpClose,
		sdk.VFSHookOpSync, sdk.VFSHookOpTruncate, api.MountTypeMemory, api.MountTypeHostFS, api.MountTypeOverlay}
)

// Struct literals with the reference's field names (keyed, as programs write them).
var _ = sdk.CreateOptions{
	Image: "i", Privileged: true, CPUs: 1, MemoryMB: 1, DiskSizeMB: 1, TimeoutSeconds: 1,
	AllowedHosts: nil, AddHosts: []api.HostIPMapping{{Host: "h", IP: "1.2.3.4"}},
	BlockPrivateIPs: true, BlockPrivateIPsSet: true, NoNetwork: false, ForceInterception: true,
	NetworkInterception: &sdk.NetworkInterceptionConfig{Rules: []sdk.NetworkHookRule{{
		Name: "n", Phase: sdk.NetworkHookPhaseAfter, Hosts: []string{"h"}, Methods: []string{"GET"}, Path: "/p",
		Action: sdk.NetworkHookActionMutate, SetHeaders: map[string]string{}, DeleteHeaders: []string{},
		SetQuery: map[string]string{}, DeleteQuery: []string{}, RewritePath: "/q",
		SetResponseHeaders: map[string]string{}, DeleteResponseHeaders: []string{},
		BodyReplacements: []sdk.NetworkBodyTransform{{Find: "a", Replace: "b"}}, TimeoutMS: 1,
		Hook: func(ctx context.Context, req sdk.NetworkHookRequest) (*sdk.NetworkHookResult, error) {
			_, _, _, _, _, _, _, _, _ = req.Phase, req.Host, req.Method, req.Path, req.Query, req.RequestHeaders, req.StatusCode, req.ResponseHeaders, req.IsSSE
			return &sdk.NetworkHookResult{Action: sdk.NetworkHookActionMutate,
				Request:  &sdk.NetworkHookRequestMutation{Headers: map[string][]string{}, Query: map[string]string{}, Path: "/"},
				Response: &sdk.NetworkHookResponseMutation{Headers: map[string][]string{}, BodyReplacements: nil, SetBody: []byte("x")}}, nil
		},
	}}},
	Mounts: map[string]sdk.MountConfig{"/w": {Type: "memory", HostPath: "", Readonly: false}},
	Env:    map[string]string{}, Secrets: []sdk.Secret{{Name: "K", Value: "v", Hosts: []string{"h"}}},
	Workspace: "/w",
	VFSInterception: &sdk.VFSInterceptionConfig{EmitEvents: true, Rules: []sdk.VFSHookRule{{
		Name: "r", Phase: sdk.VFSHookPhaseBefore, Ops: []sdk.VFSHookOp{sdk.VFSHookOpWrite}, Path: "/w/*",
		Action: sdk.VFSHookActionAllow, TimeoutMS: 1,
		ActionHook: func(ctx context.Context, req sdk.VFSActionRequest) sdk.VFSHookAction {
			_, _, _, _, _, _ = req.Op, req.Path, req.Size, req.Mode, req.UID, req.GID
			return sdk.VFSHookActionBlock
		},
	}}},
	DNSServers: []string{"1.1.1.1"}, Hostname: "h", NetworkMTU: 1400,
	PortForwards: []api.PortForward{{LocalPort: 1, RemotePort: 2}}, PortForwardAddresses: []string{"127.0.0.1"},
	ImageConfig:      &sdk.ImageConfig{User: "u", WorkingDir: "/", Entrypoint: []string{"sh"}, Cmd: []string{"-c"}, Env: map[string]string{}},
	LaunchEntrypoint: true,
}

var _ = func(r *sdk.ExecResult, s *sdk.ExecStreamResult, p *sdk.ExecPipeResult, i *sdk.ExecInteractiveResult,
	f sdk.FileInfo, v sdk.VolumeInfo, u *sdk.AllowListUpdate, b api.PortForwardBinding, e sdk.VFSHookEvent, m sdk.VFSMutateRequest) {
	_, _, _, _ = r.ExitCode, r.Stdout, r.Stderr, r.DurationMS
	_, _, _, _, _, _ = s.ExitCode, s.DurationMS, p.ExitCode, p.DurationMS, i.ExitCode, i.DurationMS
	_, _, _, _ = f.Name, f.Size, f.Mode, f.IsDir
	_, _, _ = v.Name, v.Size, v.Path
	_, _, _ = u.Added, u.Removed, u.AllowedHosts
	_, _, _ = b.Address, b.LocalPort, b.RemotePort
	_, _, _, _, _, _ = e.Op, e.Path, e.Size, e.Mode, e.UID, e.GID
	_, _, _, _, _ = m.Path, m.Size, m.Mode, m.UID, m.GID
	_ = sdk.ExecPipeOptions{WorkingDir: "", User: "", Stdin: nil, Stdout: nil, Stderr: nil}
	_ = sdk.ExecInteractiveOptions{WorkingDir: "", User: "", Rows: 24, Cols: 80, Stdin: nil, Stdout: nil, Resize: make(chan [2]uint16)}
}
