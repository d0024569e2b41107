package sdk

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestExecWireShapeAndResult(t *testing.T) {
	c, f := newFake(t)
	type out struct {
		r   *ExecResult
		err error
	}
	done := make(chan out, 1)
	go func() {
		r, err := c.ExecWithDir(context.Background(), "echo hi", "/tmp")
		done <- out{r, err}
	}()
	m := f.next()
	if m.raw["jsonrpc"] != "2.0" || m.Method != "exec" || m.ID == nil || *m.ID != 1 {
		t.Fatalf("bad request %v", m.raw)
	}
	if m.Params["command"] != "echo hi" || m.Params["working_dir"] != "/tmp" {
		t.Fatalf("bad params %v", m.Params)
	}
	if _, ok := m.Params["user"]; ok {
		t.Fatal("exec must not send user")
	}
	f.result(m.id(), map[string]any{"exit_code": 3, "stdout": b64("hi\n"), "stderr": b64("\xff\x00err"), "duration_ms": 7})
	o := <-done
	if o.err != nil || o.r.ExitCode != 3 || o.r.Stdout != "hi\n" || o.r.Stderr != "\xff\x00err" || o.r.DurationMS != 7 {
		t.Fatalf("got %+v %v", o.r, o.err)
	}
}

func TestConcurrentRequestsMatchedByID(t *testing.T) {
	c, f := newFake(t)
	const n = 20
	var wg sync.WaitGroup
	results := make([]string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := c.Exec(context.Background(), strings.Repeat("x", i))
			if err != nil {
				t.Error(err)
				return
			}
			results[i] = r.Stdout
		}(i)
	}
	var got []msg
	for i := 0; i < n; i++ {
		got = append(got, f.next())
	}
	seen := map[uint64]bool{}
	for i := len(got) - 1; i >= 0; i-- { // answer in reverse order
		m := got[i]
		if seen[m.id()] {
			t.Fatalf("duplicate id %d", m.id())
		}
		seen[m.id()] = true
		f.result(m.id(), map[string]any{"exit_code": 0, "stdout": b64(m.Params["command"].(string)), "stderr": "", "duration_ms": 0})
	}
	wg.Wait()
	for i, s := range results {
		if s != strings.Repeat("x", i) {
			t.Fatalf("request %d got %q", i, s)
		}
	}
}

func TestExecStreamDeliversChunksInOrderBeforeResult(t *testing.T) {
	c, f := newFake(t)
	var so, se bytes.Buffer
	done := make(chan error, 1)
	go func() {
		r, err := c.ExecStream(context.Background(), "cmd", &so, &se)
		if err == nil && r.ExitCode != 5 {
			err = errors.New("bad exit")
		}
		done <- err
	}()
	m := f.next()
	if m.Method != "exec_stream" {
		t.Fatal(m.raw)
	}
	f.notify("exec_stream.stdout", map[string]any{"id": m.id(), "data": b64("a")})
	f.notify("exec_stream.stderr", map[string]any{"id": m.id(), "data": b64("E")})
	f.notify("exec_stream.stdout", map[string]any{"id": m.id() + 100, "data": b64("stray")})
	f.send("not json at all")
	f.send(map[string]any{"jsonrpc": "2.0", "id": 999, "result": map[string]any{}})
	f.notify("exec_stream.stdout", map[string]any{"id": m.id(), "data": b64("b")})
	f.result(m.id(), map[string]any{"exit_code": 5, "duration_ms": 1})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if so.String() != "ab" || se.String() != "E" {
		t.Fatalf("stdout %q stderr %q", so.String(), se.String())
	}
}

