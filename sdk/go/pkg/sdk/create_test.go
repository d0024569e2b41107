package sdk

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// createWith runs Create against the fake, answers it, and returns the params sent.
func createWith(t *testing.T, c *Client, f *fake, opts CreateOptions) (map[string]any, string, error) {
	t.Helper()
	type out struct {
		id  string
		err error
	}
	done := make(chan out, 1)
	go func() { id, err := c.Create(opts); done <- out{id, err} }()
	m := f.next()
	if m.Method != "create" {
		t.Fatalf("want create, got %v", m.raw)
	}
	f.result(m.id(), map[string]any{"id": "vm-0000abcd"})
	o := <-done
	return m.Params, o.id, o.err
}

func TestCreateDefaultsAndMinimalParams(t *testing.T) {
	c, f := newFake(t)
	p, id, err := createWith(t, c, f, CreateOptions{Image: "img"})
	if err != nil || id != "vm-0000abcd" || c.VMID() != id {
		t.Fatal(id, err)
	}
	res := p["resources"].(map[string]any)
	if res["cpus"] != 1.0 || res["memory_mb"] != 512.0 || res["disk_size_mb"] != 5120.0 || res["timeout_seconds"] != 300.0 {
		t.Fatalf("resources %v", res)
	}
	for _, k := range []string{"network", "vfs", "env", "privileged", "launch_entrypoint", "image_config", "id"} {
		if _, has := p[k]; has {
			t.Fatalf("unexpected %q in %v", k, p)
		}
	}
}

func TestCreateBuilderParams(t *testing.T) {
	c, f := newFake(t)
	sb := New("img").WithPrivileged().WithCPUs(1).WithMemory(256).WithDiskSize(1024).WithTimeout(60).
		AllowHost("api.test", "*.cdn.test").AddHost("api.test", "10.0.0.5").
		AddSecret("API_KEY", "sk-real", "api.test").AddSecretWithPlaceholder("OTHER", "v", "PH_1").
		WithDNSServers("1.1.1.1").WithHostname("box").WithNetworkMTU(1400).
		WithEnv("A", "1").WithEnvMap(map[string]string{"B": "2"}).
		WithWorkspace("/workspace").MountMemory("/workspace/m").MountHostDirReadonly("/workspace/r", "/srv").
		WithUser("1000:1000").WithEntrypoint("/bin/sh", "-c").WithImageConfig(&ImageConfig{WorkingDir: "/w", Cmd: []string{"x"}})
	type out struct {
		id  string
		err error
	}
	done := make(chan out, 1)
	go func() { id, err := c.Launch(sb); done <- out{id, err} }()
	m := f.next()
	f.result(m.id(), map[string]any{"id": "vm-1"})
	if o := <-done; o.err != nil {
		t.Fatal(o.err)
	}
	p := m.Params
	if p["privileged"] != true || p["launch_entrypoint"] != true {
		t.Fatal(p)
	}
	net := p["network"].(map[string]any)
	if net["block_private_ips"] != true || net["mtu"] != 1400.0 || net["hostname"] != "box" {
		t.Fatalf("network %v", net)
	}
	if _, has := net["intercept"]; has {
		t.Fatal("intercept only with forced interception or rules")
	}
	sec := net["secrets"].(map[string]any)
	if s := sec["API_KEY"].(map[string]any); s["value"] != "sk-real" || s["hosts"].([]any)[0] != "api.test" {
		t.Fatal(sec)
	}
	if s := sec["OTHER"].(map[string]any); s["placeholder"] != "PH_1" || len(s["hosts"].([]any)) != 0 {
		t.Fatal(sec)
	}
	if ah := net["add_hosts"].([]any)[0].(map[string]any); ah["host"] != "api.test" || ah["ip"] != "10.0.0.5" {
		t.Fatal(net)
	}
	vfs := p["vfs"].(map[string]any)
	mounts := vfs["mounts"].(map[string]any)
	if vfs["workspace"] != "/workspace" || mounts["/workspace/m"].(map[string]any)["type"] != "memory" ||
		mounts["/workspace/r"].(map[string]any)["readonly"] != true {
		t.Fatal(vfs)
	}
	ic := p["image_config"].(map[string]any)
	if ic["user"] != "1000:1000" || ic["working_dir"] != "/w" || ic["entrypoint"].([]any)[1] != "-c" {
		t.Fatal(ic)
	}
	env := p["env"].(map[string]any)
	if env["A"] != "1" || env["B"] != "2" {
		t.Fatal(env)
	}
}

