// execbench times Exec("true") through the Go SDK against a real VM and, given a
// size in MiB, ExecStream of that much stdout; it prints {"p50_ms", "p99_ms", "calls",
// "stream_mb_s"} (bench/sdk_go.py compares it with the Python SDK).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"time"

	"matchlock.dev/go/pkg/sdk"
)

func main() {
	image, calls, mib := os.Args[1], 500, 0
	if len(os.Args) > 2 {
		calls, _ = strconv.Atoi(os.Args[2])
	}
	if len(os.Args) > 3 {
		mib, _ = strconv.Atoi(os.Args[3])
	}
	c, err := sdk.NewClient(sdk.DefaultConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer c.Remove()
	defer c.Close(0)
	if _, err := c.Launch(sdk.New(image)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx := context.Background()
	for i := 0; i < 20; i++ { // warm up
		if _, err := c.Exec(ctx, "true"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	lat := make([]float64, 0, calls)
	for i := 0; i < calls; i++ {
		t := time.Now()
		if _, err := c.Exec(ctx, "true"); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		lat = append(lat, float64(time.Since(t).Microseconds())/1000)
	}
	sort.Float64s(lat)
	pct := func(q float64) float64 { return lat[min(len(lat)-1, int(q*float64(len(lat))))] }
	out := map[string]any{"p50_ms": pct(0.5), "p99_ms": pct(0.99), "calls": calls}
	if mib > 0 {
		rate, err := streamRate(ctx, c, mib)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out["stream_mb_s"] = rate
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

// counter counts bytes from the first write to the last, as bench/sdk_vm.py's Counter.
type counter struct {
	n           int
	first, last time.Time
}

func (w *counter) Write(p []byte) (int, error) {
	if w.n == 0 {
		w.first = time.Now()
	}
	w.n += len(p)
	w.last = time.Now()
	return len(p), nil
}

// streamRate is the median MB/s of three ExecStreams of `dd` writing mib MiB.
func streamRate(ctx context.Context, c *sdk.Client, mib int) (float64, error) {
	cmd := fmt.Sprintf("dd if=/dev/zero bs=65536 count=%d 2>/dev/null", mib*16)
	rates := make([]float64, 0, 3)
	for i := 0; i < 3; i++ {
		w := &counter{}
		if _, err := c.ExecStream(ctx, cmd, w, nil); err != nil {
			return 0, err
		}
		if w.n != mib<<20 {
			return 0, fmt.Errorf("stream got %d bytes, want %d", w.n, mib<<20)
		}
		rates = append(rates, float64(w.n)/1e6/w.last.Sub(w.first).Seconds())
	}
	sort.Float64s(rates)
	return rates[1], nil
}
