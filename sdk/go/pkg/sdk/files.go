package sdk

import (
	"context"
	"encoding/base64"
	"encoding/json"
)

// FileInfo is one directory entry; Mode carries Go os.FileMode bits.
type FileInfo struct {
	Name  string `json:"name"`
	Size  int64  `json:"size"`
	Mode  uint32 `json:"mode"`
	IsDir bool   `json:"is_dir"`
}

// WriteFile writes content to path in the guest with mode 0644 (parents created).
func (c *Client) WriteFile(ctx context.Context, path string, content []byte) error {
	return c.WriteFileMode(ctx, path, content, 0o644)
}

// WriteFileMode writes content with the given permission bits. Local action and
// mutate hooks run first.
func (c *Client) WriteFileMode(ctx context.Context, path string, content []byte, mode uint32) error {
	if err := c.applyActionHooks(ctx, VFSHookOpWrite, path, len(content), mode); err != nil {
		return err
	}
	content, err := c.applyWriteMutations(ctx, path, content, mode)
	if err != nil {
		return err
	}
	_, err = c.call(ctx, "write_file", map[string]any{
		"path": path, "content": base64.StdEncoding.EncodeToString(content), "mode": mode,
	}, nil)
	return err
}

// ReadFile reads a regular file from the guest.
func (c *Client) ReadFile(ctx context.Context, path string) ([]byte, error) {
	if err := c.applyActionHooks(ctx, VFSHookOpRead, path, 0, 0); err != nil {
		return nil, err
	}
	raw, err := c.call(ctx, "read_file", map[string]any{"path": path}, nil)
	if err != nil {
		return nil, err
	}
	var r struct {
		Content string `json:"content"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParseReadResult, err)
	}
	b, err := base64.StdEncoding.DecodeString(r.Content)
	if err != nil {
		return nil, wrapErr(ErrParseReadResult, err)
	}
	return b, nil
}

// ListFiles lists a guest directory.
func (c *Client) ListFiles(ctx context.Context, path string) ([]FileInfo, error) {
	if err := c.applyActionHooks(ctx, VFSHookOpReadDir, path, 0, 0); err != nil {
		return nil, err
	}
	raw, err := c.call(ctx, "list_files", map[string]any{"path": path}, nil)
	if err != nil {
		return nil, err
	}
	var r struct {
		Files []FileInfo `json:"files"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, wrapErr(ErrParseListResult, err)
	}
	if r.Files == nil {
		r.Files = []FileInfo{}
	}
	return r.Files, nil
}
