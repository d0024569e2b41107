package sdk

import (
	"context"
	"encoding/json"
	"strings"

	"matchlock.dev/go/pkg/api"
)

// PortForward forwards "[LOCAL:]REMOTE" host ports on 127.0.0.1 to guest ports,
// replacing the previous forwards.
func (c *Client) PortForward(ctx context.Context, specs ...string) ([]api.PortForwardBinding, error) {
	return c.PortForwardWithAddresses(ctx, nil, specs...)
}

// PortForwardWithAddresses is PortForward bound on the given host addresses.
func (c *Client) PortForwardWithAddresses(ctx context.Context, addresses []string, specs ...string) ([]api.PortForwardBinding, error) {
	forwards, err := api.ParsePortForwards(specs)
	if err != nil {
		return nil, wrapErr(ErrParsePortForwards, err)
	}
	return c.portForwardMappings(ctx, addresses, forwards)
}

func (c *Client) portForwardMappings(ctx context.Context, addresses []string, forwards []api.PortForward) ([]api.PortForwardBinding, error) {
	if len(forwards) == 0 {
		return nil, nil
	}
	if len(addresses) == 0 {
		addresses = []string{"127.0.0.1"}
	}
	raw, err := c.call(ctx, "port_forward", map[string]any{
		"forwards": forwards, "addresses": append([]string(nil), addresses...),
	}, nil)
	if err != nil {
		return nil, err
	}
	var r struct {
		Bindings []api.PortForwardBinding `json:"bindings"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParsePortBindings, err)
	}
	for _, b := range r.Bindings {
		if b.Address == "" || b.LocalPort < 1 || b.LocalPort > 65535 || b.RemotePort < 1 || b.RemotePort > 65535 {
			return nil, withDetail(ErrParsePortBindings, ": invalid binding %+v", b)
		}
	}
	return r.Bindings, nil
}

// AllowListUpdate is the outcome of an allow-list change.
type AllowListUpdate struct {
	Added        []string
	Removed      []string
	AllowedHosts []string
}

// AllowListAdd adds hosts (comma-separated lists allowed) to the running VM's
// allow-list; the VM must have been created with interception.
func (c *Client) AllowListAdd(ctx context.Context, hosts ...string) (*AllowListUpdate, error) {
	return c.allowList(ctx, "allow_list_add", "added", hosts)
}

// AllowListDelete removes hosts from the running VM's allow-list.
func (c *Client) AllowListDelete(ctx context.Context, hosts ...string) (*AllowListUpdate, error) {
	return c.allowList(ctx, "allow_list_delete", "removed", hosts)
}

func (c *Client) allowList(ctx context.Context, method, key string, hosts []string) (*AllowListUpdate, error) {
	normalized := normalizeAllowListHosts(hosts)
	if len(normalized) == 0 {
		return nil, ErrAllowListHosts
	}
	raw, err := c.call(ctx, method, map[string]any{"hosts": normalized}, nil)
	if err != nil {
		return nil, err
	}
	var r struct {
		Added        *[]string `json:"added"`
		Removed      *[]string `json:"removed"`
		AllowedHosts []string  `json:"allowed_hosts"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParseAllowList, err)
	}
	u := &AllowListUpdate{AllowedHosts: nonNil(r.AllowedHosts)}
	if key == "added" {
		if r.Added == nil {
			return nil, withDetail(ErrParseAllowList, ": missing %q in %s", key, raw)
		}
		u.Added = nonNil(*r.Added)
	} else {
		if r.Removed == nil {
			return nil, withDetail(ErrParseAllowList, ": missing %q in %s", key, raw)
		}
		u.Removed = nonNil(*r.Removed)
	}
	return u, nil
}

// normalizeAllowListHosts splits on commas, trims, drops blanks and duplicates.
func normalizeAllowListHosts(hosts []string) []string {
	out := []string{}
	seen := map[string]bool{}
	for _, h := range hosts {
		for _, tok := range strings.Split(h, ",") {
			tok = strings.TrimSpace(tok)
			if tok != "" && !seen[tok] {
				seen[tok] = true
				out = append(out, tok)
			}
		}
	}
	return out
}
