//! Tokio peer program for the Zokio perf harness.
//!
//! Usage: tokiobench <benchmark> [key=value ...]
//!
//! Prints `RESULT <benchmark> <metric> <value> <unit>` lines on stdout and
//! exits 0; diagnostics go to stderr. Unknown benchmark or malformed argument:
//! message on stderr, exit 2. The exact shape of every benchmark is described
//! next to its function and in perf/peers/README.md; the Go peer
//! (perf/peers/go) and the Zokio side do the same work.
//!
//! Runtime choice: `workers=1` builds a current_thread runtime, `workers>=2` a
//! multi_thread runtime with that many worker threads. Drivers (I/O, timers)
//! are enabled only where the benchmark needs them, which is Tokio's best
//! case; `enable_all=1` turns both on everywhere (what `#[tokio::main]` does).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::future::Future;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::{Builder, Runtime};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Mutex as AsyncMutex, Notify};
use tokio::task::yield_now;

const BENCHMARKS: &[&str] = &[
    "switch",
    "spawn",
    "chan_pingpong",
    "park_pingpong",
    "wake_latency",
    "mpmc",
    "mutex",
    "timers",
    "mem_parked",
    "mem_queued",
    "echo_server",
    "http_server",
];

// ---------------------------------------------------------------------------
// Arguments and output

struct Args {
    bench: String,
    kv: HashMap<String, String>,
    quick: bool,
}

fn usage_exit(msg: &str) -> ! {
    eprintln!("tokiobench: {msg}");
    eprintln!("usage: tokiobench <benchmark> [key=value ...]");
    eprintln!("benchmarks: {}", BENCHMARKS.join(" "));
    exit(2);
}

impl Args {
    fn parse() -> Args {
        let mut it = std::env::args().skip(1);
        let bench = match it.next() {
            Some(b) => b,
            None => usage_exit("missing benchmark name"),
        };
        let mut kv = HashMap::new();
        for arg in it {
            match arg.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    kv.insert(k.to_string(), v.to_string());
                }
                _ => usage_exit(&format!("malformed argument {arg:?} (want key=value)")),
            }
        }
        let quick = matches!(kv.get("quick").map(String::as_str), Some("1") | Some("true") | Some("yes"));
        Args { bench, kv, quick }
    }

    /// Integer option; `full` is the default for a normal run, `quick` for quick=1.
    fn num(&self, key: &str, full: u64, quick: u64) -> u64 {
        match self.kv.get(key) {
            Some(v) => v
                .replace('_', "")
                .parse::<u64>()
                .unwrap_or_else(|_| usage_exit(&format!("{key}={v} is not a non-negative integer"))),
            None => {
                if self.quick {
                    quick
                } else {
                    full
                }
            }
        }
    }

    fn workers(&self, default: u64) -> usize {
        let w = self.num("workers", default, default);
        if w == 0 {
            usage_exit("workers must be >= 1");
        }
        w as usize
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.kv.get(key).map(String::as_str), Some("1") | Some("true") | Some("yes"))
    }
}

fn result(bench: &str, metric: &str, value: f64, unit: &str) {
    let v = if value.abs() >= 1000.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "RESULT {bench} {metric} {v} {unit}");
    let _ = out.flush();
}

fn ready() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
}

