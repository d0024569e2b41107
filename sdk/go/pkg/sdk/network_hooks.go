package sdk

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// wireNetworkHookRule is NetworkHookRule as sent, with the SDK-internal callback id.
type wireNetworkHookRule struct {
	NetworkHookRule
	CallbackID string `json:"callback_id,omitempty"`
}

type wireNetworkInterception struct {
	Rules          []wireNetworkHookRule `json:"rules"`
	CallbackSocket string                `json:"callback_socket,omitempty"`
}

// compileNetworkHooks splits rules into the wire form and the local callback table
// (callback ids "network_hook_<1-based index>", spec §4.1).
func compileNetworkHooks(cfg *NetworkInterceptionConfig) (*wireNetworkInterception, map[string]compiledNetworkHook, error) {
	if cfg == nil || len(cfg.Rules) == 0 {
		return nil, nil, nil
	}
	wire := &wireNetworkInterception{Rules: make([]wireNetworkHookRule, 0, len(cfg.Rules))}
	local := map[string]compiledNetworkHook{}
	for i, rule := range cfg.Rules {
		w := wireNetworkHookRule{NetworkHookRule: rule}
		w.Hook = nil
		if rule.Hook != nil {
			if a := strings.ToLower(strings.TrimSpace(rule.Action)); a != "" && a != NetworkHookActionAllow {
				return nil, nil, withDetail(ErrInvalidNetworkHook, " %q callback hooks cannot set action=%q", rule.Name, rule.Action)
			}
			id := fmt.Sprintf("network_hook_%d", i+1)
			w.CallbackID = id
			local[id] = compiledNetworkHook{
				id:       id,
				name:     rule.Name,
				phase:    strings.ToLower(strings.TrimSpace(rule.Phase)),
				timeout:  time.Duration(rule.TimeoutMS) * time.Millisecond,
				callback: rule.Hook,
			}
		}
		wire.Rules = append(wire.Rules, w)
	}
	return wire, local, nil
}

// startNetworkHookServer binds <tmp>/matchlock-network-hook-*/hook.sock; the server
// connects once per callback invocation.
func (c *Client) startNetworkHookServer(hooks map[string]compiledNetworkHook) (string, error) {
	dir, err := os.MkdirTemp("", "matchlock-network-hook-*")
	if err != nil {
		return "", err
	}
	sock := filepath.Join(dir, "hook.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		_ = os.RemoveAll(dir)
		return "", err
	}
	wg := &sync.WaitGroup{}
	c.networkHookMu.Lock()
	c.networkHookListener, c.networkHookTempDir, c.networkHookWG = ln, dir, wg
	c.networkHookMu.Unlock()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					continue
				}
				return // listener closed
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				serveNetworkHookConn(conn, hooks)
			}()
		}
	}()
	return sock, nil
}

func (c *Client) stopNetworkHookServer() {
	c.networkHookMu.Lock()
	ln, dir := c.networkHookListener, c.networkHookTempDir
	c.networkHookListener, c.networkHookTempDir, c.networkHookWG = nil, "", nil
	c.networkHookMu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	if dir != "" {
		_ = os.RemoveAll(dir)
	}
}

type networkHookCallbackRequest struct {
	CallbackID      string              `json:"callback_id"`
	Phase           string              `json:"phase"`
	Host            string              `json:"host"`
	Method          string              `json:"method"`
	Path            string              `json:"path"`
	Query           map[string]string   `json:"query"`
	RequestHeaders  map[string][]string `json:"request_headers"`
	StatusCode      int                 `json:"status_code"`
	ResponseHeaders map[string][]string `json:"response_headers"`
	IsSSE           bool                `json:"is_sse"`
}

// callbackReadTimeout bounds how long a connection may take to send its request.
const callbackReadTimeout = 30 * time.Second

func serveNetworkHookConn(conn net.Conn, hooks map[string]compiledNetworkHook) {
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(callbackReadTimeout))
	line, err := bufio.NewReaderSize(conn, 1<<16).ReadBytes('\n')
	if err != nil && len(line) == 0 {
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	resp := answerNetworkHook(line, hooks)
	data, _ := json.Marshal(resp)
	_, _ = conn.Write(append(data, '\n'))
}

// answerNetworkHook turns one callback request line into the reply object.
func answerNetworkHook(line []byte, hooks map[string]compiledNetworkHook) map[string]any {
	var req networkHookCallbackRequest
	if err := json.Unmarshal(line, &req); err != nil {
		return map[string]any{"error": err.Error()}
	}
	hook, ok := hooks[req.CallbackID]
	if !ok || hook.callback == nil {
		return map[string]any{"error": "network hook callback not found"}
	}
	if hook.phase != "" && !strings.EqualFold(hook.phase, req.Phase) {
		return map[string]any{"error": "network hook phase mismatch"}
	}
	ctx := context.Background()
	if hook.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, hook.timeout)
		defer cancel()
	}
	result, err := runNetworkHook(ctx, hook.callback, NetworkHookRequest{
		Phase:           req.Phase,
		Host:            req.Host,
		Method:          req.Method,
		Path:            req.Path,
		Query:           req.Query,
		RequestHeaders:  req.RequestHeaders,
		StatusCode:      req.StatusCode,
		ResponseHeaders: req.ResponseHeaders,
		IsSSE:           req.IsSSE,
	})
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	resp := map[string]any{}
	if result == nil {
		return resp
	}
	if result.Action != "" {
		resp["action"] = result.Action
	}
	if m := result.Request; m != nil {
		r := map[string]any{}
		if m.Headers != nil { // present, even empty, means "replace all"
			r["headers"] = m.Headers
		}
		if m.Query != nil {
			r["query"] = m.Query
		}
		if m.Path != "" {
			r["path"] = m.Path
		}
		resp["request"] = r
	}
	if m := result.Response; m != nil {
		r := map[string]any{}
		if m.Headers != nil {
			r["headers"] = m.Headers
		}
		if len(m.BodyReplacements) > 0 {
			r["body_replacements"] = m.BodyReplacements
		}
		if m.SetBody != nil {
			r["set_body_base64"] = base64.StdEncoding.EncodeToString(m.SetBody)
		}
		resp["response"] = r
	}
	return resp
}

// runNetworkHook turns a panicking callback into an error (fail open), and stops
// waiting at the rule's deadline.
func runNetworkHook(ctx context.Context, fn NetworkHookFunc, req NetworkHookRequest) (*NetworkHookResult, error) {
	type out struct {
		r   *NetworkHookResult
		err error
	}
	ch := make(chan out, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				ch <- out{err: fmt.Errorf("network hook panicked: %v", p)}
			}
		}()
		r, err := fn(ctx, req)
		ch <- out{r, err}
	}()
	select {
	case o := <-ch:
		return o.r, o.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