func TestCreateNetworkVariants(t *testing.T) {
	c, f := newFake(t)
	p, _, _ := createWith(t, c, f, New("img").AllowPrivateIPs().Options())
	if n := p["network"].(map[string]any); n["block_private_ips"] != false || len(n["allowed_hosts"].([]any)) != 0 {
		t.Fatal(n)
	}
	p, _, _ = createWith(t, c, f, New("img").AllowPrivate("198.18.0.2", "10.1.0.0/16").Options())
	if n := p["network"].(map[string]any); n["block_private_ips"] != true || n["allow_private"].([]any)[1] != "10.1.0.0/16" {
		t.Fatal(n)
	}
	p, _, _ = createWith(t, c, f, New("img").WithNetworkInterception().Options())
	if n := p["network"].(map[string]any); n["intercept"] != true || n["block_private_ips"] != true {
		t.Fatal(n)
	}
	p, _, _ = createWith(t, c, f, New("img").WithNoNetwork().WithHostname("h").Options())
	if n := p["network"].(map[string]any); n["no_network"] != true || n["hostname"] != "h" || n["allowed_hosts"] != nil {
		t.Fatal(n)
	}
	p, _, _ = createWith(t, c, f, New("img").BlockPrivateIPs().UnsetBlockPrivateIPs().Options())
	if _, has := p["network"]; has {
		t.Fatal(p)
	}
}

func TestCreateValidationSendsNothing(t *testing.T) {
	c, f := newFake(t)
	cases := []struct {
		opts CreateOptions
		want error
	}{
		{CreateOptions{}, ErrImageRequired},
		{CreateOptions{Image: "i", NetworkMTU: -1}, ErrInvalidNetworkMTU},
		{New("i").WithNoNetwork().AllowHost("a").Options(), ErrNoNetworkConflict},
		{New("i").WithNoNetwork().AddSecret("K", "v").Options(), ErrNoNetworkConflict},
		{New("i").AddHost("bad host", "1.2.3.4").Options(), ErrInvalidAddHost},
		{New("i").AddHost("h", "not-an-ip").Options(), ErrInvalidAddHost},
		{New("i").WithCPUs(float64(runtime.NumCPU()) + 0.5).Options(), ErrInvalidCPUs},
		{New("i").WithCPUs(math.NaN()).Options(), ErrInvalidCPUs},
		{New("i").AllowPrivate("10.0.0.300").Options(), ErrInvalidAllowPrivate},
		{New("i").WithNoNetwork().AllowPrivate("10.0.0.1").Options(), ErrNoNetworkConflict},
		{New("i").WithNetworkInterception(&NetworkInterceptionConfig{Rules: []NetworkHookRule{{Action: "block", Hook: func(context.Context, NetworkHookRequest) (*NetworkHookResult, error) { return nil, nil }}}}).Options(), ErrInvalidNetworkHook},
		{New("i").WithVFSInterception(&VFSInterceptionConfig{Rules: []VFSHookRule{{Hook: func(context.Context, VFSHookEvent) error { return nil }}}}).Options(), ErrInvalidVFSHook},
		{New("i").WithVFSInterception(&VFSInterceptionConfig{Rules: []VFSHookRule{{Phase: "after", ActionHook: func(context.Context, VFSActionRequest) VFSHookAction { return "" }}}}).Options(), ErrInvalidVFSHook},
		{New("i").WithVFSInterception(&VFSInterceptionConfig{Rules: []VFSHookRule{{Action: "mutate_write"}}}).Options(), ErrInvalidVFSHook},
		{New("i").WithVFSInterception(&VFSInterceptionConfig{Rules: []VFSHookRule{{Phase: "after",
			Hook:          func(context.Context, VFSHookEvent) error { return nil },
			DangerousHook: func(context.Context, *Client, VFSHookEvent) error { return nil }}}}).Options(), ErrInvalidVFSHook},
	}
	for i, tc := range cases {
		if _, err := c.Create(tc.opts); !errors.Is(err, tc.want) {
			t.Errorf("case %d: want %v, got %v", i, tc.want, err)
		}
	}
	f.expectNone(50 * time.Millisecond)
}