/// workers=1: current_thread; workers>=2: multi_thread with that many workers.
fn runtime(a: &Args, workers: usize, io: bool, time: bool) -> Runtime {
    let mut b = if workers <= 1 {
        Builder::new_current_thread()
    } else {
        let mut b = Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let all = a.flag("enable_all");
    if io || all {
        b.enable_io();
    }
    if time || all {
        b.enable_time();
    }
    b.build().unwrap_or_else(|e| {
        eprintln!("tokiobench: cannot build runtime: {e}");
        exit(1)
    })
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Nearest-rank percentile of a sorted slice: element ceil(p/100*N)-1.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Resident set size in bytes (second field of /proc/self/statm, in pages).
fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(1) as u64
}

/// splitmix64 of (i+1): the shared pseudo-random sequence for the timers
/// benchmark, identical in every peer.
fn splitmix64(i: u64) -> u64 {
    let mut z = (i.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sleep duration of timer task i, in microseconds: uniform-ish in [1000, 100000].
fn timer_us(i: u64) -> u64 {
    1000 + splitmix64(i) % 99_001
}

/// Busy-wait on the calling thread (used by the waker in wake_latency).
fn spin_for(d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

// ---------------------------------------------------------------------------
// switch: two tasks on a current_thread runtime alternate with yield_now.
// Each task yields n times; switches = 2n (total yield_now calls);
// ns_per_switch = elapsed / 2n. A warm-up run of n/10 precedes the timed run.
// `workers` is ignored: the ping-pong is defined on one worker.

async fn switch_run(n: u64) -> Duration {
    let t0 = Instant::now();
    let a = tokio::spawn(async move {
        for _ in 0..n {
            yield_now().await;
        }
    });
    let b = tokio::spawn(async move {
        for _ in 0..n {
            yield_now().await;
        }
    });
    a.await.unwrap();
    b.await.unwrap();
    t0.elapsed()
}

fn bench_switch(a: &Args) {
    let n = a.num("n", 1_000_000, 200_000).max(1);
    let rt = runtime(a, 1, false, false);
    let el = rt.block_on(async move {
        switch_run(n / 10 + 1).await;
        switch_run(n).await
    });
    result("switch", "ns_per_switch", ns(el) / (2 * n) as f64, "ns");
}

// ---------------------------------------------------------------------------
// spawn: spawn+run+join of empty tasks. The spawner is itself a task on the
// runtime (so it spawns from a worker, as a fiber would). It spawns a batch of
// `batch` (default 1000) empty tasks, keeping their JoinHandles, then awaits
// every handle in spawn order; repeats until n tasks have been joined.
// tasks_per_sec = n / elapsed. Warm-up: one run of n/10 first.

async fn spawn_run(n: u64, batch: usize) -> Duration {
    let mut handles = Vec::with_capacity(batch);
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(batch as u64);
        for _ in 0..k {
            handles.push(tokio::spawn(async {}));
        }
        for h in handles.drain(..) {
            h.await.unwrap();
        }
        left -= k;
    }
    t0.elapsed()
}

fn bench_spawn(a: &Args) {
    let workers = a.workers(1);
    let n = a.num("n", 1_000_000, 100_000).max(1);
    let batch = a.num("batch", 1000, 1000).max(1) as usize;
    let rt = runtime(a, workers, false, false);
    let el = rt.block_on(async move {
        tokio::spawn(async move {
            spawn_run(n / 10 + 1, batch).await;
            spawn_run(n, batch).await
        })
        .await
        .unwrap()
    });
    result("spawn", "tasks_per_sec", n as f64 / el.as_secs_f64(), "tasks/s");
}

// ---------------------------------------------------------------------------
// chan_pingpong: tasks "ping" and "pong" bounce a u64 over two
// tokio::sync::mpsc channels of capacity 1. One round trip = ping sends on c1,
// pong receives it and sends it back on c2, ping receives it. n round trips
// after n/10 warm-up ones; ns_per_roundtrip = elapsed / n. Placement of the
// two tasks on workers is left to the scheduler (Tokio cannot pin a task);
// pinned=1 runs each task on a current_thread runtime of its own thread
// instead, so every message crosses between threads.

async fn chan_rounds(tx: &mpsc::Sender<u64>, rx: &mut mpsc::Receiver<u64>, k: u64) {
    for i in 0..k {
        tx.send(i).await.unwrap();
        let v = rx.recv().await.unwrap();
        assert_eq!(v, i);
    }
}

fn chan_pair(n: u64) -> (impl Future<Output = Duration>, impl Future<Output = ()>) {
    let (tx1, mut rx1) = mpsc::channel::<u64>(1);
    let (tx2, mut rx2) = mpsc::channel::<u64>(1);
    let pong = async move {
        while let Some(v) = rx1.recv().await {
            if tx2.send(v).await.is_err() {
                break;
            }
        }
    };
    let ping = async move {
        chan_rounds(&tx1, &mut rx2, n / 10 + 1).await;
        let t0 = Instant::now();
        chan_rounds(&tx1, &mut rx2, n).await;
        t0.elapsed()
    };
    (ping, pong)
}

/// Run ping and pong as two tasks of a runtime with `workers` workers, or
/// (pinned=1) each on a current_thread runtime of its own OS thread - the
/// way to keep two Tokio tasks on different threads. Returns ping's output.
fn run_pair<A, B>(a: &Args, workers: usize, ping: A, pong: B) -> Duration
where
    A: Future<Output = Duration> + Send + 'static,
    B: Future<Output = ()> + Send + 'static,
{
    if a.flag("pinned") {
        let one = || runtime(a, 1, false, false);
        let (ra, rb) = (one(), one());
        let tb = std::thread::spawn(move || rb.block_on(pong));
        let ta = std::thread::spawn(move || ra.block_on(ping));
        let el = ta.join().unwrap();
        tb.join().unwrap();
        return el;
    }
    let rt = runtime(a, workers, false, false);
    rt.block_on(async move {
        let b = tokio::spawn(pong);
        let el = tokio::spawn(ping).await.unwrap();
        b.await.unwrap();
        el
    })
}

/// A two-task round-trip benchmark: `pair(n)` builds ping (warm-up, then n
/// timed round trips; returns their time) and pong; ns_per_roundtrip.
fn pair_bench<A, B>(a: &Args, name: &str, pair: fn(u64) -> (A, B))
where
    A: Future<Output = Duration> + Send + 'static,
    B: Future<Output = ()> + Send + 'static,
{
    let workers = a.workers(1);
    let n = a.num("n", 1_000_000, 100_000).max(1);
    let (ping, pong) = pair(n);
    let el = run_pair(a, workers, ping, pong);
    result(name, "ns_per_roundtrip", ns(el) / n as f64, "ns");
}

fn bench_chan_pingpong(a: &Args) {
    pair_bench(a, "chan_pingpong", chan_pair);
}

// ---------------------------------------------------------------------------
// park_pingpong: the same round trip without channels, on two
// tokio::sync::Notify (notify_one leaves a permit when no task waits, as
// unpark does). Ping notifies a and waits on b; pong waits on a and
// notifies b. Placement as for chan_pingpong (pinned=1: two threads).

fn park_pair(n: u64) -> (impl Future<Output = Duration>, impl Future<Output = ()>) {
    let (a, b) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (a2, b2) = (a.clone(), b.clone());
    let warm = n / 10 + 1;
    let pong = async move {
        for _ in 0..warm + n {
            a2.notified().await;
            b2.notify_one();
        }
    };
    let ping = async move {
        for _ in 0..warm {
            a.notify_one();
            b.notified().await;
        }
        let t0 = Instant::now();
        for _ in 0..n {
            a.notify_one();
            b.notified().await;
        }
        t0.elapsed()
    };
    (ping, pong)
}

fn bench_park_pingpong(a: &Args) {
    pair_bench(a, "park_pingpong", park_pair);
}

// ---------------------------------------------------------------------------
// mpmc: `producers` tasks (default 4) send n values in all (default
// 2,000,000) through one channel of capacity `cap` (default 128) to
// `consumers` tasks (default 4); the channel closes when the last producer
// drops its sender. Tokio has no multi-consumer channel: the consumers share
// the mpsc receiver behind a tokio::sync::Mutex (the usual pattern).
// msgs_per_sec = n / (time until every consumer has seen the close). Every
// value is checked to arrive once (by sum and count).

fn bench_mpmc(a: &Args) {
    let workers = a.workers(2);
    let producers = a.num("producers", 4, 4).max(1);
    let consumers = a.num("consumers", 4, 4).max(1);
    let cap = a.num("cap", 128, 128).max(1) as usize;
    let n = a.num("n", 2_000_000, 200_000).max(1);
    let per = (n / producers).max(1);
    let rt = runtime(a, workers, false, false);
    let (el, sum, count) = rt.block_on(async move {
        let (tx, rx) = mpsc::channel::<u64>(cap);
        let rx = Arc::new(AsyncMutex::new(rx));
        let t0 = Instant::now();
        let mut cs = Vec::new();
        for _ in 0..consumers {
            let rx = rx.clone();
            cs.push(tokio::spawn(async move {
                let (mut s, mut k) = (0u64, 0u64);
                loop {
                    let v = rx.lock().await.recv().await;
                    match v {
                        Some(v) => {
                            s += v;
                            k += 1;
                        }
                        None => break,
                    }
                }
                (s, k)
            }));
        }
        for _ in 0..producers {
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 1..=per {
                    tx.send(i).await.unwrap();
                }
            });
        }
        drop(tx);
        let (mut s, mut k) = (0u64, 0u64);
        for c in cs {
            let (cs_, ck) = c.await.unwrap();
            s += cs_;
            k += ck;
        }
        (t0.elapsed(), s, k)
    });
    let total = per * producers;
    if count != total || sum != producers * (per * (per + 1) / 2) {
        eprintln!("tokiobench: mpmc: {count} values (sum {sum}), want {total}");
        exit(1);
    }
    result("mpmc", "msgs_per_sec", total as f64 / el.as_secs_f64(), "msgs/s");
}

// ---------------------------------------------------------------------------
// wake_latency: cross-thread wake of a parked task.
// Sleeper B is a runtime task parked on a tokio::sync::Notify. Waker A never
// parks: it busy-waits on its own CPU. Each iteration A waits until B has
// acknowledged the previous wake, busy-waits `gap_us` (default 20 us) so B is
// surely parked again and its worker idle, records t0, and calls
// notify_one(); B records t1 as soon as it runs and acknowledges. Sample =
// t1 - t0 (CLOCK_MONOTONIC via Instant). n samples (default 20000, quick
// 5000) after n/10 discarded warm-up iterations; p50 and p99 by nearest rank.
// Tokio has no way to pin a task to a worker, and a wake issued from inside a
// worker goes to that worker's LIFO slot (it would run on the waker's thread),
// so A is a plain OS thread outside the runtime: the wake must cross threads
// and unpark an idle worker, the same situation as a waker spinning on
// worker 0 and a sleeper parked on idle worker 1.

struct WakeShared {
    notify: Notify,
    t0_ns: AtomicU64,
    acks: AtomicU64,
    stop: AtomicBool,
}

fn bench_wake_latency(a: &Args) {
    let workers = a.workers(2);
    let n = a.num("n", 20_000, 5_000).max(1);
    let gap = Duration::from_micros(a.num("gap_us", 20, 20));
    let warm = n / 10;
    let total = n + warm;
    let rt = runtime(a, workers, false, false);
    let base = Instant::now();
    let sh = Arc::new(WakeShared {
        notify: Notify::new(),
        t0_ns: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

    let shb = sh.clone();
    let sleeper = rt.spawn(async move {
        let mut samples = Vec::with_capacity(total as usize);
        shb.acks.fetch_add(1, Ordering::Release);
        loop {
            shb.notify.notified().await;
            let t1 = base.elapsed().as_nanos() as u64;
            if shb.stop.load(Ordering::Acquire) {
                break;
            }
            let t0 = shb.t0_ns.load(Ordering::Acquire);
            samples.push(t1.saturating_sub(t0));
            shb.acks.fetch_add(1, Ordering::Release);
        }
        samples
    });

    let sha = sh.clone();
    let waker = std::thread::spawn(move || {
        let limit = Instant::now() + Duration::from_secs(60);
        for i in 0..total {
            while sha.acks.load(Ordering::Acquire) < i + 1 {
                std::hint::spin_loop();
                if Instant::now() > limit {
                    eprintln!("tokiobench: wake_latency: sleeper stalled at iteration {i}");
                    exit(1);
                }
            }
            spin_for(gap);
            sha.t0_ns.store(base.elapsed().as_nanos() as u64, Ordering::Release);
            sha.notify.notify_one();
        }
        while sha.acks.load(Ordering::Acquire) < total + 1 {
            std::hint::spin_loop();
        }
        sha.stop.store(true, Ordering::Release);
        sha.notify.notify_one();
    });

    let mut samples = rt.block_on(sleeper).unwrap();
    waker.join().unwrap();
    let mut s = samples.split_off(warm as usize);
    s.sort_unstable();
    result("wake_latency", "p50_ns", percentile(&s, 50.0) as f64, "ns");
    result("wake_latency", "p99_ns", percentile(&s, 99.0) as f64, "ns");
}

// ---------------------------------------------------------------------------
// mutex: `tasks` tasks (default 1000) each do n/tasks iterations of
// { lock tokio::sync::Mutex; counter += 1; unlock }, all spawned at once from
// a driver task, which then joins them. n = total ops (default 1000000, quick
// 100000). ops_per_sec = (n rounded down to a multiple of tasks) / elapsed,
// elapsed from before the first spawn to the last join. workers default 2.

fn bench_mutex(a: &Args) {
    let workers = a.workers(2);
    let tasks = a.num("tasks", 1000, 1000).max(1);
    let n = a.num("n", 1_000_000, 100_000).max(tasks);
    let per = n / tasks;
    let total = per * tasks;
    let rt = runtime(a, workers, false, false);
    let (el, count) = rt.block_on(async move {
        tokio::spawn(async move {
            let m = Arc::new(AsyncMutex::new(0u64));
            let mut hs = Vec::with_capacity(tasks as usize);
            let t0 = Instant::now();
            for _ in 0..tasks {
                let m = m.clone();
                hs.push(tokio::spawn(async move {
                    for _ in 0..per {
                        *m.lock().await += 1;
                    }
                }));
            }
            for h in hs {
                h.await.unwrap();
            }
            let el = t0.elapsed();
            let c = *m.lock().await;
            (el, c)
        })
        .await
        .unwrap()
    });
    if count != total {
        eprintln!("tokiobench: mutex: counter {count} != {total}");
        exit(1);
    }
    result("mutex", "ops_per_sec", total as f64 / el.as_secs_f64(), "ops/s");
}

// ---------------------------------------------------------------------------
// timers: n tasks (default 100000, quick 10000) spawned by a driver task.
// Task i, when it first runs, takes start_i = now and sleeps until
// deadline_i = start_i + timer_us(i) microseconds (splitmix64 sequence, range
// [1 ms, 100 ms]); on waking it records woke_i = now.
//   overshoot_i        = woke_i - deadline_i
//   overshoot_p99_us   = nearest-rank p99 of overshoot_i, in microseconds
//   timer_ops_per_sec  = n / (max_i woke_i - T0), T0 = before the first spawn
// (so it is n divided by the wall time to spawn all timers and have all of
// them fire; with 100 ms max sleeps it is dominated by the sleep itself).

fn bench_timers(a: &Args) {
    let workers = a.workers(1);
    let n = a.num("n", 100_000, 10_000).max(1);
    let rt = runtime(a, workers, false, true);
    let (wall, mut over) = rt.block_on(async move {
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut hs = Vec::with_capacity(n as usize);
            for i in 0..n {
                let d = Duration::from_micros(timer_us(i));
                hs.push(tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + d;
                    tokio::time::sleep_until(deadline).await;
                    let woke = tokio::time::Instant::now();
                    (woke.into_std(), woke.duration_since(deadline))
                }));
            }
            let mut last = t0;
            let mut over = Vec::with_capacity(n as usize);
            for h in hs {
                let (woke, o) = h.await.unwrap();
                if woke > last {
                    last = woke;
                }
                over.push(o.as_nanos() as u64);
            }
            (last - t0, over)
        })
        .await
        .unwrap()
    });
    over.sort_unstable();
    result("timers", "timer_ops_per_sec", n as f64 / wall.as_secs_f64(), "ops/s");
    result("timers", "overshoot_p99_us", percentile(&over, 99.0) as f64 / 1000.0, "us");
    eprintln!(
        "# timers: wall {:.1} ms, overshoot p50 {:.1} us, max {:.1} us",
        wall.as_secs_f64() * 1e3,
        percentile(&over, 50.0) as f64 / 1000.0,
        *over.last().unwrap_or(&0) as f64 / 1000.0
    );
}

