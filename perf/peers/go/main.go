// Command gobench is the Go peer program for the Zokio perf harness.
//
// Usage: gobench <benchmark> [key=value ...]
//
// It prints `RESULT <benchmark> <metric> <value> <unit>` lines on stdout and
// exits 0; diagnostics go to stderr. A benchmark that cannot run in the asked
// configuration prints `NA <benchmark> <reason>` and exits 0. Unknown
// benchmark or malformed argument: message on stderr, exit 2.
//
// `workers=N` sets GOMAXPROCS. The exact shape of every benchmark is written
// next to its function and in perf/peers/README.md; the Tokio peer
// (perf/peers/tokio) and the Zokio side do the same work.
//
// Standard library only.
package main

import (
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var benchmarks = []string{
	"switch", "spawn", "chan_pingpong", "park_pingpong", "wake_latency", "mpmc", "mutex", "timers",
	"mem_parked", "mem_queued", "echo_server", "http_server",
}

// ---------------------------------------------------------------------------
// Arguments and output

type args struct {
	bench string
	kv    map[string]string
	quick bool
}

func usageExit(msg string) {
	fmt.Fprintf(os.Stderr, "gobench: %s\n", msg)
	fmt.Fprintf(os.Stderr, "usage: gobench <benchmark> [key=value ...]\n")
	fmt.Fprintf(os.Stderr, "benchmarks: %s\n", strings.Join(benchmarks, " "))
	os.Exit(2)
}

func parseArgs() *args {
	if len(os.Args) < 2 {
		usageExit("missing benchmark name")
	}
	a := &args{bench: os.Args[1], kv: map[string]string{}}
	for _, s := range os.Args[2:] {
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			usageExit(fmt.Sprintf("malformed argument %q (want key=value)", s))
		}
		a.kv[k] = v
	}
	a.quick = a.flag("quick")
	return a
}

func (a *args) flag(key string) bool {
	switch a.kv[key] {
	case "1", "true", "yes":
		return true
	}
	return false
}

// num returns an integer option: full is the default of a normal run, quick
// the default under quick=1.
func (a *args) num(key string, full, quick uint64) uint64 {
	if v, ok := a.kv[key]; ok {
		n, err := strconv.ParseUint(strings.ReplaceAll(v, "_", ""), 10, 64)
		if err != nil {
			usageExit(fmt.Sprintf("%s=%s is not a non-negative integer", key, v))
		}
		return n
	}
	if a.quick {
		return quick
	}
	return full
}

// workers sets GOMAXPROCS from workers= (default def) and returns it.
func (a *args) workers(def uint64) int {
	w := a.num("workers", def, def)
	if w == 0 {
		usageExit("workers must be >= 1")
	}
	runtime.GOMAXPROCS(int(w))
	return int(w)
}

func max64(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

func result(bench, metric string, value float64, unit string) {
	var v string
	if math.Abs(value) >= 1000 {
		v = strconv.FormatFloat(value, 'f', 0, 64)
	} else {
		v = strconv.FormatFloat(value, 'f', 2, 64)
	}
	fmt.Fprintf(os.Stdout, "RESULT %s %s %s %s\n", bench, metric, v, unit)
}

func na(bench, reason string) {
	fmt.Fprintf(os.Stdout, "NA %s %s\n", bench, reason)
}

// percentile is the nearest-rank percentile of a sorted slice: element
// ceil(p/100*N)-1.
func percentile(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	r := int(math.Ceil(p / 100 * float64(len(sorted))))
	if r < 1 {
		r = 1
	}
	if r > len(sorted) {
		r = len(sorted)
	}
	return sorted[r-1]
}

func sortInt64(s []int64) { sort.Slice(s, func(i, j int) bool { return s[i] < s[j] }) }

// rssBytes is the resident set size: second field of /proc/self/statm (pages).
func rssBytes() uint64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseUint(f[1], 10, 64)
	return pages * uint64(os.Getpagesize())
}

