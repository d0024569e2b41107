package sdk

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"time"
)

func opSet(ops []VFSHookOp) map[string]struct{} {
	if len(ops) == 0 {
		return nil
	}
	m := make(map[string]struct{}, len(ops))
	for _, op := range ops {
		if op != "" {
			m[strings.ToLower(op)] = struct{}{}
		}
	}
	return m
}

// compileVFSHooks splits rules: plain rules go on the wire; callback rules stay
// local (spec §4.2), and after-hooks make the server emit file events.
func compileVFSHooks(cfg *VFSInterceptionConfig) (*VFSInterceptionConfig, []compiledVFSHook, []compiledVFSMutateHook, []compiledVFSActionHook, error) {
	if cfg == nil {
		return nil, nil, nil, nil, nil
	}
	wire := &VFSInterceptionConfig{EmitEvents: cfg.EmitEvents}
	var local []compiledVFSHook
	var mutate []compiledVFSMutateHook
	var action []compiledVFSActionHook
	for _, rule := range cfg.Rules {
		n := 0
		for _, set := range []bool{rule.Hook != nil, rule.DangerousHook != nil, rule.MutateHook != nil, rule.ActionHook != nil} {
			if set {
				n++
			}
		}
		if n > 1 {
			return nil, nil, nil, nil, withDetail(ErrInvalidVFSHook, " %q cannot set more than one callback hook", rule.Name)
		}
		act := strings.ToLower(strings.TrimSpace(rule.Action))
		if n == 0 {
			if act == "mutate_write" {
				return nil, nil, nil, nil, withDetail(ErrInvalidVFSHook, " %q mutate_write requires MutateHook callback", rule.Name)
			}
			wire.Rules = append(wire.Rules, rule)
			continue
		}
		if act != "" && act != VFSHookActionAllow {
			return nil, nil, nil, nil, withDetail(ErrInvalidVFSHook, " %q callback hooks cannot set action=%q", rule.Name, rule.Action)
		}
		phase := strings.ToLower(strings.TrimSpace(rule.Phase))
		timeout := time.Duration(rule.TimeoutMS) * time.Millisecond
		switch {
		case rule.Hook != nil || rule.DangerousHook != nil:
			if phase != VFSHookPhaseAfter {
				return nil, nil, nil, nil, withDetail(ErrInvalidVFSHook, " %q must use phase=after", rule.Name)
			}
			h := compiledVFSHook{name: rule.Name, ops: opSet(rule.Ops), path: rule.Path, timeout: timeout}
			if rule.Hook != nil {
				fn := rule.Hook
				h.callback = func(ctx context.Context, _ *Client, ev VFSHookEvent) error { return fn(ctx, ev) }
			} else {
				h.dangerous = true
				h.callback = rule.DangerousHook
			}
			local = append(local, h)
		case rule.ActionHook != nil:
			if phase != "" && phase != VFSHookPhaseBefore {
				return nil, nil, nil, nil, withDetail(ErrInvalidVFSHook, " %q action hook must use phase=before", rule.Name)
			}
			action = append(action, compiledVFSActionHook{name: rule.Name, ops: opSet(rule.Ops), path: rule.Path, callback: rule.ActionHook})
		default:
			if phase != "" && phase != VFSHookPhaseBefore {
				return nil, nil, nil, nil, withDetail(ErrInvalidVFSHook, " %q mutate hook must use phase=before", rule.Name)
			}
			mutate = append(mutate, compiledVFSMutateHook{name: rule.Name, ops: opSet(rule.Ops), path: rule.Path, callback: rule.MutateHook})
		}
	}
	if len(local) > 0 {
		wire.EmitEvents = true
	}
	if len(wire.Rules) == 0 && !wire.EmitEvents {
		wire = nil
	}
	return wire, local, mutate, action, nil
}

