package sdk

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
)

// Wire shapes of spec §1.3.
type request struct {
	JSONRPC string `json:"jsonrpc"`
	Method  string `json:"method"`
	Params  any    `json:"params,omitempty"`
	ID      uint64 `json:"id"`
}

type notificationRequest struct {
	JSONRPC string `json:"jsonrpc"`
	Method  string `json:"method"`
	Params  any    `json:"params,omitempty"`
}

type incoming struct {
	ID     *uint64         `json:"id"`
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// notifyFunc receives a request's notifications: `.ready` ones with nil data, output
// ones with their bytes (base64-decoded, or as a raw payload carried them).
type notifyFunc func(method string, data []byte)

type pendingRequest struct {
	ch             chan pendingResult
	onNotification notifyFunc
	// onLate receives the result of a request whose caller stopped waiting (create
	// abandoned by its context: the VM it made still has to be owned by the client).
	onLate func(json.RawMessage)
}

type pendingResult struct {
	result json.RawMessage
	err    error
}

// requestScoped are the notification methods routed to a pending request by params.id.
var requestScoped = map[string]bool{
	"exec_stream.stdout": true, "exec_stream.stderr": true,
	"exec_pipe.ready": true, "exec_pipe.stdout": true, "exec_pipe.stderr": true,
	"exec_tty.ready": true, "exec_tty.stdout": true,
	"log_stream.data": true,
}

func (c *Client) nextID() uint64 { return c.requestID.Add(1) }

func (c *Client) writeMessage(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return wrapErr(ErrMarshalRequest, err)
	}
	data = append(data, '\n')
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if c.inputClosed {
		return ErrClientClosed
	}
	if _, err := c.w.Write(data); err != nil {
		return wrapErr(ErrWriteRequest, err)
	}
	return nil
}

// call sends one request and waits for its response. If ctx ends first, a `cancel`
// for it is sent and ctx.Err() returned.
func (c *Client) call(ctx context.Context, method string, params any, onNotification notifyFunc) (json.RawMessage, error) {
	return c.callWithID(ctx, c.nextID(), method, params, onNotification, nil)
}

func (c *Client) callWithID(ctx context.Context, id uint64, method string, params any, onNotification notifyFunc, onLate func(json.RawMessage)) (json.RawMessage, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p := &pendingRequest{ch: make(chan pendingResult, 1), onNotification: onNotification}
	c.pendingMu.Lock()
	if c.pending == nil {
		err := c.readerErr
		c.pendingMu.Unlock()
		if err == nil {
			err = ErrClientClosed
		}
		return nil, err
	}
	c.pending[id] = p
	c.pendingMu.Unlock()

	forget := func() {
		c.pendingMu.Lock()
		if c.pending != nil {
			delete(c.pending, id)
		}
		c.pendingMu.Unlock()
	}
	if err := c.writeMessage(request{JSONRPC: "2.0", Method: method, Params: params, ID: id}); err != nil {
		forget()
		return nil, err
	}
	select {
	case r := <-p.ch:
		forget()
		return r.result, r.err
	case <-ctx.Done():
		if onLate != nil {
			c.pendingMu.Lock()
			p.onLate = onLate
			c.pendingMu.Unlock()
			// The response may have arrived between ctx.Done and setting onLate.
			select {
			case r := <-p.ch:
				forget()
				if r.err == nil {
					onLate(r.result)
				}
			default:
			}
		} else {
			forget()
		}
		_ = c.writeMessage(request{JSONRPC: "2.0", Method: "cancel", Params: map[string]uint64{"id": id}, ID: c.nextID()})
		return nil, ctx.Err()
	}
}

// notify sends a true notification (no id): the Go SDK's form for stdin/resize.
func (c *Client) notify(method string, params any) error {
	return c.writeMessage(notificationRequest{JSONRPC: "2.0", Method: method, Params: params})
}

// Raw payloads (our server's extension, docs/lifecycle.md): an exec sent with
// "raw": true gets its output as this exact header line followed by `bytes` raw bytes,
// instead of base64 in JSON (which encoding/json and base64 decode at ~50 MB/s here).
var (
	rawHead  = []byte(`{"jsonrpc":"2.0","method":"`)
	rawMid   = []byte(`","params":{"id":`)
	rawBytes = []byte(`,"bytes":`)
	rawTail  = []byte("}}\n")
)

