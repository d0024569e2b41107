// port_forward: a web server in the VM, reached from the host through a forwarded port.
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"matchlock.dev/examples/internal/ex"
	"matchlock.dev/go/pkg/sdk"
)

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	ex.Must(err, "pick a port")
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func main() {
	ctx := context.Background()
	client := ex.Client()
	defer ex.Finish(client)
	_, err := client.Launch(sdk.New(ex.Image()))
	ex.Must(err, "launch")

	r, err := client.Exec(ctx, "mkdir -p /tmp/www && echo 'hello from the guest' > /tmp/www/index.html && "+
		"busybox httpd -p 127.0.0.1:8080 -h /tmp/www </dev/null >/dev/null 2>&1")
	ex.Must(err, "exec")
	ex.Check(r.ExitCode == 0, "busybox httpd started in the guest")

	local := freePort()
	bindings, err := client.PortForward(ctx, fmt.Sprintf("%d:8080", local))
	ex.Must(err, "port forward")
	ex.Check(len(bindings) == 1 && bindings[0].LocalPort == local && bindings[0].RemotePort == 8080, "forwarded %+v", bindings)

	var body []byte
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", local))
		if err != nil {
			continue // the guest's server may still be starting
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		break
	}
	ex.Check(string(body) == "hello from the guest\n", "127.0.0.1:%d reaches guest port 8080", local)
}