func (c *Client) setVFSHooks(h []compiledVFSHook, m []compiledVFSMutateHook, a []compiledVFSActionHook) {
	c.vfsHookMu.Lock()
	c.vfsHooks, c.vfsMutateHooks, c.vfsActionHooks = h, m, a
	c.vfsHookActive.Store(false)
	c.vfsHookMu.Unlock()
}

func hookMatches(ops map[string]struct{}, pattern, op, path string) bool {
	if len(ops) > 0 {
		if _, ok := ops[strings.ToLower(op)]; !ok {
			return false
		}
	}
	if pattern == "" {
		return true
	}
	ok, err := filepath.Match(pattern, path)
	return err == nil && ok
}

// handleEvent receives `event` notifications; file events feed after-hooks.
func (c *Client) handleEvent(params json.RawMessage) {
	var ev struct {
		File *struct {
			Op   string `json:"op"`
			Path string `json:"path"`
			Size int64  `json:"size"`
			Mode uint32 `json:"mode"`
			UID  int    `json:"uid"`
			GID  int    `json:"gid"`
		} `json:"file"`
	}
	if json.Unmarshal(params, &ev) != nil || ev.File == nil {
		return
	}
	c.vfsHookMu.RLock()
	hooks := c.vfsHooks
	c.vfsHookMu.RUnlock()
	if len(hooks) == 0 {
		return
	}
	f := ev.File
	event := VFSHookEvent{Op: f.Op, Path: f.Path, Size: f.Size, Mode: f.Mode, UID: f.UID, GID: f.GID}
	var safe []compiledVFSHook
	for _, h := range hooks {
		if !hookMatches(h.ops, h.path, f.Op, f.Path) {
			continue
		}
		if h.dangerous {
			go c.runVFSHook(h, event) // may call back into the client: never on the reader
			continue
		}
		safe = append(safe, h)
	}
	// Safe hooks run one batch at a time; events arriving meanwhile are dropped, so
	// a hook's own file writes cannot re-trigger it.
	if len(safe) == 0 || !c.vfsHookActive.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer c.vfsHookActive.Store(false)
		for _, h := range safe {
			c.runVFSHook(h, event)
		}
	}()
}

func (c *Client) runVFSHook(h compiledVFSHook, event VFSHookEvent) {
	ctx := context.Background()
	if h.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, h.timeout)
		defer cancel()
	}
	defer func() { _ = recover() }() // a hook's panic must not take the client down
	_ = h.callback(ctx, c, event)
}

func (c *Client) applyActionHooks(ctx context.Context, op VFSHookOp, path string, size int, mode uint32) error {
	c.vfsHookMu.RLock()
	hooks := c.vfsActionHooks
	c.vfsHookMu.RUnlock()
	if len(hooks) == 0 {
		return nil
	}
	req := VFSActionRequest{Op: op, Path: path, Size: size, Mode: mode, UID: os.Geteuid(), GID: os.Getegid()}
	for _, h := range hooks {
		if !hookMatches(h.ops, h.path, op, path) {
			continue
		}
		switch d := strings.ToLower(strings.TrimSpace(h.callback(ctx, req))); d {
		case "", VFSHookActionAllow:
		case VFSHookActionBlock:
			return withDetail(ErrVFSHookBlocked, ": op=%s path=%s hook=%q", op, path, h.name)
		default:
			return withDetail(ErrInvalidVFSHook, " %q returned invalid action decision %q", h.name, d)
		}
	}
	return nil
}

func (c *Client) applyWriteMutations(ctx context.Context, path string, content []byte, mode uint32) ([]byte, error) {
	c.vfsHookMu.RLock()
	hooks := c.vfsMutateHooks
	c.vfsHookMu.RUnlock()
	cur := content
	for _, h := range hooks {
		if !hookMatches(h.ops, h.path, VFSHookOpWrite, path) {
			continue
		}
		out, err := h.callback(ctx, VFSMutateRequest{Path: path, Size: len(cur), Mode: mode, UID: os.Geteuid(), GID: os.Getegid()})
		if err != nil {
			return nil, err
		}
		if out != nil {
			cur = out
		}
	}
	return cur, nil
}
