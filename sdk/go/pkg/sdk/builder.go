package sdk

import (
	"context"

	"matchlock.dev/go/pkg/api"
)

// SandboxBuilder configures a sandbox fluently; every method returns the builder.
//
//	sandbox := sdk.New("python:3.12-alpine").WithCPUs(2).AllowHost("api.openai.com")
//	vmID, err := client.Launch(sandbox)
type SandboxBuilder struct {
	opts CreateOptions
}

// New starts a builder for image.
func New(image string) *SandboxBuilder {
	return &SandboxBuilder{opts: CreateOptions{Image: image}}
}

func (b *SandboxBuilder) WithPrivileged() *SandboxBuilder { b.opts.Privileged = true; return b }

func (b *SandboxBuilder) WithCPUs(cpus float64) *SandboxBuilder { b.opts.CPUs = cpus; return b }

func (b *SandboxBuilder) WithMemory(mb int) *SandboxBuilder { b.opts.MemoryMB = mb; return b }

func (b *SandboxBuilder) WithDiskSize(mb int) *SandboxBuilder { b.opts.DiskSizeMB = mb; return b }

func (b *SandboxBuilder) WithTimeout(seconds int) *SandboxBuilder {
	b.opts.TimeoutSeconds = seconds
	return b
}

func (b *SandboxBuilder) WithWorkspace(path string) *SandboxBuilder {
	b.opts.Workspace = path
	return b
}

func (b *SandboxBuilder) WithVFSInterception(cfg *VFSInterceptionConfig) *SandboxBuilder {
	b.opts.VFSInterception = cfg
	return b
}

// WithEnv sets one non-secret variable for every command.
func (b *SandboxBuilder) WithEnv(name, value string) *SandboxBuilder {
	if b.opts.Env == nil {
		b.opts.Env = map[string]string{}
	}
	b.opts.Env[name] = value
	return b
}

// WithEnvMap merges variables into the environment.
func (b *SandboxBuilder) WithEnvMap(env map[string]string) *SandboxBuilder {
	for k, v := range env {
		b.WithEnv(k, v)
	}
	return b
}

// AllowHost appends allow-list globs.
func (b *SandboxBuilder) AllowHost(hosts ...string) *SandboxBuilder {
	b.opts.AllowedHosts = append(b.opts.AllowedHosts, hosts...)
	return b
}

// AddHost adds a guest /etc/hosts entry.
func (b *SandboxBuilder) AddHost(host, ip string) *SandboxBuilder {
	b.opts.AddHosts = append(b.opts.AddHosts, api.HostIPMapping{Host: host, IP: ip})
	return b
}

func (b *SandboxBuilder) BlockPrivateIPs() *SandboxBuilder { return b.WithBlockPrivateIPs(true) }

func (b *SandboxBuilder) WithBlockPrivateIPs(enabled bool) *SandboxBuilder {
	b.opts.BlockPrivateIPs, b.opts.BlockPrivateIPsSet = enabled, true
	return b
}

func (b *SandboxBuilder) AllowPrivateIPs() *SandboxBuilder { return b.WithBlockPrivateIPs(false) }

// AllowPrivate (extension, as the Python SDK's allow_private) lets the guest reach
// these private addresses or CIDRs ("10.1.2.3", "10.1.0.0/16") while every other
// private range stays blocked. Invalid entries fail Create.
func (b *SandboxBuilder) AllowPrivate(addresses ...string) *SandboxBuilder {
	b.opts.AllowPrivate = append(b.opts.AllowPrivate, addresses...)
	return b
}

// UnsetBlockPrivateIPs returns to the default (blocked).
func (b *SandboxBuilder) UnsetBlockPrivateIPs() *SandboxBuilder {
	b.opts.BlockPrivateIPs, b.opts.BlockPrivateIPsSet = false, false
	return b
}

// AddSecret exposes name as a placeholder in the guest; the real value is
// substituted only in requests to hosts.
func (b *SandboxBuilder) AddSecret(name, value string, hosts ...string) *SandboxBuilder {
	b.opts.Secrets = append(b.opts.Secrets, Secret{Name: name, Value: value, Hosts: hosts})
	return b
}

// AddSecretWithPlaceholder is AddSecret with a fixed placeholder.
func (b *SandboxBuilder) AddSecretWithPlaceholder(name, value, placeholder string, hosts ...string) *SandboxBuilder {
	b.opts.Secrets = append(b.opts.Secrets, Secret{Name: name, Value: value, Hosts: hosts, Placeholder: placeholder})
	return b
}

func (b *SandboxBuilder) WithDNSServers(servers ...string) *SandboxBuilder {
	b.opts.DNSServers = append(b.opts.DNSServers, servers...)
	return b
}

