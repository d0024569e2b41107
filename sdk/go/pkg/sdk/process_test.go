package sdk

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeServerMain is a tiny `matchlock rpc`: enough to test process handling.
func fakeServerMain() int {
	if len(os.Args) < 2 || os.Args[len(os.Args)-1] != "rpc" {
		if len(os.Args) >= 3 && os.Args[1] == "rm" {
			if log := os.Getenv("MATCHLOCK_FAKE_LOG"); log != "" {
				_ = os.WriteFile(log, []byte(strings.Join(os.Args[1:], " ")), 0o644)
			}
			return 0
		}
		fmt.Fprintln(os.Stderr, "fake: unexpected argv", os.Args)
		return 2
	}
	fmt.Fprintln(os.Stderr, "fake server: started")
	sc := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	mode := os.Getenv("MATCHLOCK_FAKE_SERVER")
	for sc.Scan() {
		var req struct {
			Method string          `json:"method"`
			ID     *uint64         `json:"id"`
			Params json.RawMessage `json:"params"`
		}
		if json.Unmarshal(sc.Bytes(), &req) != nil || req.ID == nil {
			continue
		}
		var result any = map[string]any{}
		switch req.Method {
		case "create":
			result = map[string]any{"id": "vm-fake0001"}
		case "exec":
			if mode == "die" {
				fmt.Fprintln(os.Stderr, "fake server: boom")
				return 3
			}
			result = map[string]any{"exit_code": 0, "stdout": b64("pong\n"), "stderr": "", "duration_ms": 1}
		case "close":
			if mode == "hang" {
				time.Sleep(time.Hour)
			}
		}
		b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": *req.ID, "result": result})
		out.Write(append(b, '\n'))
		out.Flush()
	}
	return 0
}

func fakeConfig(t *testing.T, mode string) Config {
	t.Helper()
	t.Setenv("MATCHLOCK_FAKE_SERVER", mode)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return Config{BinaryPath: exe}
}

func TestProcessLifecycle(t *testing.T) {
	cfg := fakeConfig(t, "ok")
	logPath := filepath.Join(t.TempDir(), "rm.log")
	t.Setenv("MATCHLOCK_FAKE_LOG", logPath)
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	id, err := c.Launch(New("img"))
	if err != nil || id != "vm-fake0001" || c.VMID() != id {
		t.Fatalf("launch: %q %v", id, err)
	}
	r, err := c.Exec(context.Background(), "ping")
	if err != nil || r.Stdout != "pong\n" {
		t.Fatalf("exec: %+v %v", r, err)
	}
	start := time.Now()
	if err := c.Close(0); err != nil {
		t.Fatalf("close: %v", err)
	}
	if time.Since(start) > 3*time.Second {
		t.Fatalf("close took %s", time.Since(start))
	}
	if err := c.Close(0); err != nil {
		t.Fatalf("second close must be a no-op: %v", err)
	}
	if _, err := c.Exec(context.Background(), "ping"); err == nil {
		t.Fatal("exec after close must fail")
	}
	if err := c.Remove(); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(logPath)
	if string(got) != "rm vm-fake0001" {
		t.Fatalf("remove ran %q", got)
	}
}

func TestServerDeathFailsPendingWithStderr(t *testing.T) {
	c, err := NewClient(fakeConfig(t, "die"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(0)
	_, err = c.Exec(context.Background(), "ping")
	if !errors.Is(err, ErrConnectionClose) || !strings.Contains(err.Error(), "closed unexpectedly") {
		t.Fatalf("want connection closed, got %v", err)
	}
}

func TestCloseKillsAServerThatDoesNotAnswer(t *testing.T) {
	c, err := NewClient(fakeConfig(t, "hang"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(context.Background(), "ping"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = c.Close(300 * time.Millisecond)
	if !errors.Is(err, ErrCloseTimeout) {
		t.Fatalf("want ErrCloseTimeout, got %v", err)
	}
	// close waits T+5s for the reply, then T for the exit, then kills.
	if el := time.Since(start); el > 8*time.Second {
		t.Fatalf("close took %s", el)
	}
}

func TestMissingBinary(t *testing.T) {
	_, err := NewClient(Config{BinaryPath: filepath.Join(t.TempDir(), "no-such-matchlock")})
	if !errors.Is(err, ErrStartProc) || !strings.Contains(err.Error(), "MATCHLOCK_BIN") {
		t.Fatalf("want a start error naming MATCHLOCK_BIN, got %v", err)
	}
	if _, err := NewClient(Config{}); !errors.Is(err, ErrBinaryPathRequired) {
		t.Fatalf("empty binary path: %v", err)
	}
}

func TestDefaultConfig(t *testing.T) {
	t.Setenv("MATCHLOCK_BIN", "/opt/ml")
	if got := DefaultConfig(); got.BinaryPath != "/opt/ml" || got.UseSudo {
		t.Fatalf("%+v", got)
	}
	t.Setenv("MATCHLOCK_BIN", "")
	if got := DefaultConfig(); got.BinaryPath != "matchlock" {
		t.Fatalf("%+v", got)
	}
}
