// Package api holds the small wire types the SDK shares with `matchlock rpc`
// (host mappings, port forwards, defaults), so that programs written against the
// reference's pkg/api + pkg/sdk pair compile here with only their import paths changed.
package api

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Server-side defaults for `create` resources (spec §2.1.1).
const (
	DefaultCPUs           = 1
	DefaultMemoryMB       = 512
	DefaultDiskSizeMB     = 5120
	DefaultTimeoutSeconds = 300
)

// VFS mount types.
const (
	MountTypeMemory  = "memory"
	MountTypeHostFS  = "host_fs"
	MountTypeOverlay = "overlay"
)

// HostIPMapping is one extra /etc/hosts entry injected into the guest.
type HostIPMapping struct {
	Host string `json:"host"`
	IP   string `json:"ip"`
}

// PortForward maps a host port to a guest port.
type PortForward struct {
	LocalPort  int `json:"local_port"`
	RemotePort int `json:"remote_port"`
}

// PortForwardBinding is one listener the server actually bound.
type PortForwardBinding struct {
	Address    string `json:"address"`
	LocalPort  int    `json:"local_port"`
	RemotePort int    `json:"remote_port"`
}

// ValidateAddHost checks a host mapping the way the CLI does: a host name without
// whitespace or ':' and a literal IPv4/IPv6 address.
func ValidateAddHost(m HostIPMapping) error {
	host := strings.TrimSpace(m.Host)
	if host == "" {
		return errors.New("host is required")
	}
	if strings.ContainsAny(m.Host, " \t\r\n:") {
		return fmt.Errorf("host %q must not contain whitespace or ':'", m.Host)
	}
	if net.ParseIP(strings.TrimSpace(m.IP)) == nil {
		return fmt.Errorf("ip %q for host %q is not an IPv4 or IPv6 address", m.IP, m.Host)
	}
	return nil
}

// ParsePortForwards parses "[LOCAL:]REMOTE" specs (LOCAL defaults to REMOTE).
func ParsePortForwards(specs []string) ([]PortForward, error) {
	out := make([]PortForward, 0, len(specs))
	for _, spec := range specs {
		pf, err := ParsePortForward(spec)
		if err != nil {
			return nil, err
		}
		out = append(out, pf)
	}
	return out, nil
}

// ParsePortForward parses one "[LOCAL:]REMOTE" spec.
func ParsePortForward(spec string) (PortForward, error) {
	s := strings.TrimSpace(spec)
	local, remote := s, s
	if i := strings.IndexByte(s, ':'); i >= 0 {
		local, remote = s[:i], s[i+1:]
	}
	lp, err1 := parsePort(local)
	rp, err2 := parsePort(remote)
	if err1 != nil || err2 != nil {
		return PortForward{}, fmt.Errorf("invalid port forward %q: expected [LOCAL_PORT:]REMOTE_PORT with ports 1-65535", spec)
	}
	return PortForward{LocalPort: lp, RemotePort: rp}, nil
}

func parsePort(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, errors.New("bad port")
	}
	return n, nil
}
