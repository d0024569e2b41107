package sdk

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"testing"
	"time"
)

// msg is one line the fake server received.
type msg struct {
	raw    map[string]any
	Method string
	ID     *uint64
	Params map[string]any
}

func (m msg) id() uint64 {
	if m.ID == nil {
		return 0
	}
	return *m.ID
}

// fake is the server end of a client's pipes; tests script its answers.
type fake struct {
	t        *testing.T
	toClient *io.PipeWriter
	fromCli  *io.PipeReader
	msgs     chan msg
}

func newFake(t *testing.T) (*Client, *fake) {
	t.Helper()
	cr, sw := io.Pipe()
	sr, cw := io.Pipe()
	c := newClient(cw, cr)
	f := &fake{t: t, toClient: sw, fromCli: sr, msgs: make(chan msg, 1024)}
	go func() {
		sc := bufio.NewScanner(sr)
		sc.Buffer(make([]byte, 1<<20), 64<<20)
		for sc.Scan() {
			var raw map[string]any
			if err := json.Unmarshal(sc.Bytes(), &raw); err != nil {
				t.Errorf("client sent a non-JSON line: %q", sc.Text())
				continue
			}
			var m struct {
				Method string         `json:"method"`
				ID     *uint64        `json:"id"`
				Params map[string]any `json:"params"`
			}
			_ = json.Unmarshal(sc.Bytes(), &m)
			f.msgs <- msg{raw: raw, Method: m.Method, ID: m.ID, Params: m.Params}
		}
		close(f.msgs)
	}()
	t.Cleanup(func() { _ = sw.Close(); _ = sr.Close() })
	return c, f
}

func (f *fake) next() msg {
	f.t.Helper()
	select {
	case m, ok := <-f.msgs:
		if !ok {
			f.t.Fatal("client closed its pipe")
		}
		return m
	case <-time.After(5 * time.Second):
		f.t.Fatal("timed out waiting for a message from the client")
	}
	return msg{}
}

// expectNone asserts the client sends nothing for d.
func (f *fake) expectNone(d time.Duration) {
	f.t.Helper()
	select {
	case m, ok := <-f.msgs:
		if ok {
			f.t.Fatalf("unexpected message %v", m.raw)
		}
	case <-time.After(d):
	}
}

func (f *fake) send(v any) {
	f.t.Helper()
	b, _ := json.Marshal(v)
	if _, err := f.toClient.Write(append(b, '\n')); err != nil {
		f.t.Fatalf("write to client: %v", err)
	}
}

func (f *fake) result(id uint64, result any) {
	f.send(map[string]any{"jsonrpc": "2.0", "id": id, "result": result})
}

func (f *fake) fail(id uint64, code int, message string) {
	f.send(map[string]any{"jsonrpc": "2.0", "id": id, "error": map[string]any{"code": code, "message": message}})
}

func (f *fake) notify(method string, params any) {
	f.send(map[string]any{"jsonrpc": "2.0", "method": method, "params": params})
}

// rawOut sends output the way our server does for an exec that asked for "raw": true:
// the exact header line, then the bytes as they are.
func (f *fake) rawOut(method string, id uint64, data string) {
	f.t.Helper()
	head := fmt.Sprintf(`{"jsonrpc":"2.0","method":"%s","params":{"id":%d,"bytes":%d}}`+"\n", method, id, len(data))
	if _, err := f.toClient.Write([]byte(head + data)); err != nil {
		f.t.Fatalf("write to client: %v", err)
	}
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// TestMain lets the test binary stand in for `matchlock rpc` (see process_test.go).
func TestMain(m *testing.M) {
	if os.Getenv("MATCHLOCK_FAKE_SERVER") != "" {
		os.Exit(fakeServerMain())
	}
	os.Exit(m.Run())
}