// ---------------------------------------------------------------------------
// mem_parked: RSS per parked task. A driver task spawns n tasks (default
// 100000, quick 10000) in batches of 1000; each task parks on a shared
// tokio::sync::Notify (notified().await). After each batch the driver yields
// until every task spawned so far is parked, so the run queue never holds
// more than one batch. bytes_per_task = (RSS after all n are parked - RSS
// before the first spawn) / n, RSS from /proc/self/statm. Then
// notify_waiters() releases them all and the driver waits until all finished.
// JoinHandles are dropped at once (no per-task handle kept). A warm-up round
// of 1000 tasks runs first so the runtime's own allocations are settled.

async fn park_round(n: u64, measure: bool) -> Option<(u64, u64)> {
    let notify = Arc::new(Notify::new());
    let parked = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let before = rss_bytes();
    let mut spawned = 0u64;
    while spawned < n {
        let k = (n - spawned).min(1000);
        for _ in 0..k {
            let nf = notify.clone();
            let p = parked.clone();
            let f = finished.clone();
            tokio::spawn(async move {
                let wait = nf.notified();
                p.fetch_add(1, Ordering::AcqRel);
                wait.await;
                f.fetch_add(1, Ordering::AcqRel);
            });
        }
        spawned += k;
        while (parked.load(Ordering::Acquire) as u64) < spawned {
            yield_now().await;
        }
    }
    // A task counts itself parked just before its first await on the Notify;
    // one more yield lets the last ones actually reach it.
    yield_now().await;
    let after = rss_bytes();
    notify.notify_waiters();
    while (finished.load(Ordering::Acquire) as u64) < n {
        yield_now().await;
    }
    if measure {
        Some((before, after))
    } else {
        None
    }
}

