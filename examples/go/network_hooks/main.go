// network_hooks: static rules and a Go callback that decide per request, on the host.
// The callback runs in this process: the SDK hosts a Unix socket the server calls. A
// callback that errors or misses its deadline blocks the request (matchlock fails closed).
//
// EXAMPLE_API_URL names an upstream (e.g. a local HTTPS test server, ending in "/"),
// EXAMPLE_API_IP the address its host resolves to inside the VM.
package main

import (
	"context"
	"os"
	"strings"
	"sync"

	"matchlock.dev/examples/internal/ex"
	"matchlock.dev/go/pkg/sdk"
)

func main() {
	ctx := context.Background()
	apiURL := os.Getenv("EXAMPLE_API_URL")
	host := "api.example.test"
	if apiURL != "" {
		host = strings.SplitN(strings.SplitN(apiURL, "://", 2)[1], "/", 2)[0]
	}

	var mu sync.Mutex
	var seen []string
	rules := []sdk.NetworkHookRule{
		// Static: no callback, applied by the server.
		{Name: "no-uploads", Phase: sdk.NetworkHookPhaseBefore, Methods: []string{"PUT"}, Action: sdk.NetworkHookActionBlock},
		// Callback: block /admin, tag everything else with a header.
		{Name: "decide", Phase: sdk.NetworkHookPhaseBefore, Hosts: []string{host}, TimeoutMS: 2000,
			Hook: func(ctx context.Context, req sdk.NetworkHookRequest) (*sdk.NetworkHookResult, error) {
				mu.Lock()
				seen = append(seen, req.Method+" "+req.Host+req.Path)
				mu.Unlock()
				if strings.HasPrefix(req.Path, "/admin") {
					return &sdk.NetworkHookResult{Action: sdk.NetworkHookActionBlock}, nil
				}
				headers := map[string][]string{}
				for k, v := range req.RequestHeaders {
					headers[k] = v
				}
				headers["X-Agent"] = []string{"matchlock-go-example"}
				return &sdk.NetworkHookResult{Action: sdk.NetworkHookActionMutate,
					Request: &sdk.NetworkHookRequestMutation{Headers: headers}}, nil
			}},
	}
	sb := sdk.New(ex.Image()).AllowHost(host).WithNetworkInterception(&sdk.NetworkInterceptionConfig{Rules: rules})
	if ip := os.Getenv("EXAMPLE_API_IP"); ip != "" {
		sb = sb.AddHost(host, ip).AllowPrivate(ip) // a local test server: that one address
	}

	client := ex.Client()
	defer ex.Finish(client)
	_, err := client.Launch(sb)
	ex.Must(err, "launch")
	if apiURL == "" {
		ex.Check(true, "EXAMPLE_API_URL not set: rules installed, no request made")
		return
	}

	ok, err := client.Exec(ctx, "curl -sS -o /dev/null -w '%{http_code}' "+apiURL)
	ex.Must(err, "exec")
	ex.Check(ok.Stdout == "200", "an allowed request passes, with X-Agent added (got %q)", ok.Stdout)
	blocked, err := client.Exec(ctx, "curl -sS -o /dev/null -w '%{http_code}' "+apiURL+"admin")
	ex.Must(err, "exec")
	ex.Check(blocked.Stdout != "200", "the callback blocked /admin (got %q)", blocked.Stdout)
	mu.Lock()
	defer mu.Unlock()
	ex.Check(len(seen) >= 2, "the callback saw: %v", seen)
}