func (b *SandboxBuilder) WithHostname(hostname string) *SandboxBuilder {
	b.opts.Hostname = hostname
	return b
}

func (b *SandboxBuilder) WithNetworkMTU(mtu int) *SandboxBuilder { b.opts.NetworkMTU = mtu; return b }

func (b *SandboxBuilder) WithNoNetwork() *SandboxBuilder { b.opts.NoNetwork = true; return b }

// WithNetworkInterception forces interception; with a config it also installs rules.
func (b *SandboxBuilder) WithNetworkInterception(cfg ...*NetworkInterceptionConfig) *SandboxBuilder {
	b.opts.ForceInterception = true
	if len(cfg) > 0 {
		b.opts.NetworkInterception = cfg[0]
	}
	return b
}

func (b *SandboxBuilder) WithPortForward(localPort, remotePort int) *SandboxBuilder {
	b.opts.PortForwards = append(b.opts.PortForwards, api.PortForward{LocalPort: localPort, RemotePort: remotePort})
	return b
}

func (b *SandboxBuilder) WithPortForwardAddresses(addresses ...string) *SandboxBuilder {
	b.opts.PortForwardAddresses = append(b.opts.PortForwardAddresses, addresses...)
	return b
}

// Mount adds a VFS mount at guestPath.
func (b *SandboxBuilder) Mount(guestPath string, cfg MountConfig) *SandboxBuilder {
	if b.opts.Mounts == nil {
		b.opts.Mounts = map[string]MountConfig{}
	}
	b.opts.Mounts[guestPath] = cfg
	return b
}

func (b *SandboxBuilder) MountHostDir(guestPath, hostPath string) *SandboxBuilder {
	return b.Mount(guestPath, MountConfig{Type: api.MountTypeHostFS, HostPath: hostPath})
}

func (b *SandboxBuilder) MountHostDirReadonly(guestPath, hostPath string) *SandboxBuilder {
	return b.Mount(guestPath, MountConfig{Type: api.MountTypeHostFS, HostPath: hostPath, Readonly: true})
}

func (b *SandboxBuilder) MountMemory(guestPath string) *SandboxBuilder {
	return b.Mount(guestPath, MountConfig{Type: api.MountTypeMemory})
}

// MountOverlay mounts a per-VM copy of hostPath (the host stays untouched).
func (b *SandboxBuilder) MountOverlay(guestPath, hostPath string) *SandboxBuilder {
	return b.Mount(guestPath, MountConfig{Type: api.MountTypeOverlay, HostPath: hostPath})
}

func (b *SandboxBuilder) imageConfig() *ImageConfig {
	if b.opts.ImageConfig == nil {
		b.opts.ImageConfig = &ImageConfig{}
	}
	return b.opts.ImageConfig
}

// WithUser sets the default user (uid, uid:gid or name).
func (b *SandboxBuilder) WithUser(user string) *SandboxBuilder {
	b.imageConfig().User = user
	return b
}

// WithEntrypoint overrides the image entrypoint.
func (b *SandboxBuilder) WithEntrypoint(entrypoint ...string) *SandboxBuilder {
	b.imageConfig().Entrypoint = entrypoint
	return b
}

// WithImageConfig merges the set fields of cfg.
func (b *SandboxBuilder) WithImageConfig(cfg *ImageConfig) *SandboxBuilder {
	if cfg == nil {
		return b
	}
	ic := b.imageConfig()
	if cfg.User != "" {
		ic.User = cfg.User
	}
	if cfg.WorkingDir != "" {
		ic.WorkingDir = cfg.WorkingDir
	}
	if cfg.Entrypoint != nil {
		ic.Entrypoint = cfg.Entrypoint
	}
	if cfg.Cmd != nil {
		ic.Cmd = cfg.Cmd
	}
	if cfg.Env != nil {
		ic.Env = cfg.Env
	}
	return b
}

// Options returns the collected CreateOptions (for Client.Create).
func (b *SandboxBuilder) Options() CreateOptions { return b.opts }

// Launch creates the sandbox and starts the image's ENTRYPOINT/CMD detached.
func (c *Client) Launch(b *SandboxBuilder) (string, error) {
	return c.LaunchContext(context.Background(), b)
}

// LaunchContext is Launch bounded by ctx (a VM created after ctx ended is still
// owned by the client and closed by Close).
func (c *Client) LaunchContext(ctx context.Context, b *SandboxBuilder) (string, error) {
	opts := b.Options()
	opts.LaunchEntrypoint = true
	return c.CreateContext(ctx, opts)
}
