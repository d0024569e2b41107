// secrets: the guest only ever sees a placeholder; the host swaps in the real value
// on requests to the secret's host (EXAMPLE_API_URL: an upstream to try it against).
package main

import (
	"context"
	"net/url"
	"os"
	"strings"

	"matchlock.dev/examples/internal/ex"
	"matchlock.dev/go/pkg/sdk"
)

func main() {
	ctx := context.Background()
	real := os.Getenv("EXAMPLE_API_KEY")
	if real == "" {
		real = "sk-example-real-value"
	}
	apiURL := os.Getenv("EXAMPLE_API_URL")
	host := "api.example.test"
	if u, err := url.Parse(apiURL); err == nil && u.Hostname() != "" {
		host = u.Hostname()
	}
	sb := sdk.New(ex.Image()).AllowHost(host).AddSecret("API_KEY", real, host)
	if ip := os.Getenv("EXAMPLE_API_IP"); ip != "" {
		sb = sb.AddHost(host, ip)
	}

	client := ex.Client()
	defer ex.Finish(client)
	_, err := client.Launch(sb)
	ex.Must(err, "launch")

	r, err := client.Exec(ctx, "echo $API_KEY")
	ex.Must(err, "exec")
	seen := strings.TrimSpace(r.Stdout)
	ex.Check(strings.HasPrefix(seen, "SANDBOX_SECRET_") && !strings.Contains(seen, real), "the guest sees a placeholder, not the value")

	if apiURL != "" {
		r, err = client.Exec(ctx, `curl -sS -H "Authorization: Bearer $API_KEY" `+apiURL)
		ex.Must(err, "exec")
		ex.Check(r.ExitCode == 0, "request to %s went through", host)
		os.Stdout.WriteString(r.Stdout)
	}
}