// splitmix64 of (i+1): the shared pseudo-random sequence of the timers
// benchmark, identical in every peer.
func splitmix64(i uint64) uint64 {
	z := (i + 1) * 0x9E3779B97F4A7C15
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

// timerUs is the sleep of timer task i in microseconds, in [1000, 100000].
func timerUs(i uint64) uint64 { return 1000 + splitmix64(i)%99001 }

// spinFor busy-waits without blocking the goroutine.
func spinFor(d time.Duration) {
	until := time.Now().Add(d)
	for time.Now().Before(until) {
	}
}

// ---------------------------------------------------------------------------
// switch: GOMAXPROCS=1, two goroutines alternate with runtime.Gosched. Each
// goroutine calls Gosched n times; switches = 2n (total Gosched calls);
// ns_per_switch = elapsed / 2n. The main goroutine is blocked in wg.Wait
// meanwhile. A warm-up run of n/10 precedes the timed run. `workers` is
// ignored: the ping-pong is defined on one worker.

func switchRun(n uint64) time.Duration {
	var wg sync.WaitGroup
	wg.Add(2)
	body := func() {
		for i := uint64(0); i < n; i++ {
			runtime.Gosched()
		}
		wg.Done()
	}
	t0 := time.Now()
	go body()
	go body()
	wg.Wait()
	return time.Since(t0)
}

func benchSwitch(a *args) {
	n := max64(a.num("n", 1000000, 200000), 1)
	runtime.GOMAXPROCS(1)
	switchRun(n/10 + 1)
	el := switchRun(n)
	result("switch", "ns_per_switch", float64(el.Nanoseconds())/float64(2*n), "ns")
}

// ---------------------------------------------------------------------------
// spawn: spawn+run+join of empty goroutines, GOMAXPROCS=workers (default 1).
// The main goroutine spawns a batch of `batch` (default 1000) goroutines whose
// only work is wg.Done() on the batch's WaitGroup, then waits for the batch
// (Go has no per-goroutine join handle; the WaitGroup is the idiomatic join).
// Repeats until n goroutines have been joined. tasks_per_sec = n / elapsed.
// Warm-up: one run of n/10 first.

func emptyTask(wg *sync.WaitGroup) { wg.Done() }

func spawnRun(n, batch uint64) time.Duration {
	var wg sync.WaitGroup
	t0 := time.Now()
	for left := n; left > 0; {
		k := batch
		if left < k {
			k = left
		}
		wg.Add(int(k))
		for i := uint64(0); i < k; i++ {
			go emptyTask(&wg)
		}
		wg.Wait()
		left -= k
	}
	return time.Since(t0)
}

func benchSpawn(a *args) {
	a.workers(1)
	n := max64(a.num("n", 1000000, 100000), 1)
	batch := max64(a.num("batch", 1000, 1000), 1)
	spawnRun(n/10+1, batch)
	el := spawnRun(n, batch)
	result("spawn", "tasks_per_sec", float64(n)/el.Seconds(), "tasks/s")
}

// ---------------------------------------------------------------------------
// chan_pingpong: goroutines ping (the main goroutine) and pong bounce a
// uint64 over two unbuffered channels. One round trip = ping sends on c1,
// pong receives and sends it back on c2, ping receives it. n round trips;
// ns_per_roundtrip = elapsed / n. GOMAXPROCS=workers (default 1); placement
// is left to the scheduler. Warm-up: n/10 round trips.

func pingpongRun(n uint64) time.Duration {
	c1 := make(chan uint64)
	c2 := make(chan uint64)
	done := make(chan struct{})
	go func() {
		for v := range c1 {
			c2 <- v
		}
		close(done)
	}()
	t0 := time.Now()
	for i := uint64(0); i < n; i++ {
		c1 <- i
		if v := <-c2; v != i {
			panic("chan_pingpong: wrong value")
		}
	}
	el := time.Since(t0)
	close(c1)
	<-done
	return el
}

// pairBench runs a two-goroutine round-trip benchmark: warm-up n/10 round
// trips, then n timed ones; ns_per_roundtrip. pinned=1 is NA (see above).
func pairBench(a *args, name string, run func(uint64) time.Duration) {
	a.workers(1)
	if a.flag("pinned") {
		na(name, "Go cannot place goroutines on given Ps")
		return
	}
	n := max64(a.num("n", 1000000, 100000), 1)
	run(n/10 + 1)
	el := run(n)
	result(name, "ns_per_roundtrip", float64(el.Nanoseconds())/float64(n), "ns")
}

func benchChanPingpong(a *args) { pairBench(a, "chan_pingpong", pingpongRun) }

// ---------------------------------------------------------------------------
// park_pingpong: the chan_pingpong round trip without channels. Go has no
// public park/unpark; the public primitive that goes straight to the
// runtime's park (semacquire) and ready (semrelease) is sync.Mutex, which may
// be unlocked by another goroutine than the one that locked it. a and b start
// locked: ping unlocks a (pong's turn) and locks b; pong locks a and unlocks
// b. pinned=1 (different workers) is not possible in Go: NA.

func parkpongRun(n uint64) time.Duration {
	var a, b sync.Mutex
	a.Lock()
	b.Lock()
	done := make(chan struct{})
	go func() {
		for i := uint64(0); i < n; i++ {
			a.Lock()
			b.Unlock()
		}
		close(done)
	}()
	t0 := time.Now()
	for i := uint64(0); i < n; i++ {
		a.Unlock()
		b.Lock()
	}
	el := time.Since(t0)
	<-done
	return el
}

func benchParkPingpong(a *args) { pairBench(a, "park_pingpong", parkpongRun) }

// ---------------------------------------------------------------------------
// mpmc: `producers` goroutines (default 4) send n values in all (default
// 2,000,000) through one channel of capacity `cap` (default 128) to
// `consumers` goroutines (default 4); the last producer closes it.
// msgs_per_sec = n / (time until every consumer has seen the close). Every
// value is checked to arrive once (by sum and count). GOMAXPROCS=workers.

func benchMpmc(a *args) {
	a.workers(2)
	producers := max64(a.num("producers", 4, 4), 1)
	consumers := max64(a.num("consumers", 4, 4), 1)
	capacity := a.num("cap", 128, 128)
	n := max64(a.num("n", 2000000, 200000), 1)
	per := max64(n/producers, 1)
	ch := make(chan uint64, capacity)
	var sum, count atomic.Uint64
	var prod, cons sync.WaitGroup
	t0 := time.Now()
	cons.Add(int(consumers))
	for c := uint64(0); c < consumers; c++ {
		go func() {
			var s, k uint64
			for v := range ch {
				s += v
				k++
			}
			sum.Add(s)
			count.Add(k)
			cons.Done()
		}()
	}
	prod.Add(int(producers))
	for p := uint64(0); p < producers; p++ {
		go func() {
			for i := uint64(1); i <= per; i++ {
				ch <- i
			}
			prod.Done()
		}()
	}
	prod.Wait()
	close(ch)
	cons.Wait()
	el := time.Since(t0)
	total := per * producers
	if count.Load() != total || sum.Load() != producers*(per*(per+1)/2) {
		fmt.Fprintf(os.Stderr, "gobench: mpmc: %d values (sum %d), want %d\n", count.Load(), sum.Load(), total)
		os.Exit(1)
	}
	result("mpmc", "msgs_per_sec", float64(total)/el.Seconds(), "msgs/s")
}

// ---------------------------------------------------------------------------
// wake_latency: cross-worker wake of a parked goroutine, GOMAXPROCS=workers
// (default 2, at least 2 needed). Sleeper B is parked receiving on a channel
// (capacity 1). Waker A (the main goroutine) never blocks: it busy-waits, so
// it keeps one P and B must run on another. Each iteration A waits until B
// has acknowledged the previous wake, busy-waits gap_us (default 20 us) so B
// is surely parked again and its P idle, records t0 and sends; B records t1
// as soon as it runs and acknowledges. Sample = t1 - t0 (monotonic clock).
// n samples (default 20000, quick 5000) after n/10 discarded warm-up
// iterations; p50 and p99 by nearest rank.

func benchWakeLatency(a *args) {
	w := a.workers(2)
	if w < 2 {
		na("wake_latency", "needs workers>=2 (the waker spins on its own worker)")
		return
	}
	n := max64(a.num("n", 20000, 5000), 1)
	gap := time.Duration(a.num("gap_us", 20, 20)) * time.Microsecond
	warm := n / 10
	total := n + warm

	base := time.Now()
	var t0ns, acks atomic.Int64
	var stop atomic.Bool
	ch := make(chan struct{}, 1)
	out := make(chan []int64)
	go func() {
		samples := make([]int64, 0, total)
		acks.Add(1)
		for {
			<-ch
			t1 := int64(time.Since(base))
			if stop.Load() {
				break
			}
			samples = append(samples, t1-t0ns.Load())
			acks.Add(1)
		}
		out <- samples
	}()

	limit := time.Now().Add(60 * time.Second)
	for i := int64(0); i < int64(total); i++ {
		for acks.Load() < i+1 {
			if time.Now().After(limit) {
				fmt.Fprintf(os.Stderr, "gobench: wake_latency: sleeper stalled at iteration %d\n", i)
				os.Exit(1)
			}
		}
		spinFor(gap)
		t0ns.Store(int64(time.Since(base)))
		ch <- struct{}{}
	}
	for acks.Load() < int64(total)+1 {
	}
	stop.Store(true)
	ch <- struct{}{}
	samples := <-out
	s := samples[warm:]
	sortInt64(s)
	result("wake_latency", "p50_ns", float64(percentile(s, 50)), "ns")
	result("wake_latency", "p99_ns", float64(percentile(s, 99)), "ns")
}

// ---------------------------------------------------------------------------
// mutex: `tasks` goroutines (default 1000) each do n/tasks iterations of
// { mu.Lock(); counter++; mu.Unlock() } on one sync.Mutex, all spawned at
// once by the main goroutine, which then waits for them. n = total ops
// (default 1000000, quick 100000); GOMAXPROCS=workers (default 2).
// ops_per_sec = (n rounded down to a multiple of tasks) / elapsed, elapsed
// from before the first spawn to the last join.

func benchMutex(a *args) {
	a.workers(2)
	tasks := max64(a.num("tasks", 1000, 1000), 1)
	n := max64(a.num("n", 1000000, 100000), tasks)
	per := n / tasks
	total := per * tasks
	var mu sync.Mutex
	var counter uint64
	var wg sync.WaitGroup
	wg.Add(int(tasks))
	t0 := time.Now()
	for t := uint64(0); t < tasks; t++ {
		go func() {
			for i := uint64(0); i < per; i++ {
				mu.Lock()
				counter++
				mu.Unlock()
			}
			wg.Done()
		}()
	}
	wg.Wait()
	el := time.Since(t0)
	if counter != total {
		fmt.Fprintf(os.Stderr, "gobench: mutex: counter %d != %d\n", counter, total)
		os.Exit(1)
	}
	result("mutex", "ops_per_sec", float64(total)/el.Seconds(), "ops/s")
}

// ---------------------------------------------------------------------------
// timers: n goroutines (default 100000, quick 10000), GOMAXPROCS=workers
// (default 1). Goroutine i, when it first runs, takes start_i = now and
// sleeps timerUs(i) microseconds (splitmix64 sequence, [1 ms, 100 ms]), so
// deadline_i = start_i + timerUs(i); on waking it records woke_i = now.
//   overshoot_i       = woke_i - deadline_i
//   overshoot_p99_us  = nearest-rank p99 of overshoot_i, in microseconds
//   timer_ops_per_sec = n / (max_i woke_i - T0), T0 = before the first spawn

func benchTimers(a *args) {
	a.workers(1)
	n := max64(a.num("n", 100000, 10000), 1)
	over := make([]int64, n)
	woke := make([]int64, n)
	var wg sync.WaitGroup
	wg.Add(int(n))
	t0 := time.Now()
	for i := uint64(0); i < n; i++ {
		go func(i uint64) {
			d := time.Duration(timerUs(i)) * time.Microsecond
			start := time.Now()
			time.Sleep(d)
			w := time.Now()
			over[i] = int64(w.Sub(start) - d)
			woke[i] = int64(w.Sub(t0))
			wg.Done()
		}(i)
	}
	wg.Wait()
	var last int64
	for _, w := range woke {
		if w > last {
			last = w
		}
	}
	sortInt64(over)
	result("timers", "timer_ops_per_sec", float64(n)/(float64(last)/1e9), "ops/s")
	result("timers", "overshoot_p99_us", float64(percentile(over, 99))/1000, "us")
	fmt.Fprintf(os.Stderr, "# timers: wall %.1f ms, overshoot p50 %.1f us, max %.1f us\n",
		float64(last)/1e6, float64(percentile(over, 50))/1000, float64(over[len(over)-1])/1000)
}

// ---------------------------------------------------------------------------
// mem_parked: RSS per parked goroutine, GOMAXPROCS=workers (default 1). The
// main goroutine spawns n goroutines (default 100000, quick 10000) in
// batches of 1000; each one parks receiving from a shared channel. After each
// batch main yields (runtime.Gosched) until every goroutine spawned so far is
// parked. bytes_per_task = (RSS after all n are parked - RSS before the
// first spawn) / n, RSS from /proc/self/statm. Then closing the channel
// releases them and main waits for all of them. The GC is off while
// measuring (debug.SetGCPercent(-1)) after a runtime.GC + FreeOSMemory; a
// warm-up round of 1000 goroutines runs first.

func parkRound(n uint64) (before, after uint64) {
	release := make(chan struct{})
	var parked atomic.Int64
	var wg sync.WaitGroup
	wg.Add(int(n))
	before = rssBytes()
	var spawned uint64
	for spawned < n {
		k := n - spawned
		if k > 1000 {
			k = 1000
		}
		for i := uint64(0); i < k; i++ {
			go func() {
				parked.Add(1)
				<-release
				wg.Done()
			}()
		}
		spawned += k
		for uint64(parked.Load()) < spawned {
			runtime.Gosched()
		}
	}
	// A goroutine counts itself parked just before its receive; one more
	// yield lets the last ones actually block.
	runtime.Gosched()
	after = rssBytes()
	close(release)
	wg.Wait()
	return
}

func benchMemParked(a *args) {
	a.workers(1)
	n := max64(a.num("n", 100000, 10000), 1)
	parkRound(1000)
	runtime.GC()
	debug.FreeOSMemory()
	debug.SetGCPercent(-1)
	before, after := parkRound(n)
	fmt.Fprintf(os.Stderr, "# mem_parked: n=%d rss before %d after %d\n", n, before, after)
	var d uint64
	if after > before {
		d = after - before
	}
	result("mem_parked", "bytes_per_task", float64(d)/float64(n), "bytes")
}

// ---------------------------------------------------------------------------
// mem_queued: RSS per spawned-but-not-yet-run goroutine. Go has no "spawned
// but not run" state that a program can hold, so this is the closest shape:
// GOMAXPROCS=1 (always), GC off, and the main goroutine spawns n goroutines
// (default 1000000, quick 100000) without yielding. A goroutine's stack and
// descriptor are allocated at spawn, so one that has not run yet costs what
// it costs; the scheduler may still preempt main (sysmon, every 10 ms) and
// run some of them, and each one that runs parks on a channel at once (so
// its memory stays held). How many ran before the measurement is reported on
// stderr. bytes_per_task = (RSS after the n-th spawn - RSS before the first)
// / n. Then the channel is closed and main waits for all of them.

func benchMemQueued(a *args) {
	n := max64(a.num("n", 1000000, 100000), 1)
	runtime.GOMAXPROCS(1)
	release := make(chan struct{})
	var started atomic.Int64
	var wg sync.WaitGroup
	wg.Add(int(n))
	runtime.GC()
	debug.FreeOSMemory()
	debug.SetGCPercent(-1)
	before := rssBytes()
	for i := uint64(0); i < n; i++ {
		go func() {
			started.Add(1)
			<-release
			wg.Done()
		}()
	}
	after := rssBytes()
	ran := started.Load()
	close(release)
	wg.Wait()
	fmt.Fprintf(os.Stderr, "# mem_queued: n=%d rss before %d after %d; goroutines run before measuring: %d "+
		"(Go cannot hold goroutines in a not-yet-run state; spawned from main with GOMAXPROCS=1 without yielding)\n",
		n, before, after, ran)
	var d uint64
	if after > before {
		d = after - before
	}
	result("mem_queued", "bytes_per_task", float64(d)/float64(n), "bytes")
}

// ---------------------------------------------------------------------------
// Servers: listen on 127.0.0.1:port (port=0 picks one, reported on stderr),
// print READY once listening, run until SIGTERM or SIGINT, then exit 0.
// GOMAXPROCS=workers (default 1). Go sets TCP_NODELAY on every TCP
// connection and (1.19+) raises the soft RLIMIT_NOFILE to the hard limit.

func listen(bench string, port uint64) net.Listener {
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		fmt.Fprintf(os.Stderr, "gobench: %s: %v\n", bench, err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "# %s listening on %s\n", bench, ln.Addr())
	return ln
}

func serveUntilSignal(ln net.Listener, serve func()) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	fmt.Fprintln(os.Stdout, "READY")
	go serve()
	<-sig
	ln.Close()
	os.Exit(0)
}

