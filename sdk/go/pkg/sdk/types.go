package sdk

import (
	"context"
	"time"

	"matchlock.dev/go/pkg/api"
)

// HostIPMapping, PortForward and PortForwardBinding are the wire types of pkg/api.
type (
	HostIPMapping      = api.HostIPMapping
	PortForward        = api.PortForward
	PortForwardBinding = api.PortForwardBinding
)

// CreateOptions configures a sandbox (see the builder, New).
type CreateOptions struct {
	// Image is the OCI image reference (required).
	Image string
	// Privileged skips in-guest hardening (seccomp, capability drop, no_new_privs).
	Privileged bool
	// CPUs is the vCPU count (fractions round up; at most the host's CPUs).
	CPUs float64
	// MemoryMB is guest memory in MiB.
	MemoryMB int
	// DiskSizeMB is the writable root disk size in MiB.
	DiskSizeMB int
	// TimeoutSeconds is stored with the VM.
	TimeoutSeconds int
	// AllowedHosts is the egress allow-list (globs); non-empty enables interception.
	AllowedHosts []string
	// AddHosts are extra guest /etc/hosts entries.
	AddHosts []api.HostIPMapping
	// BlockPrivateIPs with BlockPrivateIPsSet: an explicit private-range setting.
	BlockPrivateIPs    bool
	BlockPrivateIPsSet bool
	// AllowPrivate (extension) opens these private addresses or CIDRs while the
	// other private ranges stay blocked.
	AllowPrivate []string
	// NoNetwork gives the guest no NIC at all.
	NoNetwork bool
	// ForceInterception starts the HTTP(S) proxy even without allow-list or secrets.
	ForceInterception bool
	// NetworkInterception holds network hook rules (static or with callbacks).
	NetworkInterception *NetworkInterceptionConfig
	// Mounts are VFS mounts by guest path (each under Workspace).
	Mounts map[string]MountConfig
	// Env are non-secret variables for every command.
	Env map[string]string
	// Secrets are injected on egress; the guest sees placeholders only.
	Secrets []Secret
	// Workspace is the VFS root in the guest (required with Mounts).
	Workspace string
	// VFSInterception holds VFS hook rules.
	VFSInterception *VFSInterceptionConfig
	// DNSServers overrides the guest resolvers.
	DNSServers []string
	// Hostname overrides the guest hostname (default: the VM id).
	Hostname string
	// NetworkMTU overrides the guest MTU.
	NetworkMTU int
	// PortForwards are applied right after create.
	PortForwards []api.PortForward
	// PortForwardAddresses are their host bind addresses (default 127.0.0.1).
	PortForwardAddresses []string
	// ImageConfig overrides image metadata (USER, WORKDIR, ENTRYPOINT, CMD, ENV).
	ImageConfig *ImageConfig
	// LaunchEntrypoint starts the image's ENTRYPOINT/CMD detached (set by Launch).
	LaunchEntrypoint bool
}

