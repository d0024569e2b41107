// Package sdk is a Go client for Matchlock sandboxes. It starts `matchlock rpc` as a
// child process and speaks newline-delimited JSON-RPC 2.0 over its stdin/stdout.
//
//	client, err := sdk.NewClient(sdk.DefaultConfig())
//	if err != nil {
//	    log.Fatal(err)
//	}
//	defer client.Close(0)
//
//	sandbox := sdk.New("alpine:latest").
//	    AllowHost("api.openai.com").
//	    AddSecret("API_KEY", os.Getenv("API_KEY"), "api.openai.com")
//	vmID, err := client.Launch(sandbox)
//	result, err := client.Exec(ctx, "echo hello")
//	fmt.Println(result.Stdout)
//
// All Client methods are safe for concurrent use; requests run concurrently on the
// server and are matched to their responses by id.
package sdk

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Config says which matchlock to start.
type Config struct {
	// BinaryPath is the matchlock executable (a name is looked up in PATH).
	BinaryPath string
	// UseSudo runs `sudo <BinaryPath> rpc`.
	UseSudo bool
}

// DefaultConfig uses $MATCHLOCK_BIN, else "matchlock" from PATH.
func DefaultConfig() Config {
	path := os.Getenv("MATCHLOCK_BIN")
	if path == "" {
		path = "matchlock"
	}
	return Config{BinaryPath: path}
}

// Client is one `matchlock rpc` session: at most one current VM.
type Client struct {
	binaryPath string
	cmd        *exec.Cmd
	w          io.WriteCloser
	rfile      io.Closer
	exited     chan struct{} // closed when the child has been reaped
	waitErr    error
	stderr     *tailBuffer

	requestID atomic.Uint64

	stateMu sync.Mutex
	vmID    string
	closed  bool

	writeMu     sync.Mutex
	inputClosed bool

	pendingMu  sync.Mutex
	pending    map[uint64]*pendingRequest
	readerErr  error
	readerDone chan struct{}

	vfsHookMu      sync.RWMutex
	vfsHooks       []compiledVFSHook
	vfsMutateHooks []compiledVFSMutateHook
	vfsActionHooks []compiledVFSActionHook
	vfsHookActive  atomic.Bool

	networkHookMu       sync.Mutex
	networkHookListener net.Listener
	networkHookTempDir  string
	networkHookWG       *sync.WaitGroup
}

