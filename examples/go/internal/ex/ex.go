// Package ex holds what the Go examples share: the image, the client, a loud check.
package ex

import (
	"fmt"
	"os"

	"matchlock.dev/go/pkg/sdk"
)

// Image is $MATCHLOCK_EXAMPLE_IMAGE or the built-in busybox image.
func Image() string {
	if img := os.Getenv("MATCHLOCK_EXAMPLE_IMAGE"); img != "" {
		return img
	}
	return "matchlock/busybox"
}

// Check prints "ok: what" or fails the example with "FAILED: what".
func Check(cond bool, what string, args ...any) {
	msg := fmt.Sprintf(what, args...)
	if !cond {
		fmt.Fprintln(os.Stderr, "FAILED:", msg)
		os.Exit(1)
	}
	fmt.Println("ok:", msg)
}

// Must exits on err.
func Must(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAILED: %s: %v\n", what, err)
		os.Exit(1)
	}
}

// Client starts `matchlock rpc` ($MATCHLOCK_BIN, else matchlock from PATH).
func Client() *sdk.Client {
	c, err := sdk.NewClient(sdk.DefaultConfig())
	Must(err, "start matchlock rpc")
	return c
}

// Finish closes the VM and removes its state.
func Finish(c *sdk.Client) {
	Must(c.Close(0), "close")
	Must(c.Remove(), "remove")
}