func TestCreateErrorAndPortForwardFailureKeepsID(t *testing.T) {
	c, f := newFake(t)
	done := make(chan error, 1)
	go func() { _, err := c.Create(CreateOptions{Image: "nope"}); done <- err }()
	m := f.next()
	f.fail(m.id(), ErrCodeVMFailed, "failed to build rootfs: not found")
	var re *RPCError
	if err := <-done; !errors.As(err, &re) || c.VMID() != "" {
		t.Fatal(err)
	}
	type out struct {
		id  string
		err error
	}
	od := make(chan out, 1)
	go func() { id, err := c.Create(New("img").WithPortForward(18080, 80).Options()); od <- out{id, err} }()
	m = f.next()
	f.result(m.id(), map[string]any{"id": "vm-pf"})
	pf := f.next()
	if pf.Method != "port_forward" {
		t.Fatal(pf.raw)
	}
	f.fail(pf.id(), ErrCodeVMFailed, "address already in use")
	if o := <-od; o.id != "vm-pf" || o.err == nil || c.VMID() != "vm-pf" {
		t.Fatalf("%+v", o)
	}
}

func TestCreateAbandonedByContextStillAdoptsVM(t *testing.T) {
	c, f := newFake(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := c.CreateContext(ctx, CreateOptions{Image: "img"}); done <- err }()
	m := f.next()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	if cm := f.next(); cm.Method != "cancel" {
		t.Fatal(cm.raw)
	}
	f.result(m.id(), map[string]any{"id": "vm-late"})
	deadline := time.Now().Add(2 * time.Second)
	for c.VMID() != "vm-late" {
		if time.Now().After(deadline) {
			t.Fatal("late create result was not adopted: Close could not clean the VM up")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func hookRule(phase string, fn NetworkHookFunc) NetworkHookRule {
	return NetworkHookRule{Name: "cb", Phase: phase, Hosts: []string{"api.test"}, TimeoutMS: 200, Hook: fn}
}

// callHook plays the server's side of spec §4.1: one connection, one line each way.
func callHook(t *testing.T, sock string, req map[string]any) map[string]any {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial hook socket: %v", err)
	}
	defer conn.Close()
	b, _ := json.Marshal(req)
	conn.Write(append(b, '\n'))
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	if err != nil {
		t.Fatalf("read hook reply: %v", err)
	}
	var out map[string]any
	if err := json.Unmarshal(line, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestNetworkHookCallbackServer(t *testing.T) {
	c, f := newFake(t)
	var mu sync.Mutex
	var seen []NetworkHookRequest
	rules := []NetworkHookRule{
		{Name: "static", Action: "block", Hosts: []string{"evil.test"}},
		hookRule("before", func(ctx context.Context, r NetworkHookRequest) (*NetworkHookResult, error) {
			mu.Lock()
			seen = append(seen, r)
			mu.Unlock()
			h := map[string][]string{}
			for k, v := range r.RequestHeaders {
				h[k] = v
			}
			h["X-Hooked"] = []string{"1"}
			return &NetworkHookResult{Action: "mutate", Request: &NetworkHookRequestMutation{Headers: h, Query: map[string]string{}}}, nil
		}),
		hookRule("after", func(ctx context.Context, r NetworkHookRequest) (*NetworkHookResult, error) {
			return &NetworkHookResult{Response: &NetworkHookResponseMutation{SetBody: []byte("new"),
				BodyReplacements: []NetworkBodyTransform{{Find: "a", Replace: "b"}}}}, nil
		}),
		hookRule("", func(ctx context.Context, r NetworkHookRequest) (*NetworkHookResult, error) {
			return nil, errors.New("hook failed")
		}),
		hookRule("", func(ctx context.Context, r NetworkHookRequest) (*NetworkHookResult, error) {
			<-ctx.Done() // slower than its 200 ms deadline
			time.Sleep(time.Second)
			return &NetworkHookResult{Action: "block"}, nil
		}),
	}
	p, _, err := createWith(t, c, f, New("img").AllowHost("api.test").
		WithNetworkInterception(&NetworkInterceptionConfig{Rules: rules}).Options())
	if err != nil {
		t.Fatal(err)
	}
	n := p["network"].(map[string]any)
	ic := n["interception"].(map[string]any)
	sock, _ := ic["callback_socket"].(string)
	if n["intercept"] != true || !strings.HasSuffix(sock, "/hook.sock") || !strings.Contains(sock, "matchlock-network-hook-") {
		t.Fatalf("network %v", n)
	}
	wr := ic["rules"].([]any)
	if len(wr) != 5 || wr[0].(map[string]any)["action"] != "block" {
		t.Fatal(wr)
	}
	if _, has := wr[0].(map[string]any)["callback_id"]; has {
		t.Fatal("static rule must not carry a callback id")
	}
	for i := 1; i < 5; i++ {
		if got := wr[i].(map[string]any)["callback_id"]; got != fmt.Sprintf("network_hook_%d", i+1) {
			t.Fatalf("rule %d callback_id %v", i, got)
		}
	}

	out := callHook(t, sock, map[string]any{"callback_id": "network_hook_2", "phase": "before", "host": "api.test",
		"method": "GET", "path": "/v1", "query": map[string]string{"q": "1"}, "request_headers": map[string][]string{"Accept": {"*/*"}}})
	req := out["request"].(map[string]any)
	if out["action"] != "mutate" || req["headers"].(map[string]any)["X-Hooked"].([]any)[0] != "1" {
		t.Fatal(out)
	}
	if q, ok := req["query"].(map[string]any); !ok || len(q) != 0 {
		t.Fatalf("an empty query replacement must be sent as {}: %v", req)
	}
	mu.Lock()
	if len(seen) != 1 || seen[0].Query["q"] != "1" || seen[0].Method != "GET" || seen[0].Path != "/v1" {
		t.Fatalf("%+v", seen)
	}
	mu.Unlock()

	out = callHook(t, sock, map[string]any{"callback_id": "network_hook_3", "phase": "after", "status_code": 200})
	resp := out["response"].(map[string]any)
	if resp["set_body_base64"] != base64.StdEncoding.EncodeToString([]byte("new")) || resp["body_replacements"].([]any)[0].(map[string]any)["find"] != "a" {
		t.Fatal(out)
	}
	if out := callHook(t, sock, map[string]any{"callback_id": "network_hook_2", "phase": "after"}); out["error"] != "network hook phase mismatch" {
		t.Fatal(out)
	}
	if out := callHook(t, sock, map[string]any{"callback_id": "network_hook_9", "phase": "before"}); out["error"] != "network hook callback not found" {
		t.Fatal(out)
	}
	if out := callHook(t, sock, map[string]any{"callback_id": "network_hook_4", "phase": "before"}); out["error"] != "hook failed" {
		t.Fatal(out)
	}
	start := time.Now()
	if out := callHook(t, sock, map[string]any{"callback_id": "network_hook_5", "phase": "before"}); out["error"] != "context deadline exceeded" || out["action"] != nil {
		t.Fatalf("a hook past its deadline must fail open: %v", out)
	}
	if el := time.Since(start); el > 900*time.Millisecond {
		t.Fatalf("reply waited for the slow hook: %s", el)
	}

	done := make(chan error, 1)
	go func() { done <- c.Close(time.Second) }()
	m := f.next()
	f.result(m.id(), map[string]any{})
	<-done
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("hook socket left behind after Close: %v", err)
	}
}

func TestVFSHooksLocalSplit(t *testing.T) {
	c, f := newFake(t)
	events := make(chan VFSHookEvent, 10)
	danger := make(chan string, 10)
	cfg := &VFSInterceptionConfig{Rules: []VFSHookRule{
		{Name: "wire-block", Phase: "before", Ops: []VFSHookOp{VFSHookOpCreate}, Path: "/workspace/x", Action: "block"},
		{Name: "deny", Ops: []VFSHookOp{VFSHookOpWrite, VFSHookOpRead}, Path: "/workspace/secret*",
			ActionHook: func(ctx context.Context, r VFSActionRequest) VFSHookAction { return VFSHookActionBlock }},
		{Name: "rewrite", Phase: "before", Path: "/workspace/m.txt",
			MutateHook: func(ctx context.Context, r VFSMutateRequest) ([]byte, error) {
				return []byte(fmt.Sprintf("size=%d mode=%o", r.Size, r.Mode)), nil
			}},
		{Name: "audit", Phase: "after", Ops: []VFSHookOp{"WRITE"}, Path: "/workspace/*",
			Hook: func(ctx context.Context, e VFSHookEvent) error { events <- e; return nil }},
		{Name: "danger", Phase: "after", Ops: []VFSHookOp{VFSHookOpRemove},
			DangerousHook: func(ctx context.Context, cl *Client, e VFSHookEvent) error {
				r, err := cl.Exec(ctx, "echo from-hook")
				if err != nil {
					return err
				}
				danger <- r.Stdout
				return nil
			}},
	}}
	p, _, err := createWith(t, c, f, New("img").WithWorkspace("/workspace").MountMemory("/workspace").WithVFSInterception(cfg).Options())
	if err != nil {
		t.Fatal(err)
	}
	ic := p["vfs"].(map[string]any)["interception"].(map[string]any)
	rules := ic["rules"].([]any)
	if ic["emit_events"] != true || len(rules) != 1 || rules[0].(map[string]any)["name"] != "wire-block" {
		t.Fatalf("wire interception %v", ic)
	}

	if err := c.WriteFile(context.Background(), "/workspace/secret.txt", []byte("x")); !errors.Is(err, ErrVFSHookBlocked) {
		t.Fatal(err)
	}
	if _, err := c.ReadFile(context.Background(), "/workspace/secret.txt"); !errors.Is(err, ErrVFSHookBlocked) {
		t.Fatal(err)
	}
	f.expectNone(50 * time.Millisecond) // blocked before anything was sent

	done := make(chan error, 1)
	go func() { done <- c.WriteFileMode(context.Background(), "/workspace/m.txt", []byte("original"), 0o640) }()
	m := f.next()
	if got, _ := base64.StdEncoding.DecodeString(m.Params["content"].(string)); string(got) != "size=8 mode=640" {
		t.Fatalf("mutate hook not applied: %q", got)
	}
	f.result(m.id(), map[string]any{})
	<-done

	f.notify("event", map[string]any{"type": "file", "timestamp": 1, "file": map[string]any{"op": "write", "path": "/workspace/a", "size": 3, "mode": 420, "uid": 1, "gid": 2}})
	f.notify("event", map[string]any{"type": "file", "file": map[string]any{"op": "write", "path": "/elsewhere/a"}})
	select {
	case e := <-events:
		if e != (VFSHookEvent{Op: "write", Path: "/workspace/a", Size: 3, Mode: 420, UID: 1, GID: 2}) {
			t.Fatalf("%+v", e)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("after-hook did not run")
	}
	select {
	case e := <-events:
		t.Fatalf("filtered event reached the hook: %+v", e)
	case <-time.After(100 * time.Millisecond):
	}

	f.notify("event", map[string]any{"type": "file", "file": map[string]any{"op": "remove", "path": "/workspace/z"}})
	m = f.next() // the dangerous hook calls back into the client
	if m.Method != "exec" {
		t.Fatal(m.raw)
	}
	f.result(m.id(), map[string]any{"exit_code": 0, "stdout": b64("from-hook\n"), "stderr": "", "duration_ms": 0})
	select {
	case s := <-danger:
		if s != "from-hook\n" {
			t.Fatal(s)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("dangerous hook did not complete")
	}
}
