//go:build e2e

// E2E tests: the real `matchlock rpc` (MATCHLOCK_BIN) boots real VMs. Run them through
// tests/e2e/test_go_sdk.py, which gives them a private MATCHLOCK_HOME and checks that
// nothing is left behind afterwards.
package sdk_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"matchlock.dev/go/pkg/sdk"
)

func image() string {
	if img := os.Getenv("MATCHLOCK_E2E_IMAGE"); img != "" {
		return img
	}
	return "matchlock/busybox"
}

func launch(t *testing.T, sb *sdk.SandboxBuilder) *sdk.Client {
	t.Helper()
	if os.Getenv("MATCHLOCK_BIN") == "" || os.Getenv("MATCHLOCK_HOME") == "" {
		t.Fatal("MATCHLOCK_BIN and MATCHLOCK_HOME must be set (run via tests/e2e/test_go_sdk.py)")
	}
	c, err := sdk.NewClient(sdk.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Launch(sb); err != nil {
		c.Close(0)
		t.Fatalf("launch: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(0); err != nil {
			t.Errorf("close: %v", err)
		}
		if err := c.Remove(); err != nil {
			t.Errorf("remove: %v", err)
		}
	})
	return c
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestE2EExecModesFilesAndPorts(t *testing.T) {
	c := launch(t, sdk.New(image()).WithEnv("GREETING", "hi"))
	ctx := ctxT(t, 240*time.Second)
	if !strings.HasPrefix(c.VMID(), "vm-") {
		t.Fatalf("vm id %q", c.VMID())
	}

	t.Run("buffered", func(t *testing.T) {
		r, err := c.Exec(ctx, "echo $GREETING; echo err >&2; exit 3")
		if err != nil || r.ExitCode != 3 || r.Stdout != "hi\n" || r.Stderr != "err\n" {
			t.Fatalf("%+v %v", r, err)
		}
		r, err = c.ExecWithDir(ctx, "pwd", "/tmp")
		if err != nil || r.Stdout != "/tmp\n" {
			t.Fatalf("%+v %v", r, err)
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				r, err := c.Exec(ctx, fmt.Sprintf("echo n%d", i))
				if err == nil && r.Stdout != fmt.Sprintf("n%d\n", i) {
					err = fmt.Errorf("exec %d got %q", i, r.Stdout)
				}
				errs <- err
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("stream", func(t *testing.T) {
		var so, se bytes.Buffer
		r, err := c.ExecStream(ctx, "for i in 1 2 3; do echo line$i; done; echo e >&2; exit 4", &so, &se)
		if err != nil || r.ExitCode != 4 || so.String() != "line1\nline2\nline3\n" || se.String() != "e\n" {
			t.Fatalf("%+v %v %q %q", r, err, so.String(), se.String())
		}
	})

	t.Run("pipe", func(t *testing.T) {
		var so, se bytes.Buffer
		r, err := c.ExecPipe(ctx, "tr a-z A-Z; echo done >&2", strings.NewReader("piped text\n"), &so, &se)
		if err != nil || r.ExitCode != 0 || so.String() != "PIPED TEXT\n" || se.String() != "done\n" {
			t.Fatalf("%+v %v %q %q", r, err, so.String(), se.String())
		}
		// A larger stdin than one chunk, as user nobody.
		big := bytes.Repeat([]byte("0123456789abcdef"), 64*1024) // 1 MiB
		so.Reset()
		r, err = c.ExecPipeWithOptions(ctx, "id -u; wc -c", sdk.ExecPipeOptions{User: "65534", Stdin: bytes.NewReader(big), Stdout: &so})
		if err != nil || strings.Fields(so.String())[0] != "65534" || strings.Fields(so.String())[1] != "1048576" {
			t.Fatalf("%+v %v %q", r, err, so.String())
		}
	})

	t.Run("tty_with_resize", func(t *testing.T) {
		pr, pw := io.Pipe()
		resize := make(chan [2]uint16, 1)
		var out syncBuffer
		done := make(chan error, 1)
		go func() {
			r, err := c.ExecInteractive(ctx, "sh", &sdk.ExecInteractiveOptions{Rows: 30, Cols: 90, Stdin: pr, Stdout: &out, Resize: resize})
			if err == nil && r.ExitCode != 7 {
				err = fmt.Errorf("tty exit %d", r.ExitCode)
			}
			done <- err
		}()
		pw.Write([]byte("stty size; [ -t 0 ] && echo is-a-tty\n"))
		waitFor(t, &out, "30 90")
		waitFor(t, &out, "is-a-tty")
		resize <- [2]uint16{40, 100}
		// The resize travels separately from stdin, so the guest polls for it.
		pw.Write([]byte("i=0; while [ \"$(stty size)\" != \"40 100\" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; stty size; exit 7\n"))
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		pw.Close()
		if !strings.Contains(out.String(), "40 100") {
			t.Fatalf("resize not seen: %q", out.String())
		}
	})

	t.Run("cancel_kills_guest_process_group", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() {
			_, err := c.Exec(cctx, "sleep 300 & echo $! > /tmp/child; echo $$ > /tmp/parent; wait")
			done <- err
		}()
		deadline := time.Now().Add(30 * time.Second)
		for {
			r, err := c.Exec(ctx, "cat /tmp/child 2>/dev/null")
			if err == nil && strings.TrimSpace(r.Stdout) != "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the command never started")
			}
			time.Sleep(50 * time.Millisecond)
		}
		cancel()
		if err := <-done; err != context.Canceled {
			t.Fatalf("want context.Canceled, got %v", err)
		}
		// Positive control first: a live process answers kill -0.
		r, err := c.Exec(ctx, "sleep 30 & p=$!; kill -0 $p && echo alive; kill $p")
		if err != nil || r.Stdout != "alive\n" {
			t.Fatalf("control: %+v %v", r, err)
		}
		var last string
		for i := 0; i < 100; i++ {
			r, err = c.Exec(ctx, "for p in $(cat /tmp/child) $(cat /tmp/parent); do kill -0 $p 2>/dev/null && echo $p; done; true")
			if err != nil {
				t.Fatal(err)
			}
			if last = r.Stdout; last == "" {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("processes survived the cancel: %q", last)
	})

	t.Run("files_5mb_binary", func(t *testing.T) {
		data := make([]byte, 5*1024*1024)
		if _, err := rand.Read(data); err != nil {
			t.Fatal(err)
		}
		if err := c.WriteFileMode(ctx, "/tmp/blob.bin", data, 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := c.ReadFile(ctx, "/tmp/blob.bin")
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("round trip differs (len %d) %v", len(got), err)
		}
		r, err := c.Exec(ctx, "wc -c < /tmp/blob.bin; stat -c %a /tmp/blob.bin")
		if err != nil || strings.Fields(r.Stdout)[0] != "5242880" || strings.Fields(r.Stdout)[1] != "600" {
			t.Fatalf("%+v %v", r, err)
		}
		files, err := c.ListFiles(ctx, "/tmp")
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, f := range files {
			if f.Name == "blob.bin" && f.Size == 5242880 && f.Mode&0o777 == 0o600 && !f.IsDir {
				found = true
			}
		}
		if !found {
			t.Fatalf("blob.bin not listed: %+v", files)
		}
		var re *sdk.RPCError
		if _, err := c.ReadFile(ctx, "/tmp/no-such-file"); !asRPC(err, &re) || !re.IsFileError() {
			t.Fatalf("missing file: %v", err)
		}
	})

	t.Run("port_forward_concurrent", func(t *testing.T) {
		r, err := c.Exec(ctx, "mkdir -p /tmp/www && echo 'hello from the guest' > /tmp/www/index.html && busybox httpd -p 127.0.0.1:8080 -h /tmp/www </dev/null >/dev/null 2>&1")
		if err != nil || r.ExitCode != 0 {
			t.Fatalf("httpd: %+v %v", r, err)
		}
		b, err := c.PortForward(ctx, fmt.Sprintf("%d:8080", freePort(t)))
		if err != nil || len(b) != 1 || b[0].RemotePort != 8080 || b[0].Address != "127.0.0.1" {
			t.Fatalf("%+v %v", b, err)
		}
		url := fmt.Sprintf("http://127.0.0.1:%d/", b[0].LocalPort)
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := 0; i < 16; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- getBody(url, "hello from the guest\n")
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("log", func(t *testing.T) {
		if _, err := c.Log(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

func TestE2ESecretAndAllowList(t *testing.T) {
	c := launch(t, sdk.New(image()).AllowHost("api.test").AddSecret("API_KEY", "sk-real-value", "api.test"))
	ctx := ctxT(t, 120*time.Second)
	r, err := c.Exec(ctx, "echo $API_KEY")
	seen := strings.TrimSpace(r.Stdout)
	if err != nil || !strings.HasPrefix(seen, "SANDBOX_SECRET_") || strings.Contains(r.Stdout, "sk-real-value") {
		t.Fatalf("guest saw %q (%v)", seen, err)
	}
	r, err = c.Exec(ctx, "env | grep -c sk-real-value; true")
	if err != nil || strings.TrimSpace(r.Stdout) != "0" {
		t.Fatalf("secret value visible in the guest env: %+v %v", r, err)
	}

	u, err := c.AllowListAdd(ctx, "b.test, c.test", "b.test")
	if err != nil || strings.Join(u.Added, ",") != "b.test,c.test" || !contains(u.AllowedHosts, "api.test") || !contains(u.AllowedHosts, "c.test") {
		t.Fatalf("add: %+v %v", u, err)
	}
	u, err = c.AllowListAdd(ctx, "b.test")
	if err != nil || len(u.Added) != 0 {
		t.Fatalf("re-add: %+v %v", u, err)
	}
	u, err = c.AllowListDelete(ctx, "b.test")
	if err != nil || strings.Join(u.Removed, ",") != "b.test" || contains(u.AllowedHosts, "b.test") || !contains(u.AllowedHosts, "c.test") {
		t.Fatalf("delete: %+v %v", u, err)
	}
}

func TestE2EAllowListNeedsInterception(t *testing.T) {
	c := launch(t, sdk.New(image()))
	var re *sdk.RPCError
	if _, err := c.AllowListAdd(ctxT(t, 60*time.Second), "a.test"); !asRPC(err, &re) || !re.IsVMError() {
		t.Fatalf("want a VM error, got %v", err)
	}
}

func TestE2EBadInput(t *testing.T) {
	c, err := sdk.NewClient(sdk.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(0)
	var re *sdk.RPCError
	if _, err := c.Exec(ctxT(t, 30*time.Second), "true"); !asRPC(err, &re) || re.Message != "VM not created" {
		t.Fatalf("exec before create: %v", err)
	}
	if _, err := c.Create(sdk.CreateOptions{Image: "e2e/no-such-image:never"}); !asRPC(err, &re) {
		t.Fatalf("unknown image: %v", err)
	}
	if c.VMID() != "" {
		t.Fatalf("a failed create left vm id %q", c.VMID())
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitFor(t *testing.T, b *syncBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(b.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("never saw %q in %q", want, b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func asRPC(err error, target **sdk.RPCError) bool {
	e, ok := err.(*sdk.RPCError)
	if ok {
		*target = e
	}
	return ok
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*netTCPAddr).Port
}

func getBody(url, want string) error {
	var lastErr error
	for i := 0; i < 100; i++ { // the guest's server may still be starting
		resp, err := http.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if string(body) == want {
				return nil
			}
			return fmt.Errorf("got %q", body)
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	return lastErr
}
