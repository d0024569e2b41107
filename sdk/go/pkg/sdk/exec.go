package sdk

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"sync"
)

// ExecResult is a buffered command's outcome (a non-zero exit is not an error).
type ExecResult struct {
	ExitCode   int
	Stdout     string
	Stderr     string
	DurationMS int64
}

// ExecStreamResult, ExecPipeResult and ExecInteractiveResult carry the exit status
// of the streaming modes (their output went to the caller's writers).
type ExecStreamResult struct {
	ExitCode   int
	DurationMS int64
}

type ExecPipeResult struct {
	ExitCode   int
	DurationMS int64
}

type ExecInteractiveResult struct {
	ExitCode   int
	DurationMS int64
}

// ExecPipeOptions configures ExecPipeWithOptions; the zero value is valid.
type ExecPipeOptions struct {
	WorkingDir string
	User       string
	Stdin      io.Reader
	Stdout     io.Writer
	Stderr     io.Writer
}

// ExecInteractiveOptions configures a PTY exec. Rows/Cols default to 24x80; each
// [rows, cols] received on Resize resizes the terminal.
type ExecInteractiveOptions struct {
	WorkingDir string
	User       string
	Rows       uint16
	Cols       uint16
	Stdin      io.Reader
	Stdout     io.Writer
	Resize     <-chan [2]uint16
}

type exitResult struct {
	ExitCode   int   `json:"exit_code"`
	DurationMS int64 `json:"duration_ms"`
}

// rawOutput asks our server for output as raw payloads (protocol.go); a server that
// does not know the field (the reference's) ignores it and sends base64.
func rawOutput(p map[string]any) map[string]any {
	p["raw"] = true
	return p
}

func execParams(command, workingDir, user string) map[string]any {
	p := map[string]any{"command": command}
	if workingDir != "" {
		p["working_dir"] = workingDir
	}
	if user != "" {
		p["user"] = user
	}
	return p
}

// Exec runs command (as `sh -c`) and buffers its output. Cancelling ctx cancels
// the command in the guest.
func (c *Client) Exec(ctx context.Context, command string) (*ExecResult, error) {
	return c.ExecWithDir(ctx, command, "")
}