func TestExecStreamReadsRawPayloads(t *testing.T) {
	c, f := newFake(t)
	var so, se bytes.Buffer
	done := make(chan error, 1)
	go func() {
		_, err := c.ExecStream(context.Background(), "cmd", &so, &se)
		done <- err
	}()
	m := f.next()
	if m.Method != "exec_stream" || m.Params["raw"] != true {
		t.Fatalf("exec_stream must ask for raw output: %v", m.raw)
	}
	tricky := "x\n{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\x00\xff"
	f.rawOut("exec_stream.stdout", m.id(), tricky)
	f.notify("exec_stream.stderr", map[string]any{"id": m.id(), "data": b64("E")}) // base64 still read
	f.rawOut("exec_stream.stdout", m.id()+100, "stray\n")                          // no such request
	f.rawOut("exec_pipe.stdout", m.id(), "")                                       // empty payload
	f.rawOut("exec_stream.stderr", m.id(), "R")
	f.result(m.id(), map[string]any{"exit_code": 0, "duration_ms": 1})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if so.String() != tricky || se.String() != "ER" {
		t.Fatalf("stdout %q stderr %q", so.String(), se.String())
	}
}

func TestRawHeaderOnlyExactLayout(t *testing.T) {
	for _, line := range []string{
		`{"jsonrpc":"2.0","method":"exec_stream.stdout","params":{"id":1,"data":"eA=="}}` + "\n",
		`{"jsonrpc":"2.0","method":"exec_stream.stdout","params":{"id":1,"bytes":-1}}` + "\n",
		`{"jsonrpc":"2.0","method":"exec_stream.stdout","params":{"id":x,"bytes":1}}` + "\n",
		`{"jsonrpc":"2.0","method":"a\"b","params":{"id":1,"bytes":1}}` + "\n",
		`{"jsonrpc":"2.0","method":"exec_stream.stdout","params":{"id":1,"bytes":1}}`,
		`{"jsonrpc": "2.0","method":"exec_stream.stdout","params":{"id":1,"bytes":1}}` + "\n",
	} {
		if _, _, _, ok := rawHeader([]byte(line)); ok {
			t.Errorf("taken as a raw header: %q", line)
		}
	}
	m, id, n, ok := rawHeader([]byte(`{"jsonrpc":"2.0","method":"exec_tty.stdout","params":{"id":7,"bytes":42}}` + "\n"))
	if !ok || m != "exec_tty.stdout" || id != 7 || n != 42 {
		t.Fatalf("header not parsed: %v %v %v %v", m, id, n, ok)
	}
}

func TestExecPipeWaitsForReadyAndSendsNotifications(t *testing.T) {
	c, f := newFake(t)
	var so, se bytes.Buffer
	done := make(chan error, 1)
	go func() {
		r, err := c.ExecPipeWithOptions(context.Background(), "cat", ExecPipeOptions{
			User: "65534", WorkingDir: "/w", Stdin: strings.NewReader("hello"), Stdout: &so, Stderr: &se,
		})
		if err == nil && r.ExitCode != 0 {
			err = errors.New("exit")
		}
		done <- err
	}()
	m := f.next()
	if m.Method != "exec_pipe" || m.Params["user"] != "65534" || m.Params["working_dir"] != "/w" {
		t.Fatal(m.raw)
	}
	f.expectNone(100 * time.Millisecond) // no input before ready
	f.notify("exec_pipe.ready", map[string]any{"id": m.id()})
	in := f.next()
	if in.Method != "exec_pipe.stdin" || in.ID != nil || in.Params["data"] != b64("hello") || uint64(in.Params["id"].(float64)) != m.id() {
		t.Fatalf("stdin chunk %v", in.raw)
	}
	if _, has := in.raw["id"]; has {
		t.Fatal("stdin must be a true notification (no top-level id)")
	}
	eof := f.next()
	if eof.Method != "exec_pipe.stdin_eof" || eof.ID != nil || uint64(eof.Params["id"].(float64)) != m.id() {
		t.Fatalf("eof %v", eof.raw)
	}
	f.notify("exec_pipe.stdout", map[string]any{"id": m.id(), "data": b64("hello")})
	f.notify("exec_pipe.stderr", map[string]any{"id": m.id(), "data": b64("warn")})
	f.result(m.id(), map[string]any{"exit_code": 0, "duration_ms": 2})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if so.String() != "hello" || se.String() != "warn" {
		t.Fatalf("%q %q", so.String(), se.String())
	}
}