// echo_server: one goroutine per connection; loop { read up to 4096 bytes;
// write all of them back } until EOF or error.
func echoConn(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 4096)
	for {
		k, err := c.Read(buf)
		if k > 0 {
			if _, werr := c.Write(buf[:k]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func benchEchoServer(a *args) {
	a.workers(1)
	ln := listen("echo_server", a.num("port", 0, 0))
	serveUntilSignal(ln, func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					continue
				}
				if strings.Contains(err.Error(), "use of closed") {
					return
				}
				fmt.Fprintf(os.Stderr, "gobench: accept: %v\n", err)
				time.Sleep(time.Millisecond)
				continue
			}
			go echoConn(c)
		}
	})
}

// http_server: net/http HTTP/1.1 server (keep-alive on by default) answering
// every request with 200, `Content-Type: text/plain`, body "Hello, World!"
// (net/http adds Content-Length and Date).
var helloBody = []byte("Hello, World!")

func hello(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	w.Write(helloBody)
}

func benchHTTPServer(a *args) {
	a.workers(1)
	ln := listen("http_server", a.num("port", 0, 0))
	srv := &http.Server{Handler: http.HandlerFunc(hello)}
	serveUntilSignal(ln, func() {
		if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed &&
			!strings.Contains(err.Error(), "use of closed") {
			fmt.Fprintf(os.Stderr, "gobench: http_server: %v\n", err)
			os.Exit(1)
		}
	})
}

// ---------------------------------------------------------------------------

func main() {
	a := parseArgs()
	switch a.bench {
	case "switch":
		benchSwitch(a)
	case "spawn":
		benchSpawn(a)
	case "chan_pingpong":
		benchChanPingpong(a)
	case "park_pingpong":
		benchParkPingpong(a)
	case "wake_latency":
		benchWakeLatency(a)
	case "mpmc":
		benchMpmc(a)
	case "mutex":
		benchMutex(a)
	case "timers":
		benchTimers(a)
	case "mem_parked":
		benchMemParked(a)
	case "mem_queued":
		benchMemQueued(a)
	case "echo_server":
		benchEchoServer(a)
	case "http_server":
		benchHTTPServer(a)
	default:
		usageExit(fmt.Sprintf("unknown benchmark %q", a.bench))
	}
}