// ImageConfig overrides OCI image metadata.
type ImageConfig struct {
	User       string            `json:"user,omitempty"`
	WorkingDir string            `json:"working_dir,omitempty"`
	Entrypoint []string          `json:"entrypoint,omitempty"`
	Cmd        []string          `json:"cmd,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
}

// Secret is a value the guest only sees as a placeholder environment variable; the
// host substitutes the real value in requests to Hosts.
type Secret struct {
	Name  string
	Value string
	Hosts []string
	// Placeholder is used verbatim when set (else the server generates one).
	Placeholder string
}

// MountConfig is one VFS mount.
type MountConfig struct {
	Type     string  `json:"type"` // memory, host_fs, overlay
	HostPath string  `json:"host_path,omitempty"`
	Readonly bool    `json:"readonly,omitempty"`
	OwnerUID *uint32 `json:"owner_uid,omitempty"`
	OwnerGID *uint32 `json:"owner_gid,omitempty"`
}

// Network hook phases.
type NetworkHookPhase = string

const (
	NetworkHookPhaseBefore NetworkHookPhase = "before"
	NetworkHookPhaseAfter  NetworkHookPhase = "after"
)

// Network hook actions.
type NetworkHookAction = string

const (
	NetworkHookActionAllow  NetworkHookAction = "allow"
	NetworkHookActionBlock  NetworkHookAction = "block"
	NetworkHookActionMutate NetworkHookAction = "mutate"
)

// NetworkBodyTransform is a literal response-body replacement (per `data:` line
// for text/event-stream).
type NetworkBodyTransform struct {
	Find    string `json:"find"`
	Replace string `json:"replace,omitempty"`
}

// NetworkHookRequest is what a network callback sees, after the rule's static
// host/method/path/phase filters matched.
type NetworkHookRequest struct {
	Phase  NetworkHookPhase
	Host   string
	Method string
	Path   string

	Query          map[string]string
	RequestHeaders map[string][]string

	StatusCode      int
	ResponseHeaders map[string][]string
	IsSSE           bool
}

// NetworkHookResult is a callback's decision; nil means allow unchanged.
type NetworkHookResult struct {
	Action NetworkHookAction

	Request  *NetworkHookRequestMutation
	Response *NetworkHookResponseMutation
}

// NetworkHookFunc runs in the SDK process for matching traffic. An error, a panic or
// running past the rule's TimeoutMS is reported to the server as an error (matchlock's
// server then blocks the request).
type NetworkHookFunc func(ctx context.Context, req NetworkHookRequest) (*NetworkHookResult, error)

// NetworkHookRequestMutation reshapes an outbound request.
type NetworkHookRequestMutation struct {
	// Headers replaces all request headers when non-nil.
	Headers map[string][]string
	// Query replaces the whole query when non-nil.
	Query map[string]string
	// Path rewrites the path when non-empty.
	Path string
}

// NetworkHookResponseMutation reshapes an inbound response.
type NetworkHookResponseMutation struct {
	// Headers replaces all response headers when non-nil.
	Headers          map[string][]string
	BodyReplacements []NetworkBodyTransform
	// SetBody replaces the whole body when non-nil.
	SetBody []byte
}

// NetworkHookRule is one interception rule; Hook makes it an SDK callback.
type NetworkHookRule struct {
	Name    string            `json:"name,omitempty"`
	Phase   NetworkHookPhase  `json:"phase,omitempty"`
	Hosts   []string          `json:"hosts,omitempty"`
	Methods []string          `json:"methods,omitempty"`
	Path    string            `json:"path,omitempty"`
	Action  NetworkHookAction `json:"action,omitempty"`

	SetHeaders    map[string]string `json:"set_headers,omitempty"`
	DeleteHeaders []string          `json:"delete_headers,omitempty"`
	SetQuery      map[string]string `json:"set_query,omitempty"`
	DeleteQuery   []string          `json:"delete_query,omitempty"`
	RewritePath   string            `json:"rewrite_path,omitempty"`

	SetResponseHeaders    map[string]string      `json:"set_response_headers,omitempty"`
	DeleteResponseHeaders []string               `json:"delete_response_headers,omitempty"`
	BodyReplacements      []NetworkBodyTransform `json:"body_replacements,omitempty"`
	TimeoutMS             int                    `json:"timeout_ms,omitempty"`

	// Hook runs in the SDK process (spec §4.1).
	Hook NetworkHookFunc `json:"-"`
}

// NetworkInterceptionConfig holds network hook rules.
type NetworkInterceptionConfig struct {
	Rules []NetworkHookRule `json:"rules,omitempty"`
}

// VFSInterceptionConfig holds VFS hook rules.
type VFSInterceptionConfig struct {
	EmitEvents bool          `json:"emit_events,omitempty"`
	Rules      []VFSHookRule `json:"rules,omitempty"`
}

// VFS hook phases.
type VFSHookPhase = string

const (
	VFSHookPhaseBefore VFSHookPhase = "before"
	VFSHookPhaseAfter  VFSHookPhase = "after"
)

// VFS hook actions.
type VFSHookAction = string

const (
	VFSHookActionAllow VFSHookAction = "allow"
	VFSHookActionBlock VFSHookAction = "block"
)

// VFS hook operations.
type VFSHookOp = string

const (
	VFSHookOpStat      VFSHookOp = "stat"
	VFSHookOpReadDir   VFSHookOp = "readdir"
	VFSHookOpOpen      VFSHookOp = "open"
	VFSHookOpCreate    VFSHookOp = "create"
	VFSHookOpMkdir     VFSHookOp = "mkdir"
	VFSHookOpChmod     VFSHookOp = "chmod"
	VFSHookOpRemove    VFSHookOp = "remove"
	VFSHookOpRemoveAll VFSHookOp = "remove_all"
	VFSHookOpRename    VFSHookOp = "rename"
	VFSHookOpSymlink   VFSHookOp = "symlink"
	VFSHookOpReadlink  VFSHookOp = "readlink"
	VFSHookOpRead      VFSHookOp = "read"
	VFSHookOpWrite     VFSHookOp = "write"
	VFSHookOpClose     VFSHookOp = "close"
	VFSHookOpSync      VFSHookOp = "sync"
	VFSHookOpTruncate  VFSHookOp = "truncate"
)

// VFSHookRule is one VFS rule; at most one of the callbacks may be set.
type VFSHookRule struct {
	Name      string        `json:"name,omitempty"`
	Phase     VFSHookPhase  `json:"phase,omitempty"`
	Ops       []VFSHookOp   `json:"ops,omitempty"`
	Path      string        `json:"path,omitempty"`
	Action    VFSHookAction `json:"action,omitempty"`
	TimeoutMS int           `json:"timeout_ms,omitempty"`
	// Hook (phase after) runs on file events; events during a run are dropped.
	Hook VFSHookFunc `json:"-"`
	// DangerousHook (phase after) gets the client and may re-trigger itself.
	DangerousHook VFSDangerousHookFunc `json:"-"`
	// MutateHook (phase before) may replace the content of the SDK's own WriteFile.
	MutateHook VFSMutateHookFunc `json:"-"`
	// ActionHook (phase before) may block the SDK's own WriteFile/ReadFile/ListFiles.
	ActionHook VFSActionHookFunc `json:"-"`
}

// VFSHookEvent is one file event from the guest.
type VFSHookEvent struct {
	Op   VFSHookOp
	Path string
	Size int64
	Mode uint32
	UID  int
	GID  int
}

// VFSHookFunc observes a file event; its error is ignored.
type VFSHookFunc func(ctx context.Context, event VFSHookEvent) error

// VFSDangerousHookFunc observes a file event with the client in hand.
type VFSDangerousHookFunc func(ctx context.Context, client *Client, event VFSHookEvent) error

// VFSMutateRequest describes a pending SDK WriteFile.
type VFSMutateRequest struct {
	Path string
	Size int
	Mode uint32
	UID  int
	GID  int
}

// VFSMutateHookFunc returns replacement content (nil keeps it).
type VFSMutateHookFunc func(ctx context.Context, req VFSMutateRequest) ([]byte, error)

// VFSActionRequest describes a pending SDK file operation.
type VFSActionRequest struct {
	Op   VFSHookOp
	Path string
	Size int
	Mode uint32
	UID  int
	GID  int
}

// VFSActionHookFunc returns allow ("" too) or block.
type VFSActionHookFunc func(ctx context.Context, req VFSActionRequest) VFSHookAction

type compiledVFSHook struct {
	name      string
	ops       map[string]struct{}
	path      string
	timeout   time.Duration
	dangerous bool
	callback  func(ctx context.Context, client *Client, event VFSHookEvent) error
}

type compiledVFSMutateHook struct {
	name     string
	ops      map[string]struct{}
	path     string
	callback VFSMutateHookFunc
}

type compiledVFSActionHook struct {
	name     string
	ops      map[string]struct{}
	path     string
	callback VFSActionHookFunc
}

type compiledNetworkHook struct {
	id       string
	name     string
	phase    NetworkHookPhase
	timeout  time.Duration
	callback NetworkHookFunc
}