// maxRaw bounds one payload as the server does (rpc/_codec.py MAX_RAW).
const maxRaw = 10 << 20

// rawHeader parses a raw-payload header line; ok is false for any other line.
func rawHeader(line []byte) (method string, id uint64, size int, ok bool) {
	if !bytes.HasPrefix(line, rawHead) || !bytes.HasSuffix(line, rawTail) {
		return "", 0, 0, false
	}
	rest := line[len(rawHead) : len(line)-len(rawTail)]
	m, rest, found := bytes.Cut(rest, rawMid)
	if !found || bytes.ContainsAny(m, "\"\\") {
		return "", 0, 0, false
	}
	idText, sizeText, found := bytes.Cut(rest, rawBytes)
	if !found {
		return "", 0, 0, false
	}
	id, err1 := strconv.ParseUint(string(idText), 10, 64)
	n, err2 := strconv.Atoi(string(sizeText))
	if err1 != nil || err2 != nil || n < 0 {
		return "", 0, 0, false
	}
	return string(m), id, n, true
}

// readLoop owns the server's stdout: it delivers responses and notifications in
// arrival order, so every chunk of a request is handed over before its result.
func (c *Client) readLoop(r io.Reader) {
	defer close(c.readerDone)
	br := bufio.NewReaderSize(r, 1<<16)
	var err error
	for {
		var line []byte
		line, err = br.ReadBytes('\n')
		if method, id, n, ok := rawHeader(line); ok {
			if n > maxRaw {
				err = fmt.Errorf("raw payload of %d bytes", n)
				break
			}
			data := make([]byte, n)
			if _, err = io.ReadFull(br, data); err != nil {
				break
			}
			c.deliver(method, id, data)
			continue
		}
		if len(line) > 0 {
			c.dispatch(line)
		}
		if err != nil {
			break
		}
	}
	reason := fmt.Errorf("%w: matchlock process closed unexpectedly%s", ErrConnectionClose, c.exitHint())
	c.pendingMu.Lock()
	pend := c.pending
	c.pending = nil
	c.readerErr = reason
	c.pendingMu.Unlock()
	for _, p := range pend {
		p.ch <- pendingResult{err: reason}
	}
}

// deliver hands a request-scoped notification to the request it names, if pending.
func (c *Client) deliver(method string, id uint64, data []byte) {
	if !requestScoped[method] {
		return
	}
	c.pendingMu.Lock()
	pending := c.pending[id]
	c.pendingMu.Unlock()
	if pending != nil && pending.onNotification != nil {
		pending.onNotification(method, data)
	}
}

func (c *Client) dispatch(line []byte) {
	var msg incoming
	if err := json.Unmarshal(line, &msg); err != nil {
		return // not JSON: ignored, as by every SDK
	}
	if msg.ID == nil {
		c.handleNotification(msg.Method, msg.Params)
		return
	}
	c.pendingMu.Lock()
	p := c.pending[*msg.ID]
	var late func(json.RawMessage)
	if p != nil && p.onLate != nil {
		late = p.onLate
		delete(c.pending, *msg.ID)
	}
	c.pendingMu.Unlock()
	if p == nil {
		return
	}
	var res pendingResult
	if msg.Error != nil {
		res.err = &RPCError{Code: msg.Error.Code, Message: msg.Error.Message}
	} else {
		res.result = msg.Result
		if len(res.result) == 0 {
			res.result = json.RawMessage("{}")
		}
	}
	if late != nil {
		if res.err == nil {
			late(res.result)
		}
		return
	}
	select {
	case p.ch <- res:
	default: // a duplicate id: the first answer wins
	}
}

func (c *Client) handleNotification(method string, params json.RawMessage) {
	if requestScoped[method] {
		var p struct {
			ID   *uint64 `json:"id"`
			Data *string `json:"data"`
		}
		if json.Unmarshal(params, &p) != nil || p.ID == nil {
			return
		}
		var data []byte
		if p.Data != nil {
			var err error
			if data, err = base64.StdEncoding.DecodeString(*p.Data); err != nil {
				return // not base64: dropped, as before
			}
		}
		c.deliver(method, *p.ID, data)
		return
	}
	if method == "event" {
		c.handleEvent(params)
	}
}
