package sdk

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"runtime"
	"strings"

	"matchlock.dev/go/pkg/api"
)

// Create creates and boots a VM and makes it the client's current one. If a
// post-create step (port forwards) fails, the VM id is returned with the error so
// the caller can still clean up.
func (c *Client) Create(opts CreateOptions) (string, error) {
	return c.CreateContext(context.Background(), opts)
}

// CreateContext is Create bounded by ctx. `create` cannot be cancelled on the
// server: a VM that boots after ctx ended is still recorded, and Close closes it.
func (c *Client) CreateContext(ctx context.Context, opts CreateOptions) (string, error) {
	if err := validateCreate(&opts); err != nil {
		return "", err
	}
	wireVFS, vfsHooks, mutateHooks, actionHooks, err := compileVFSHooks(opts.VFSInterception)
	if err != nil {
		return "", err
	}
	wireNet, netHooks, err := compileNetworkHooks(opts.NetworkInterception)
	if err != nil {
		return "", err
	}

	c.stopNetworkHookServer()
	if len(netHooks) > 0 {
		socket, err := c.startNetworkHookServer(netHooks)
		if err != nil {
			return "", withDetail(ErrInvalidNetworkHook, ": start callback server: %v", err)
		}
		if wireNet == nil {
			wireNet = &wireNetworkInterception{}
		}
		wireNet.CallbackSocket = socket
	}

	params := buildCreateParams(opts, wireNet, wireVFS)
	adopt := func(raw json.RawMessage) {
		var r struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(raw, &r) == nil && r.ID != "" {
			c.setVMID(r.ID)
		}
	}
	raw, err := c.callWithID(ctx, c.nextID(), "create", params, nil, adopt)
	if err != nil {
		if ctx.Err() == nil { // not abandoned: no VM can appear later
			c.stopNetworkHookServer()
		}
		return "", err
	}
	var res struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(raw, &res); err != nil || res.ID == "" {
		c.stopNetworkHookServer()
		if err == nil {
			err = fmt.Errorf("missing id in %s", raw)
		}
		return "", wrapErr(ErrParseCreateResult, err)
	}
	c.setVMID(res.ID)
	c.setVFSHooks(vfsHooks, mutateHooks, actionHooks)

	if len(opts.PortForwards) > 0 {
		if _, err := c.portForwardMappings(ctx, opts.PortForwardAddresses, opts.PortForwards); err != nil {
			return res.ID, err
		}
	}
	return res.ID, nil
}

func validateCreate(opts *CreateOptions) error {
	if strings.TrimSpace(opts.Image) == "" {
		return ErrImageRequired
	}
	if math.IsNaN(opts.CPUs) || math.IsInf(opts.CPUs, 0) || opts.CPUs < 0 {
		return withDetail(ErrInvalidCPUs, ": %v (must be a finite number > 0)", opts.CPUs)
	}
	if opts.CPUs == 0 {
		opts.CPUs = api.DefaultCPUs
	}
	if n := runtime.NumCPU(); math.Ceil(opts.CPUs) > float64(n) {
		return withDetail(ErrInvalidCPUs, ": %v (must be <= host cpus (%d))", opts.CPUs, n)
	}
	if opts.MemoryMB <= 0 {
		opts.MemoryMB = api.DefaultMemoryMB
	}
	if opts.DiskSizeMB <= 0 {
		opts.DiskSizeMB = api.DefaultDiskSizeMB
	}
	if opts.TimeoutSeconds <= 0 {
		opts.TimeoutSeconds = api.DefaultTimeoutSeconds
	}
	if opts.NetworkMTU < 0 {
		return ErrInvalidNetworkMTU
	}
	for _, a := range opts.AllowPrivate {
		if _, _, err := net.ParseCIDR(strings.TrimSpace(a)); err != nil && net.ParseIP(strings.TrimSpace(a)) == nil {
			return withDetail(ErrInvalidAllowPrivate, ": %q is not an IP address or CIDR", a)
		}
	}
	if opts.NoNetwork && len(opts.AllowPrivate) > 0 {
		return withDetail(ErrNoNetworkConflict, " (nor with allow-private)")
	}
	if opts.NoNetwork && (len(opts.AllowedHosts) > 0 || len(opts.Secrets) > 0 || opts.ForceInterception || opts.NetworkInterception != nil) {
		return ErrNoNetworkConflict
	}
	for _, m := range opts.AddHosts {
		if err := api.ValidateAddHost(m); err != nil {
			return wrapErr(ErrInvalidAddHost, err)
		}
	}
	return nil
}