// NewClient starts `matchlock rpc` and returns a client for it.
func NewClient(cfg Config) (*Client, error) {
	bin := strings.TrimSpace(cfg.BinaryPath)
	if bin == "" {
		return nil, ErrBinaryPathRequired
	}
	args := []string{bin, "rpc"}
	if cfg.UseSudo {
		args = append([]string{"sudo"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	// The pipes are our own *os.File pairs, so cmd.Wait neither closes our ends nor
	// waits for grandchildren that may inherit the server's stdio.
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, wrapErr(ErrStdinPipe, err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		closeAll(inR, inW)
		return nil, wrapErr(ErrStdoutPipe, err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		closeAll(inR, inW, outR, outW)
		return nil, wrapErr(ErrStderrPipe, err)
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	if !cfg.UseSudo {
		// Own session: a Ctrl-C meant for the caller must not kill the server before
		// Close has closed the VM. Not under sudo, whose credentials tie to the tty.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	if err := cmd.Start(); err != nil {
		closeAll(inR, inW, outR, outW, errR, errW)
		return nil, fmt.Errorf("%w %q: %w (set MATCHLOCK_BIN or Config.BinaryPath)", ErrStartProc, bin, err)
	}
	closeAll(inR, outW, errW)
	c := newClient(inW, outR)
	c.binaryPath = bin
	c.cmd = cmd
	c.rfile = outR
	c.stderr = &tailBuffer{max: 4096}
	go func() { _, _ = io.Copy(c.stderr, errR); errR.Close() }()
	go func() {
		c.waitErr = cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// newClient wires a client to an already running server's pipes.
func newClient(w io.WriteCloser, r io.Reader) *Client {
	c := &Client{
		w:          w,
		exited:     make(chan struct{}),
		pending:    make(map[uint64]*pendingRequest),
		readerDone: make(chan struct{}),
	}
	go c.readLoop(r)
	return c
}

func closeAll(files ...*os.File) {
	for _, f := range files {
		_ = f.Close()
	}
}

// exitHint is appended to "closed unexpectedly": the last stderr line, if any.
func (c *Client) exitHint() string {
	if c.stderr == nil {
		return ""
	}
	last := c.stderr.lastLine()
	if last == "" {
		return ""
	}
	return ": " + last
}

// VMID is the current VM's id ("" before Create).
func (c *Client) VMID() string {
	c.stateMu.Lock()
	defer c.stateMu.Unlock()
	return c.vmID
}

func (c *Client) setVMID(id string) {
	c.stateMu.Lock()
	c.vmID = id
	c.stateMu.Unlock()
}

// Close closes the VM (its state stays for `matchlock list`; Remove deletes it) and
// ends the server. timeout is the VM's grace period and how long to wait for the
// server to exit (0 means 2s); after that the server is killed.
func (c *Client) Close(timeout time.Duration) error {
	c.stateMu.Lock()
	if c.closed {
		c.stateMu.Unlock()
		return nil
	}
	c.closed = true
	c.stateMu.Unlock()

	c.setVFSHooks(nil, nil, nil)
	defer c.stopNetworkHookServer()

	eff := timeout
	if eff <= 0 {
		eff = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), eff+5*time.Second)
	_, _ = c.call(ctx, "close", map[string]float64{"timeout_seconds": eff.Seconds()}, nil)
	cancel()
	c.closeInput()

	if c.cmd == nil {
		return nil
	}
	var err error
	select {
	case <-c.exited:
		err = c.waitErr
	case <-time.After(eff):
		_ = c.cmd.Process.Kill()
		<-c.exited
		err = withDetail(ErrCloseTimeout, " after %s", eff)
	}
	if c.rfile != nil {
		_ = c.rfile.Close() // ends readLoop even if a grandchild still holds the pipe
	}
	return err
}

func (c *Client) closeInput() {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if !c.inputClosed {
		c.inputClosed = true
		_ = c.w.Close()
	}
}

// Remove deletes the stopped VM's state (`matchlock rm <id>`); call it after Close.
func (c *Client) Remove() error {
	id := c.VMID()
	if id == "" {
		return nil
	}
	out, err := c.runCLI(context.Background(), "rm", id)
	if err != nil {
		return withDetail(ErrRemoveVM, " %s: %s: %w", id, strings.TrimSpace(string(out)), err)
	}
	return nil
}

// VolumeInfo describes a named volume.
type VolumeInfo struct {
	Name string `json:"name"`
	Size string `json:"size"`
	Path string `json:"path"`
}

// VolumeCreate creates a named ext4 volume of sizeMB megabytes.
func (c *Client) VolumeCreate(name string, sizeMB int) (*VolumeInfo, error) {
	name = strings.TrimSpace(name)
	if name == "" {
		return nil, ErrVolumeNameRequired
	}
	if sizeMB <= 0 {
		return nil, ErrInvalidVolumeSize
	}
	out, err := c.runCLI(context.Background(), "volume", "create", name, "--size", strconv.Itoa(sizeMB), "--json")
	if err != nil {
		return nil, withDetail(ErrVolumeCommand, " create %s: %s: %w", name, strings.TrimSpace(string(out)), err)
	}
	var info VolumeInfo
	if err := json.Unmarshal([]byte(strings.TrimSpace(string(out))), &info); err != nil {
		return nil, wrapErr(ErrParseVolumeCreateResult, err)
	}
	if strings.TrimSpace(info.Path) == "" {
		return nil, ErrParseVolumeCreateResult
	}
	if info.Name == "" {
		info.Name = name
	}
	if info.Size == "" {
		info.Size = fmt.Sprintf("%.1f MB", float64(sizeMB))
	}
	return &info, nil
}

// VolumeList lists named volumes.
func (c *Client) VolumeList() ([]VolumeInfo, error) {
	out, err := c.runCLI(context.Background(), "volume", "ls", "--json")
	if err != nil {
		return nil, withDetail(ErrVolumeCommand, " ls: %s: %w", strings.TrimSpace(string(out)), err)
	}
	var vols []VolumeInfo
	if err := json.Unmarshal([]byte(strings.TrimSpace(string(out))), &vols); err != nil {
		return nil, wrapErr(ErrParseVolumeListResult, err)
	}
	for _, v := range vols {
		if strings.TrimSpace(v.Name) == "" || strings.TrimSpace(v.Path) == "" {
			return nil, ErrParseVolumeListResult
		}
	}
	return vols, nil
}

// VolumeRemove deletes a named volume.
func (c *Client) VolumeRemove(name string) error {
	name = strings.TrimSpace(name)
	if name == "" {
		return ErrVolumeNameRequired
	}
	out, err := c.runCLI(context.Background(), "volume", "rm", name)
	if err != nil {
		return withDetail(ErrVolumeCommand, " rm %s: %s: %w", name, strings.TrimSpace(string(out)), err)
	}
	return nil
}

// runCLI runs a plain sub-command of the same binary (never with sudo).
func (c *Client) runCLI(ctx context.Context, args ...string) ([]byte, error) {
	if c.binaryPath == "" {
		return nil, ErrBinaryPathRequired
	}
	cmd := exec.CommandContext(ctx, c.binaryPath, args...)
	var out tailBuffer
	out.max = 1 << 20
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.Bytes(), err
}

// tailBuffer keeps the last max bytes written (the server's stderr, CLI output).
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
	max int
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append([]byte(nil), t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.buf...)
}

func (t *tailBuffer) lastLine() string {
	lines := strings.Split(strings.TrimSpace(string(t.Bytes())), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