// ExecWithDir is Exec in workingDir.
func (c *Client) ExecWithDir(ctx context.Context, command, workingDir string) (*ExecResult, error) {
	raw, err := c.call(ctx, "exec", execParams(command, workingDir, ""), nil)
	if err != nil {
		return nil, err
	}
	var r struct {
		ExitCode   int    `json:"exit_code"`
		Stdout     string `json:"stdout"`
		Stderr     string `json:"stderr"`
		DurationMS int64  `json:"duration_ms"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParseExecResult, err)
	}
	stdout, err1 := base64.StdEncoding.DecodeString(r.Stdout)
	stderr, err2 := base64.StdEncoding.DecodeString(r.Stderr)
	if err1 != nil || err2 != nil {
		return nil, withDetail(ErrParseExecResult, ": output is not base64")
	}
	return &ExecResult{ExitCode: r.ExitCode, Stdout: string(stdout), Stderr: string(stderr), DurationMS: r.DurationMS}, nil
}

// ExecStream runs command and writes its output to stdout/stderr as it arrives
// (nil writers discard).
func (c *Client) ExecStream(ctx context.Context, command string, stdout, stderr io.Writer) (*ExecStreamResult, error) {
	return c.ExecStreamWithDir(ctx, command, "", stdout, stderr)
}

// ExecStreamWithDir is ExecStream in workingDir.
func (c *Client) ExecStreamWithDir(ctx context.Context, command, workingDir string, stdout, stderr io.Writer) (*ExecStreamResult, error) {
	onChunk := func(method string, data []byte) {
		switch method {
		case "exec_stream.stdout":
			writeTo(stdout, data)
		case "exec_stream.stderr":
			writeTo(stderr, data)
		}
	}
	raw, err := c.call(ctx, "exec_stream", rawOutput(execParams(command, workingDir, "")), onChunk)
	if err != nil {
		return nil, err
	}
	var r exitResult
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParseExecStreamResult, err)
	}
	return &ExecStreamResult{ExitCode: r.ExitCode, DurationMS: r.DurationMS}, nil
}

func writeTo(w io.Writer, data []byte) {
	if w != nil && len(data) > 0 {
		_, _ = w.Write(data)
	}
}

// ExecPipe runs command with stdin streamed in (nil: empty) and its output
// streamed out, without a PTY.
func (c *Client) ExecPipe(ctx context.Context, command string, stdin io.Reader, stdout, stderr io.Writer) (*ExecPipeResult, error) {
	return c.ExecPipeWithOptions(ctx, command, ExecPipeOptions{Stdin: stdin, Stdout: stdout, Stderr: stderr})
}

// ExecPipeWithDir is ExecPipe in workingDir.
func (c *Client) ExecPipeWithDir(ctx context.Context, command, workingDir string, stdin io.Reader, stdout, stderr io.Writer) (*ExecPipeResult, error) {
	return c.ExecPipeWithOptions(ctx, command, ExecPipeOptions{WorkingDir: workingDir, Stdin: stdin, Stdout: stdout, Stderr: stderr})
}

// ExecPipeWithOptions is ExecPipe with a working directory and user.
func (c *Client) ExecPipeWithOptions(ctx context.Context, command string, opts ExecPipeOptions) (*ExecPipeResult, error) {
	s := c.newSession(ctx, "exec_pipe")
	go s.pumpInput(opts.Stdin)
	onChunk := func(method string, data []byte) {
		switch method {
		case "exec_pipe.ready":
			s.markReady()
		case "exec_pipe.stdout":
			writeTo(opts.Stdout, data)
		case "exec_pipe.stderr":
			writeTo(opts.Stderr, data)
		}
	}
	raw, err := c.callWithID(ctx, s.id, "exec_pipe", rawOutput(execParams(command, opts.WorkingDir, opts.User)), onChunk, nil)
	s.finish()
	if err != nil {
		return nil, err
	}
	var r exitResult
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParseExecPipeResult, err)
	}
	return &ExecPipeResult{ExitCode: r.ExitCode, DurationMS: r.DurationMS}, nil
}

// ExecInteractive runs command on a PTY (stdout and stderr merged), like `exec -it`.
func (c *Client) ExecInteractive(ctx context.Context, command string, opts *ExecInteractiveOptions) (*ExecInteractiveResult, error) {
	if opts == nil {
		opts = &ExecInteractiveOptions{}
	}
	rows, cols := opts.Rows, opts.Cols
	if rows == 0 {
		rows = 24
	}
	if cols == 0 {
		cols = 80
	}
	params := execParams(command, opts.WorkingDir, opts.User)
	params["rows"], params["cols"] = rows, cols

	s := c.newSession(ctx, "exec_tty")
	go s.pumpInput(opts.Stdin)
	go s.pumpResize(opts.Resize)
	onChunk := func(method string, data []byte) {
		switch method {
		case "exec_tty.ready":
			s.markReady()
		case "exec_tty.stdout":
			writeTo(opts.Stdout, data)
		}
	}
	raw, err := c.callWithID(ctx, s.id, "exec_tty", rawOutput(params), onChunk, nil)
	s.finish()
	if err != nil {
		return nil, err
	}
	var r exitResult
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParseExecTTYResult, err)
	}
	return &ExecInteractiveResult{ExitCode: r.ExitCode, DurationMS: r.DurationMS}, nil
}

// ioSession feeds one exec_pipe/exec_tty request: input waits for `<method>.ready`
// and stops when the request is done.
type ioSession struct {
	c         *Client
	ctx       context.Context
	id        uint64
	method    string
	ready     chan struct{}
	readyOnce sync.Once
	done      chan struct{}
}

func (c *Client) newSession(ctx context.Context, method string) *ioSession {
	if ctx == nil {
		ctx = context.Background()
	}
	return &ioSession{c: c, ctx: ctx, id: c.nextID(), method: method,
		ready: make(chan struct{}), done: make(chan struct{})}
}

func (s *ioSession) markReady() { s.readyOnce.Do(func() { close(s.ready) }) }

func (s *ioSession) finish() {
	close(s.done)
	s.markReady()
}

func (s *ioSession) waitReady() bool {
	select {
	case <-s.ready:
		select {
		case <-s.done:
			return false
		default:
			return true
		}
	case <-s.done:
		return false
	case <-s.ctx.Done():
		return false
	}
}

func (s *ioSession) pumpInput(stdin io.Reader) {
	if !s.waitReady() {
		return
	}
	eof := map[string]any{"id": s.id}
	if stdin == nil {
		_ = s.c.notify(s.method+".stdin_eof", eof)
		return
	}
	buf := make([]byte, 32*1024)
	for {
		n, err := stdin.Read(buf)
		select {
		case <-s.done:
			return // the command ended: late input is dropped
		default:
		}
		if n > 0 {
			chunk := map[string]any{"id": s.id, "data": base64.StdEncoding.EncodeToString(buf[:n])}
			if s.c.notify(s.method+".stdin", chunk) != nil {
				return
			}
		}
		if err != nil {
			_ = s.c.notify(s.method+".stdin_eof", eof)
			return
		}
	}
}

func (s *ioSession) pumpResize(resize <-chan [2]uint16) {
	if resize == nil || !s.waitReady() {
		return
	}
	for {
		select {
		case <-s.done:
			return
		case <-s.ctx.Done():
			return
		case size, ok := <-resize:
			if !ok {
				return
			}
			_ = s.c.notify("exec_tty.resize", map[string]any{"id": s.id, "rows": size[0], "cols": size[1]})
		}
	}
}
