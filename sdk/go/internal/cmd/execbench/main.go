// execbench times Exec("true") through the Go SDK against a real VM and prints
// {"p50_ms", "p99_ms", "calls"} (bench/sdk_go.py compares it with the Python SDK).
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
	image, calls := os.Args[1], 500
	if len(os.Args) > 2 {
		calls, _ = strconv.Atoi(os.Args[2])
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
	json.NewEncoder(os.Stdout).Encode(map[string]any{"p50_ms": pct(0.5), "p99_ms": pct(0.99), "calls": calls})
}