fn bench_mem_parked(a: &Args) {
    let workers = a.workers(1);
    let n = a.num("n", 100_000, 10_000).max(1);
    let rt = runtime(a, workers, false, false);
    let (before, after) = rt.block_on(async move {
        tokio::spawn(async move {
            park_round(1000, false).await;
            park_round(n, true).await.unwrap()
        })
        .await
        .unwrap()
    });
    eprintln!("# mem_parked: n={n} rss before {before} after {after}");
    result(
        "mem_parked",
        "bytes_per_task",
        after.saturating_sub(before) as f64 / n as f64,
        "bytes",
    );
}

// ---------------------------------------------------------------------------
// mem_queued: RSS per spawned-but-not-yet-run task. On a current_thread
// runtime (always; `workers` is ignored) the block_on future spawns n tasks
// (default 1000000, quick 100000) without yielding, so none of them runs;
// each task's body only increments a shared counter. bytes_per_task =
// (RSS after the n-th spawn - RSS before the first) / n; the count of tasks
// that had run at that point is checked to be 0. Then the block_on future
// yields until all n have run. JoinHandles are dropped at once.

fn bench_mem_queued(a: &Args) {
    let n = a.num("n", 1_000_000, 100_000).max(1);
    let rt = runtime(a, 1, false, false);
    let (before, after, ran) = rt.block_on(async move {
        let count = Arc::new(AtomicUsize::new(0));
        let before = rss_bytes();
        for _ in 0..n {
            let c = count.clone();
            tokio::spawn(async move {
                c.fetch_add(1, Ordering::Relaxed);
            });
        }
        let after = rss_bytes();
        let ran = count.load(Ordering::Relaxed);
        while (count.load(Ordering::Relaxed) as u64) < n {
            yield_now().await;
        }
        (before, after, ran)
    });
    eprintln!("# mem_queued: n={n} rss before {before} after {after}; tasks run before measuring: {ran}");
    result(
        "mem_queued",
        "bytes_per_task",
        after.saturating_sub(before) as f64 / n as f64,
        "bytes",
    );
}