func TestExecPipeWithoutStdinSendsEOFAfterReady(t *testing.T) {
	c, f := newFake(t)
	done := make(chan error, 1)
	go func() {
		_, err := c.ExecPipe(context.Background(), "true", nil, nil, nil)
		done <- err
	}()
	m := f.next()
	f.notify("exec_pipe.ready", map[string]any{"id": m.id()})
	if eof := f.next(); eof.Method != "exec_pipe.stdin_eof" {
		t.Fatal(eof.raw)
	}
	f.result(m.id(), map[string]any{"exit_code": 0, "duration_ms": 0})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestExecInteractiveDefaultsAndResize(t *testing.T) {
	c, f := newFake(t)
	resize := make(chan [2]uint16, 1)
	pr, pw := io.Pipe()
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() {
		_, err := c.ExecInteractive(context.Background(), "sh", &ExecInteractiveOptions{Stdin: pr, Stdout: &out, Resize: resize})
		done <- err
	}()
	m := f.next()
	if m.Method != "exec_tty" || m.Params["rows"] != 24.0 || m.Params["cols"] != 80.0 {
		t.Fatal(m.raw)
	}
	f.notify("exec_tty.ready", map[string]any{"id": m.id()})
	resize <- [2]uint16{40, 120}
	rz := f.next()
	if rz.Method != "exec_tty.resize" || rz.ID != nil || rz.Params["rows"] != 40.0 || rz.Params["cols"] != 120.0 {
		t.Fatal(rz.raw)
	}
	_, _ = pw.Write([]byte("ls\r"))
	if in := f.next(); in.Method != "exec_tty.stdin" || in.Params["data"] != b64("ls\r") {
		t.Fatal(in.raw)
	}
	f.notify("exec_tty.stdout", map[string]any{"id": m.id(), "data": b64("a b\r\n")})
	f.result(m.id(), map[string]any{"exit_code": 0, "duration_ms": 9})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	pw.Close()
	if out.String() != "a b\r\n" {
		t.Fatalf("%q", out.String())
	}
}

func TestContextCancelSendsCancelAndIgnoresLateReply(t *testing.T) {
	c, f := newFake(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, "sleep 100")
		done <- err
	}()
	m := f.next()
	cancel()
	cm := f.next()
	if cm.Method != "cancel" || cm.ID == nil || uint64(cm.Params["id"].(float64)) != m.id() || *cm.ID == m.id() {
		t.Fatalf("cancel %v", cm.raw)
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("want context.Canceled, got %v", err)
	}
	f.fail(m.id(), ErrCodeCancelled, "context canceled") // late: dropped
	f.result(cm.id(), map[string]any{"cancelled": true})
	// The client still works afterwards.
	go func() {
		_, err := c.Exec(context.Background(), "true")
		done <- err
	}()
	m2 := f.next()
	f.result(m2.id(), map[string]any{"exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 0})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestDeadlineAndAlreadyCancelled(t *testing.T) {
	c, f := newFake(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Exec(ctx, "x"); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	f.expectNone(50 * time.Millisecond) // nothing sent for a dead context
	ctx2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if _, err := c.ReadFile(ctx2, "/x"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatal(err)
	}
	if m := f.next(); m.Method != "read_file" {
		t.Fatal(m.raw)
	}
	if m := f.next(); m.Method != "cancel" {
		t.Fatal(m.raw)
	}
}

func TestRPCErrorsAndEOF(t *testing.T) {
	c, f := newFake(t)
	done := make(chan error, 2)
	go func() { _, err := c.Exec(context.Background(), "a"); done <- err }()
	m := f.next()
	f.fail(m.id(), ErrCodeVMFailed, "VM not created")
	err := <-done
	var re *RPCError
	if !errors.As(err, &re) || re.Code != -32000 || !re.IsVMError() || re.IsExecError() || re.IsFileError() {
		t.Fatalf("%v", err)
	}
	if err.Error() != "matchlock RPC error [-32000]: VM not created" {
		t.Fatalf("%q", err.Error())
	}
	go func() { _, err := c.Exec(context.Background(), "b"); done <- err }()
	f.next()
	f.toClient.Close() // server went away with a request in flight
	if err := <-done; !errors.Is(err, ErrConnectionClose) {
		t.Fatalf("want ErrConnectionClose, got %v", err)
	}
	if _, err := c.Exec(context.Background(), "c"); !errors.Is(err, ErrConnectionClose) {
		t.Fatalf("after EOF: %v", err)
	}
}

func TestFilesRoundTrip(t *testing.T) {
	c, f := newFake(t)
	payload := []byte{0, 1, 2, 0xff, '\n'}
	done := make(chan error, 1)
	go func() { done <- c.WriteFileMode(context.Background(), "/tmp/b", payload, 0o600) }()
	m := f.next()
	if m.Method != "write_file" || m.Params["path"] != "/tmp/b" || m.Params["mode"] != 384.0 || m.Params["content"] != "AAEC/wo=" {
		t.Fatal(m.raw)
	}
	f.result(m.id(), map[string]any{})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	go func() { done <- c.WriteFile(context.Background(), "/tmp/c", nil) }()
	if m := f.next(); m.Params["mode"] != 420.0 || m.Params["content"] != "" {
		t.Fatal(m.raw)
	} else {
		f.result(m.id(), map[string]any{})
	}
	<-done

	rd := make(chan []byte, 1)
	go func() { b, _ := c.ReadFile(context.Background(), "/tmp/b"); rd <- b }()
	m = f.next()
	f.result(m.id(), map[string]any{"content": "AAEC/wo="})
	if got := <-rd; !bytes.Equal(got, payload) {
		t.Fatalf("%v", got)
	}

	ls := make(chan []FileInfo, 1)
	go func() { l, _ := c.ListFiles(context.Background(), "/empty"); ls <- l }()
	m = f.next()
	f.result(m.id(), map[string]any{"files": nil})
	if got := <-ls; got == nil || len(got) != 0 {
		t.Fatalf("empty dir must be an empty slice, got %#v", got)
	}
	go func() { l, _ := c.ListFiles(context.Background(), "/d"); ls <- l }()
	m = f.next()
	f.result(m.id(), map[string]any{"files": []any{map[string]any{"name": "a", "size": 5, "mode": 2147484141, "is_dir": true, "mod_time": "0001-01-01T00:00:00Z"}}})
	if got := <-ls; len(got) != 1 || got[0] != (FileInfo{Name: "a", Size: 5, Mode: 2147484141, IsDir: true}) {
		t.Fatalf("%+v", got)
	}
}

func TestAllowListNormalizesHosts(t *testing.T) {
	c, f := newFake(t)
	if _, err := c.AllowListAdd(context.Background(), " , "); !errors.Is(err, ErrAllowListHosts) {
		t.Fatal(err)
	}
	type out struct {
		u   *AllowListUpdate
		err error
	}
	done := make(chan out, 1)
	go func() {
		u, err := c.AllowListAdd(context.Background(), "a.test, b.test", "a.test", " c.test ")
		done <- out{u, err}
	}()
	m := f.next()
	hosts := m.Params["hosts"].([]any)
	if m.Method != "allow_list_add" || len(hosts) != 3 || hosts[0] != "a.test" || hosts[1] != "b.test" || hosts[2] != "c.test" {
		t.Fatal(m.raw)
	}
	f.result(m.id(), map[string]any{"added": []string{"b.test"}, "allowed_hosts": []string{"a.test", "b.test"}, "allow_all": false})
	o := <-done
	if o.err != nil || len(o.u.Added) != 1 || len(o.u.AllowedHosts) != 2 || o.u.Removed != nil {
		t.Fatalf("%+v %v", o.u, o.err)
	}
	go func() {
		u, err := c.AllowListDelete(context.Background(), "b.test")
		done <- out{u, err}
	}()
	m = f.next()
	f.result(m.id(), map[string]any{"removed": []string{"b.test"}, "allowed_hosts": nil})
	o = <-done
	if o.err != nil || o.u.Removed[0] != "b.test" || o.u.AllowedHosts == nil || len(o.u.AllowedHosts) != 0 {
		t.Fatalf("%+v %v", o.u, o.err)
	}
}

func TestPortForwardParsingAndValidation(t *testing.T) {
	c, f := newFake(t)
	if _, err := c.PortForward(context.Background(), "abc"); !errors.Is(err, ErrParsePortForwards) {
		t.Fatal(err)
	}
	if _, err := c.PortForward(context.Background(), "70000:80"); !errors.Is(err, ErrParsePortForwards) {
		t.Fatal(err)
	}
	type out struct {
		b   []PortForwardBinding
		err error
	}
	done := make(chan out, 1)
	go func() {
		b, err := c.PortForwardWithAddresses(context.Background(), []string{"0.0.0.0"}, "18080:8080", "9090")
		done <- out{b, err}
	}()
	m := f.next()
	fw := m.Params["forwards"].([]any)
	if m.Method != "port_forward" || len(fw) != 2 || m.Params["addresses"].([]any)[0] != "0.0.0.0" {
		t.Fatal(m.raw)
	}
	if f0 := fw[1].(map[string]any); f0["local_port"] != 9090.0 || f0["remote_port"] != 9090.0 {
		t.Fatal(fw)
	}
	f.result(m.id(), map[string]any{"bindings": []any{map[string]any{"address": "0.0.0.0", "local_port": 18080, "remote_port": 8080}}})
	if o := <-done; o.err != nil || o.b[0].LocalPort != 18080 {
		t.Fatal(o)
	}
	go func() { b, err := c.PortForward(context.Background(), "1:2"); done <- out{b, err} }()
	m = f.next()
	if m.Params["addresses"].([]any)[0] != "127.0.0.1" {
		t.Fatal(m.raw)
	}
	f.result(m.id(), map[string]any{"bindings": []any{map[string]any{"address": "", "local_port": 0, "remote_port": 2}}})
	if o := <-done; !errors.Is(o.err, ErrParsePortBindings) {
		t.Fatalf("invalid binding accepted: %v", o)
	}
}

func TestLogAndLogStream(t *testing.T) {
	c, f := newFake(t)
	done := make(chan string, 1)
	go func() { s, _ := c.Log(context.Background()); done <- s }()
	m := f.next()
	if m.Method != "log" {
		t.Fatal(m.raw)
	}
	if _, has := m.raw["params"]; has {
		t.Fatal("log sends no params")
	}
	f.result(m.id(), map[string]any{"content": b64("boot\n")})
	if s := <-done; s != "boot\n" {
		t.Fatal(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var buf bytes.Buffer
	errc := make(chan error, 1)
	go func() { errc <- c.LogStream(ctx, &buf) }()
	m = f.next()
	f.notify("log_stream.data", map[string]any{"id": m.id(), "data": b64("line1\n")})
	f.notify("log_stream.data", map[string]any{"id": m.id(), "data": b64("line2\n")})
	// Chunks are handed over before anything later on the wire, so a reply to an
	// unrelated request proves they were written.
	go func() { s, _ := c.Log(context.Background()); done <- s }()
	m2 := f.next()
	f.result(m2.id(), map[string]any{"content": ""})
	<-done
	cancel()
	if cm := f.next(); cm.Method != "cancel" {
		t.Fatal(cm.raw)
	}
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	if buf.String() != "line1\nline2\n" {
		t.Fatalf("%q", buf.String())
	}
}

func TestCloseSendsCloseThenEOF(t *testing.T) {
	c, f := newFake(t)
	done := make(chan error, 1)
	go func() { done <- c.Close(3 * time.Second) }()
	m := f.next()
	if m.Method != "close" || m.Params["timeout_seconds"] != 3.0 {
		t.Fatal(m.raw)
	}
	f.result(m.id(), map[string]any{})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	select {
	case _, ok := <-f.msgs:
		if ok {
			t.Fatal("nothing may follow close")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("client did not close its end after close")
	}
}
