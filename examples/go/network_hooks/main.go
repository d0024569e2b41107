// network_hooks: static rules and a Go callback that rewrite HTTP traffic on the host.
// The callback runs in this process: the SDK hosts a Unix socket the server calls.
//
// EXAMPLE_API_URL names an upstream (e.g. a local HTTPS test server), EXAMPLE_API_IP
// the address its host resolves to inside the VM.
package main

import (
	"context"
	"os"
	"strings"
	"time"

	"matchlock.dev/examples/internal/ex"
	"matchlock.dev/go/pkg/sdk"
)

func main() {
	ctx := context.Background()
	apiURL := os.Getenv("EXAMPLE_API_URL")
	if apiURL == "" {
		apiURL = "https://api.example.test/headers"
	}
	host := strings.SplitN(strings.SplitN(apiURL, "://", 2)[1], "/", 2)[0]

	rules := []sdk.NetworkHookRule{
		// Static: no callback, applied by the server.
		{Name: "block-admin", Phase: sdk.NetworkHookPhaseBefore, Hosts: []string{host}, Path: "/admin*", Action: sdk.NetworkHookActionBlock},
		// Callback: add a header to every request to the API.
		{Name: "tag-requests", Phase: sdk.NetworkHookPhaseBefore, Hosts: []string{host}, TimeoutMS: 2000,
			Hook: func(ctx context.Context, req sdk.NetworkHookRequest) (*sdk.NetworkHookResult, error) {
				headers := map[string][]string{}
				for k, v := range req.RequestHeaders {
					headers[k] = v
				}
				headers["X-Matchlock-Hook"] = []string{"go"}
				return &sdk.NetworkHookResult{Action: sdk.NetworkHookActionMutate,
					Request: &sdk.NetworkHookRequestMutation{Headers: headers}}, nil
			}},
		// A callback slower than its deadline is ignored: traffic proceeds unchanged.
		{Name: "too-slow", Phase: sdk.NetworkHookPhaseAfter, Hosts: []string{host}, TimeoutMS: 100,
			Hook: func(ctx context.Context, req sdk.NetworkHookRequest) (*sdk.NetworkHookResult, error) {
				select {
				case <-ctx.Done():
				case <-time.After(5 * time.Second):
				}
				return &sdk.NetworkHookResult{Action: sdk.NetworkHookActionBlock}, nil
			}},
	}
	sb := sdk.New(ex.Image()).AllowHost(host).WithNetworkInterception(&sdk.NetworkInterceptionConfig{Rules: rules})
	if ip := os.Getenv("EXAMPLE_API_IP"); ip != "" {
		sb = sb.AddHost(host, ip)
	}

	client := ex.Client()
	defer ex.Finish(client)
	_, err := client.Launch(sb)
	ex.Must(err, "launch")

	r, err := client.Exec(ctx, "curl -sS "+apiURL)
	ex.Must(err, "exec")
	ex.Check(r.ExitCode == 0 && strings.Contains(r.Stdout, "X-Matchlock-Hook"), "the upstream saw the hook's header")
}