// ---------------------------------------------------------------------------
// Servers: listen on 127.0.0.1:port (port=0 picks one, reported on stderr),
// print READY once listening, run until SIGTERM or SIGINT, then exit 0.
// Accepted sockets get TCP_NODELAY (Go does that by default). Like Go 1.19,
// the soft RLIMIT_NOFILE is raised to the hard limit first.

fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers at once (before READY is printed)
/// and returns a future that completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
}

// echo_server: one task per connection; loop { read up to 4096 bytes; write
// all of them back } until EOF or error.
async fn echo_conn(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        let k = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(k) => k,
        };
        if s.write_all(&buf[..k]).await.is_err() {
            return;
        }
    }
}

fn bench_echo_server(a: &Args) {
    let workers = a.workers(1);
    let port = a.num("port", 0, 0) as u16;
    raise_nofile();
    let rt = runtime(a, workers, true, true);
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap_or_else(|e| {
            eprintln!("tokiobench: echo_server: bind 127.0.0.1:{port}: {e}");
            exit(1)
        });
        eprintln!("# echo_server listening on {}", listener.local_addr().unwrap());
        let stop = shutdown_signal();
        tokio::pin!(stop);
        ready();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        tokio::spawn(echo_conn(s));
                    }
                    Err(e) => {
                        eprintln!("tokiobench: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                },
            }
        }
    });
    rt.shutdown_timeout(Duration::from_millis(100));
}

