//go:build e2e

package sdk_test

import (
	"context"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"matchlock.dev/go/pkg/sdk"
)

// TestHooksE2ENetworkCallbacks needs network interception rules in `matchlock rpc` and
// an upstream: tests/e2e/test_go_sdk.py::test_go_network_hooks provides both (api.test
// at MATCHLOCK_E2E_API_IP) and checks what the upstream really received. A callback
// adds a header (/mutate); a callback slower than its deadline blocks (/slow).
func TestHooksE2ENetworkCallbacks(t *testing.T) {
	ip := os.Getenv("MATCHLOCK_E2E_API_IP")
	if ip == "" {
		t.Fatal("MATCHLOCK_E2E_API_IP is not set (run via tests/e2e/test_go_sdk.py)")
	}
	var mutated, slow atomic.Int32
	rules := []sdk.NetworkHookRule{
		{Name: "tag", Phase: sdk.NetworkHookPhaseBefore, Hosts: []string{"api.test"}, Path: "/mutate*", TimeoutMS: 5000,
			Hook: func(ctx context.Context, req sdk.NetworkHookRequest) (*sdk.NetworkHookResult, error) {
				mutated.Add(1)
				headers := map[string][]string{}
				for k, v := range req.RequestHeaders {
					headers[k] = v
				}
				headers["X-Go-Hook"] = []string{req.Method + " " + req.Path}
				return &sdk.NetworkHookResult{Action: sdk.NetworkHookActionMutate,
					Request: &sdk.NetworkHookRequestMutation{Headers: headers}}, nil
			}},
		{Name: "slow", Phase: sdk.NetworkHookPhaseBefore, Hosts: []string{"api.test"}, Path: "/slow*", TimeoutMS: 300,
			Hook: func(ctx context.Context, req sdk.NetworkHookRequest) (*sdk.NetworkHookResult, error) {
				slow.Add(1)
				time.Sleep(3 * time.Second)
				return nil, nil
			}},
	}
	c := launch(t, sdk.New(image()).AllowHost("api.test").AddHost("api.test", ip).AllowPrivate(ip).
		WithNetworkInterception(&sdk.NetworkInterceptionConfig{Rules: rules}))
	ctx := ctxT(t, 120*time.Second)
	curl := func(path string) string {
		r, err := c.Exec(ctx, "curl -s -o /dev/null -w '%{http_code}' --max-time 30 https://api.test"+path)
		if err != nil {
			t.Fatal(err)
		}
		return r.Stdout
	}
	if got := curl("/mutate"); got != "200" {
		t.Fatalf("the mutated request did not go through: %q", got)
	}
	start := time.Now()
	if got := curl("/slow"); got == "200" {
		t.Fatalf("a callback past its deadline must block the request, got %q", got)
	}
	if el := time.Since(start); el > 2900*time.Millisecond {
		t.Fatalf("the blocked request waited for the slow callback: %s", el)
	}
	if mutated.Load() < 1 || slow.Load() < 1 {
		t.Fatalf("callbacks ran: mutate %d, slow %d", mutated.Load(), slow.Load())
	}
	if !strings.HasPrefix(c.VMID(), "vm-") {
		t.Fatal(c.VMID())
	}
}
