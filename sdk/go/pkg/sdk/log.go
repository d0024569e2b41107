package sdk

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
)

// Log returns the VM's log so far (guest console and entrypoint output).
func (c *Client) Log(ctx context.Context) (string, error) {
	raw, err := c.call(ctx, "log", nil, nil)
	if err != nil {
		return "", err
	}
	var r struct {
		Content string `json:"content"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return "", wrapErr(ErrParseLogResult, err)
	}
	b, err := base64.StdEncoding.DecodeString(r.Content)
	if err != nil {
		return "", wrapErr(ErrParseLogResult, err)
	}
	return string(b), nil
}

// LogStream follows the VM log into w until ctx ends (then it returns ctx.Err()).
func (c *Client) LogStream(ctx context.Context, w io.Writer) error {
	_, err := c.call(ctx, "log_stream", nil, func(_ string, data []byte) {
		writeTo(w, data)
	})
	return err
}
