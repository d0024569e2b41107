package sdk

import (
	"errors"
	"fmt"
)

// Sentinel errors (names as in the reference SDK); wrapped errors keep them
// reachable through errors.Is.
var (
	ErrStdinPipe  = errors.New("get stdin pipe")
	ErrStdoutPipe = errors.New("get stdout pipe")
	ErrStderrPipe = errors.New("get stderr pipe")
	ErrStartProc  = errors.New("start matchlock")

	ErrClientClosed    = errors.New("client is closed")
	ErrMarshalRequest  = errors.New("marshal request")
	ErrWriteRequest    = errors.New("write request")
	ErrConnectionClose = errors.New("connection closed")

	ErrImageRequired       = errors.New("image is required (e.g., alpine:latest)")
	ErrInvalidNetworkMTU   = errors.New("network mtu must be > 0")
	ErrNoNetworkConflict   = errors.New("no network cannot be combined with allowed hosts, secrets, forced interception, or network interception rules")
	ErrInvalidAddHost      = errors.New("invalid add-host mapping")
	ErrInvalidCPUs         = errors.New("invalid cpus")
	ErrInvalidAllowPrivate = errors.New("invalid allow-private address")
	ErrInvalidNetworkHook  = errors.New("invalid network hook")
	ErrParseCreateResult   = errors.New("parse create result")
	ErrInvalidVFSHook      = errors.New("invalid vfs hook")
	ErrVFSHookBlocked      = errors.New("vfs hook blocked operation")
	ErrParsePortForwards   = errors.New("parse port-forward spec")
	ErrParsePortBindings   = errors.New("parse port-forward result")

	ErrParseExecResult       = errors.New("parse exec result")
	ErrParseExecStreamResult = errors.New("parse exec_stream result")
	ErrParseExecPipeResult   = errors.New("parse exec_pipe result")
	ErrParseExecTTYResult    = errors.New("parse exec_tty result")

	ErrParseReadResult = errors.New("parse read result")
	ErrParseListResult = errors.New("parse list result")
	ErrParseLogResult  = errors.New("parse log result")
	ErrAllowListHosts  = errors.New("allow-list hosts are required")
	ErrParseAllowList  = errors.New("parse allow-list result")

	ErrCloseTimeout            = errors.New("close timed out, process killed")
	ErrRemoveVM                = errors.New("matchlock rm")
	ErrBinaryPathRequired      = errors.New("matchlock binary path is required")
	ErrVolumeNameRequired      = errors.New("volume name is required")
	ErrInvalidVolumeSize       = errors.New("volume size must be > 0")
	ErrVolumeCommand           = errors.New("matchlock volume command")
	ErrParseVolumeCreateResult = errors.New("parse volume create result")
	ErrParseVolumeListResult   = errors.New("parse volume list result")
)

// wrapErr returns "sentinel: cause", matching both with errors.Is.
func wrapErr(sentinel, cause error) error {
	return fmt.Errorf("%w: %w", sentinel, cause)
}

// withDetail returns sentinel followed by formatted detail, matching sentinel.
func withDetail(sentinel error, format string, args ...any) error {
	return fmt.Errorf("%w"+format, append([]any{sentinel}, args...)...)
}

// JSON-RPC error codes used by `matchlock rpc` (spec §3).
const (
	ErrCodeParse          = -32700
	ErrCodeInvalidRequest = -32600
	ErrCodeMethodNotFound = -32601
	ErrCodeInvalidParams  = -32602
	ErrCodeInternal       = -32603
	ErrCodeVMFailed       = -32000
	ErrCodeExecFailed     = -32001
	ErrCodeFileFailed     = -32002
	ErrCodeCancelled      = -32003
)

// RPCError is an error response from the server.
type RPCError struct {
	Code    int
	Message string
}

func (e *RPCError) Error() string {
	return fmt.Sprintf("matchlock RPC error [%d]: %s", e.Code, e.Message)
}

// IsVMError reports a VM-level failure (-32000).
func (e *RPCError) IsVMError() bool { return e.Code == ErrCodeVMFailed }

// IsExecError reports a failure to run a command (-32001).
func (e *RPCError) IsExecError() bool { return e.Code == ErrCodeExecFailed }

// IsFileError reports a file operation failure (-32002).
func (e *RPCError) IsFileError() bool { return e.Code == ErrCodeFileFailed }