func buildCreateParams(opts CreateOptions, wireNet *wireNetworkInterception, wireVFS *VFSInterceptionConfig) map[string]any {
	params := map[string]any{
		"image": opts.Image,
		// Sent in full, as by the reference Go SDK (defaults filled in).
		"resources": map[string]any{
			"cpus":            opts.CPUs,
			"memory_mb":       opts.MemoryMB,
			"disk_size_mb":    opts.DiskSizeMB,
			"timeout_seconds": opts.TimeoutSeconds,
		},
	}
	if opts.Privileged {
		params["privileged"] = true
	}
	if network := buildNetworkParams(opts, wireNet); network != nil {
		params["network"] = network
	}
	if len(opts.Mounts) > 0 || opts.Workspace != "" || wireVFS != nil {
		vfs := map[string]any{}
		if len(opts.Mounts) > 0 {
			vfs["mounts"] = opts.Mounts
		}
		if opts.Workspace != "" {
			vfs["workspace"] = opts.Workspace
		}
		if wireVFS != nil {
			vfs["interception"] = wireVFS
		}
		params["vfs"] = vfs
	}
	if len(opts.Env) > 0 {
		params["env"] = opts.Env
	}
	if opts.ImageConfig != nil {
		params["image_config"] = opts.ImageConfig
	}
	if opts.LaunchEntrypoint {
		params["launch_entrypoint"] = true
	}
	return params
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func buildNetworkParams(opts CreateOptions, wireNet *wireNetworkInterception) map[string]any {
	block, blockSet := opts.BlockPrivateIPs, opts.BlockPrivateIPsSet
	if !blockSet && opts.BlockPrivateIPs { // older callers could only say "true"
		blockSet = true
	}
	include := len(opts.AllowedHosts) > 0 || len(opts.AddHosts) > 0 || len(opts.Secrets) > 0 ||
		len(opts.DNSServers) > 0 || opts.Hostname != "" || opts.NetworkMTU > 0 || opts.NoNetwork ||
		blockSet || opts.ForceInterception || wireNet != nil || len(opts.AllowPrivate) > 0
	if !include {
		return nil
	}
	network := map[string]any{}
	if len(opts.AddHosts) > 0 {
		network["add_hosts"] = opts.AddHosts
	}
	if len(opts.DNSServers) > 0 {
		network["dns_servers"] = opts.DNSServers
	}
	if opts.Hostname != "" {
		network["hostname"] = opts.Hostname
	}
	if opts.NoNetwork {
		network["no_network"] = true
		return network
	}
	if !blockSet {
		block = true // a sent network object replaces the defaults wholesale
	}
	network["allowed_hosts"] = nonNil(opts.AllowedHosts)
	network["block_private_ips"] = block
	if opts.ForceInterception || wireNet != nil {
		network["intercept"] = true
	}
	if wireNet != nil {
		network["interception"] = wireNet
	}
	if len(opts.Secrets) > 0 {
		secrets := map[string]any{}
		for _, s := range opts.Secrets {
			entry := map[string]any{"value": s.Value, "hosts": nonNil(s.Hosts)}
			if s.Placeholder != "" {
				entry["placeholder"] = s.Placeholder
			}
			secrets[s.Name] = entry
		}
		network["secrets"] = secrets
	}
	if opts.NetworkMTU > 0 {
		network["mtu"] = opts.NetworkMTU
	}
	if len(opts.AllowPrivate) > 0 {
		network["allow_private"] = opts.AllowPrivate
	}
	return network
}