// http_server: hyper 0.14 HTTP/1.1 server (keep-alive on, TCP_NODELAY)
// answering every request with 200, `Content-Type: text/plain`, body
// "Hello, World!" (hyper adds Content-Length and Date).
async fn hello(
    _req: hyper::Request<hyper::Body>,
) -> Result<hyper::Response<hyper::Body>, Infallible> {
    let mut r = hyper::Response::new(hyper::Body::from("Hello, World!"));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    Ok(r)
}

fn bench_http_server(a: &Args) {
    use hyper::service::{make_service_fn, service_fn};
    let workers = a.workers(1);
    let port = a.num("port", 0, 0) as u16;
    raise_nofile();
    let rt = runtime(a, workers, true, true);
    rt.block_on(async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let builder = hyper::Server::try_bind(&addr).unwrap_or_else(|e| {
            eprintln!("tokiobench: http_server: bind {addr}: {e}");
            exit(1)
        });
        let server = builder
            .tcp_nodelay(true)
            .http1_keepalive(true)
            .serve(make_service_fn(|_conn| async {
                Ok::<_, Infallible>(service_fn(hello))
            }));
        eprintln!("# http_server listening on {}", server.local_addr());
        let stop = shutdown_signal();
        tokio::pin!(stop);
        ready();
        tokio::select! {
            _ = &mut stop => {},
            r = server => {
                if let Err(e) = r {
                    eprintln!("tokiobench: http_server: {e}");
                    exit(1);
                }
            }
        }
    });
    rt.shutdown_timeout(Duration::from_millis(100));
}

// ---------------------------------------------------------------------------

fn main() {
    let a = Args::parse();
    match a.bench.as_str() {
        "switch" => bench_switch(&a),
        "spawn" => bench_spawn(&a),
        "chan_pingpong" => bench_chan_pingpong(&a),
        "park_pingpong" => bench_park_pingpong(&a),
        "wake_latency" => bench_wake_latency(&a),
        "mpmc" => bench_mpmc(&a),
        "mutex" => bench_mutex(&a),
        "timers" => bench_timers(&a),
        "mem_parked" => bench_mem_parked(&a),
        "mem_queued" => bench_mem_queued(&a),
        "echo_server" => bench_echo_server(&a),
        "http_server" => bench_http_server(&a),
        other => usage_exit(&format!("unknown benchmark {other:?}")),
    }
}
