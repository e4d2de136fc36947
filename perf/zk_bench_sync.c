/*
 * zk_bench_sync.c - Zokio's side of the task benchmarks that need channels,
 * locks and timers (protocol in perf/bench.h; shapes as in
 * perf/peers/go/main.go, which the Tokio peer follows too):
 *
 *   chan_pingpong  two fibers bounce a uint64 over two rendezvous channels;
 *                  ns_per_roundtrip.  Placement is the scheduler's (as for
 *                  Go and Tokio); pinned=1 pins the two fibers to different
 *                  workers, so every message crosses between threads.
 *   park_pingpong  the same round trip without channels: a shared counter
 *                  and zk_park / zk_unpark; same placement rules.
 *   wake_latency   a busy-waiting waker on one worker sends to a fiber
 *                  parked on a channel (capacity 1) pinned to the other;
 *                  p50_ns / p99_ns from send to the sleeper running.
 *   mpmc           4 producers and 4 consumers share one channel (capacity
 *                  128); msgs_per_sec, every value checked to arrive once.
 *   mutex          `tasks` fibers (default 1000) share n lock/increment/
 *                  unlock operations on one zk_mutex_t; ops_per_sec.
 *   timers         n fibers (default 100000) each sleep timerUs(i) µs
 *                  (splitmix64 sequence, 1..100 ms); timer_ops_per_sec =
 *                  n / (last wake - start), overshoot_p99_us.
 *   mem_parked     RSS per fiber parked on a channel receive (n=100000).
 *   mem_queued     RSS per spawned-but-not-yet-run fiber (n=1000000).
 *
 * Entry point: zk_bench_sync(bench, argc, argv), called by zk_bench.c's
 * main; returns -1 for a benchmark it does not know, else the exit code.
 */
#include "config.h"
#include "bench.h"
#include "zokio.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int zk_bench_sync(const char *bench, int argc, char **argv);

static int s_argc;
static char **s_argv;

static long arg(const char *key, long full, long quick)
{
	return bench_arg(s_argc, s_argv, key, bench_arg(s_argc, s_argv, "quick", 0) ? quick : full);
}

static void die(const char *what, int rc)
{
	fprintf(stderr, "zk_bench: %s: %s\n", what, strerror(-rc));
	exit(1);
}

static int run_main(int workers, zk_fiber_fn fn, void *a)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = workers;
	zk_runtime_t *rt;
	int rc = zk_runtime_create(&rt, &o);
	if (rc)
		die("zk_runtime_create", rc);
	if ((rc = zk_spawn_ex(rt, NULL, fn, a, NULL)))
		die("zk_spawn_ex", rc);
	rc = zk_runtime_run(rt);
	zk_runtime_destroy(rt);
	return rc ? 1 : 0;
}

/* ---- placement: one pinned fiber per worker --------------------------------
 *
 * zk_spawn_on starts a fiber on a given worker and keeps it there. */

/* Spawn fn(arg) pinned to a worker other than `avoid` (-1: any); returns
 * its handle, and in *where the worker it runs on. */
static zk_fiber_t *spawn_placed(zk_fiber_fn fn, void *arg, int avoid, int *where)
{
	int n = zk_runtime_stats(zk_runtime_current(), NULL, 0);
	int target = avoid < 0 ? (n > 1 ? 1 : 0) : (avoid + 1) % n;
	zk_spawn_opts_t so = { "placed", 1 };
	zk_fiber_t *f;
	int rc = zk_spawn_on(NULL, target, &f, fn, arg, &so);
	if (rc)
		die("zk_spawn_on", rc);
	*where = target;
	return f;
}

/* ---- chan_pingpong ------------------------------------------------------------ */

struct pingpong {
	zk_chan_t *c1, *c2;
	long n;
	int64_t elapsed;
};

static void *pong(void *a)
{
	struct pingpong *pp = a;
	uint64_t v;
	while (zk_chan_recv(pp->c1, &v) == 0)
		zk_chan_send(pp->c2, &v);
	return NULL;
}

static void ping_rounds(struct pingpong *pp, long n)
{
	for (long i = 0; i < n; i++) {
		uint64_t v = (uint64_t)i, w;
		zk_chan_send(pp->c1, &v);
		zk_chan_recv(pp->c2, &w);
		if (w != v) {
			fprintf(stderr, "zk_bench: chan_pingpong: wrong value\n");
			exit(1);
		}
	}
}

static void *ping(void *a)
{
	struct pingpong *pp = a;
	ping_rounds(pp, pp->n / 10 + 1); /* warm-up */
	int64_t t0 = zk_now_ns();
	ping_rounds(pp, pp->n);
	pp->elapsed = zk_now_ns() - t0;
	zk_chan_close(pp->c1);
	return NULL;
}

static int pp_workers, pp_pinned;

/* Start two fibers, a (which measures) and b, on one worker, placed by the
 * scheduler, or pinned to different workers (pp_pinned); wait for both.
 * b is joined first: it ends only after its last message to a. */
static void run_pair(zk_fiber_fn a_fn, zk_fiber_fn b_fn, void *arg)
{
	zk_fiber_t *a, *b;
	if (pp_pinned && pp_workers > 1) {
		int wb, wa;
		b = spawn_placed(b_fn, arg, -1, &wb);
		a = spawn_placed(a_fn, arg, wb, &wa);
	} else {
		int rc;
		if ((rc = zk_spawn(&b, b_fn, arg)) || (rc = zk_spawn(&a, a_fn, arg)))
			die("zk_spawn", rc);
	}
	zk_join(b, NULL);
	zk_join(a, NULL);
}

static void *pingpong_main(void *a)
{
	struct pingpong *pp = a;
	zk_chan_create(&pp->c1, sizeof(uint64_t), 0);
	zk_chan_create(&pp->c2, sizeof(uint64_t), 0);
	run_pair(ping, pong, pp);
	zk_chan_destroy(pp->c1);
	zk_chan_destroy(pp->c2);
	return NULL;
}

static void pair_args(long *n)
{
	pp_workers = (int)arg("workers", 1, 1);
	pp_pinned = (int)arg("pinned", 0, 0);
	*n = arg("n", 1000000, 100000);
	if (*n < 1)
		*n = 1;
}

static int bench_chan_pingpong(void)
{
	struct pingpong pp = { 0 };
	pair_args(&pp.n);
	int rc = run_main(pp_workers, pingpong_main, &pp);
	bench_result("chan_pingpong", "ns_per_roundtrip", (double)pp.elapsed / (double)pp.n, "ns");
	return rc;
}

/* ---- park_pingpong ----------------------------------------------------------- */

/* seq is the turn: ping makes it odd (pong's turn) and unparks pong, pong
 * makes it even and unparks ping.  PARK_STOP ends pong. */
#define PARK_STOP (-1L)

struct parkpong {
	_Atomic long seq;
	_Atomic(zk_fiber_t *) side[2]; /* ping, pong */
	_Atomic int ended;
	long n;
	int64_t elapsed;
};

static zk_fiber_t *park_meet(struct parkpong *pp, int me)
{
	atomic_store(&pp->side[me], zk_self());
	zk_fiber_t *other;
	while (!(other = atomic_load(&pp->side[1 - me])))
		zk_yield();
	return other;
}

static void park_until(struct parkpong *pp, long want)
{
	while (atomic_load_explicit(&pp->seq, memory_order_acquire) != want)
		zk_park();
}

/* Neither side ends, letting its handle go, while the other may still
 * unpark it. */
static void park_part(struct parkpong *pp)
{
	atomic_fetch_add(&pp->ended, 1);
	while (atomic_load(&pp->ended) < 2)
		zk_yield();
}

static void *park_pong(void *a)
{
	struct parkpong *pp = a;
	zk_fiber_t *ping = park_meet(pp, 1);
	for (;;) {
		long s;
		while (!((s = atomic_load_explicit(&pp->seq, memory_order_acquire)) & 1))
			zk_park();
		if (s == PARK_STOP)
			break;
		atomic_store_explicit(&pp->seq, s + 1, memory_order_release);
		zk_unpark(ping);
	}
	park_part(pp);
	return NULL;
}

static void park_rounds(struct parkpong *pp, zk_fiber_t *pong, long n)
{
	long s = atomic_load_explicit(&pp->seq, memory_order_relaxed);
	for (long i = 0; i < n; i++, s += 2) {
		atomic_store_explicit(&pp->seq, s + 1, memory_order_release);
		zk_unpark(pong);
		park_until(pp, s + 2);
	}
}

static void *park_ping(void *a)
{
	struct parkpong *pp = a;
	zk_fiber_t *pong = park_meet(pp, 0);
	park_rounds(pp, pong, pp->n / 10 + 1); /* warm-up */
	int64_t t0 = zk_now_ns();
	park_rounds(pp, pong, pp->n);
	pp->elapsed = zk_now_ns() - t0;
	atomic_store_explicit(&pp->seq, PARK_STOP, memory_order_release);
	zk_unpark(pong);
	park_part(pp);
	return NULL;
}

static void *parkpong_main(void *a)
{
	run_pair(park_ping, park_pong, a);
	return NULL;
}

static int bench_park_pingpong(void)
{
	struct parkpong pp = { 0 };
	pair_args(&pp.n);
	int rc = run_main(pp_workers, parkpong_main, &pp);
	bench_result("park_pingpong", "ns_per_roundtrip", (double)pp.elapsed / (double)pp.n, "ns");
	return rc;
}

/* ---- wake_latency --------------------------------------------------------------- */

struct wake {
	zk_chan_t *ch;
	long total, warm;
	_Atomic int64_t t0;
	_Atomic long acks;
	_Atomic int stop;
	uint64_t *samples;
	long nsamples;
	int64_t gap;
};

static void *wake_sleeper(void *a)
{
	struct wake *w = a;
	atomic_fetch_add(&w->acks, 1);
	for (;;) {
		char c;
		zk_chan_recv(w->ch, &c);
		int64_t t1 = zk_now_ns();
		if (atomic_load(&w->stop))
			break;
		w->samples[w->nsamples++] = (uint64_t)(t1 - atomic_load(&w->t0));
		atomic_fetch_add(&w->acks, 1);
	}
	return NULL;
}

static void spin_ns(int64_t ns)
{
	int64_t until = zk_now_ns() + ns;
	while (zk_now_ns() < until)
		;
}

static void *wake_waker(void *a)
{
	struct wake *w = a;
	int64_t limit = zk_now_ns() + 60 * (int64_t)1000000000;
	char c = 1;
	for (long i = 0; i < w->total; i++) {
		while (atomic_load(&w->acks) < i + 1) {
			if (zk_now_ns() > limit) {
				fprintf(stderr, "zk_bench: wake_latency: sleeper stalled at %ld\n", i);
				exit(1);
			}
		}
		spin_ns(w->gap);
		atomic_store(&w->t0, zk_now_ns());
		zk_chan_send(w->ch, &c);
	}
	while (atomic_load(&w->acks) < w->total + 1)
		;
	atomic_store(&w->stop, 1);
	zk_chan_send(w->ch, &c);
	return NULL;
}

static void *wake_main(void *a)
{
	struct wake *w = a;
	zk_chan_create(&w->ch, 1, 1);
	int ws, wk;
	zk_fiber_t *s = spawn_placed(wake_sleeper, w, -1, &ws);
	zk_fiber_t *k = spawn_placed(wake_waker, w, ws, &wk);
	zk_join(k, NULL);
	zk_join(s, NULL);
	zk_chan_destroy(w->ch);
	return NULL;
}

static int bench_wake_latency(void)
{
	int workers = (int)arg("workers", 2, 2);
	if (workers < 2) {
		bench_na("wake_latency", "needs workers>=2 (the waker spins on its own worker)");
		return 0;
	}
	static struct wake w;
	long n = arg("n", 20000, 5000);
	w.warm = n / 10;
	w.total = n + w.warm;
	w.gap = arg("gap_us", 20, 20) * 1000;
	w.samples = calloc((size_t)w.total, sizeof(uint64_t));
	int rc = run_main(workers, wake_main, &w);
	uint64_t *s = w.samples + w.warm;
	size_t m = (size_t)(w.nsamples - w.warm);
	qsort(s, m, sizeof(*s), bench_cmp_u64);
	bench_result("wake_latency", "p50_ns", bench_percentile(s, m, 50), "ns");
	bench_result("wake_latency", "p99_ns", bench_percentile(s, m, 99), "ns");
	free(w.samples);
	return rc;
}

/* ---- mutex ---------------------------------------------------------------------- */

static zk_mutex_t bench_mu = ZK_MUTEX_INIT;
static uint64_t bench_counter;
static long mutex_per;

static void *mutex_task(void *a)
{
	for (long i = 0; i < mutex_per; i++) {
		zk_mutex_lock(&bench_mu);
		bench_counter++;
		zk_mutex_unlock(&bench_mu);
	}
	return NULL;
}

static long mutex_tasks;
static int64_t mutex_elapsed;

/* Spawn n fibers - the first nfirst run first(arg), the rest rest(arg) -
 * join them all, and return the nanoseconds from the first spawn to the
 * last join. */
static int64_t spawn_join_all(long n, long nfirst, zk_fiber_fn first, zk_fiber_fn rest, void *arg)
{
	zk_fiber_t **f = calloc((size_t)n, sizeof(*f));
	if (!f)
		die("calloc", -ENOMEM);
	int64_t t0 = zk_now_ns();
	for (long i = 0; i < n; i++) {
		int rc = zk_spawn(&f[i], i < nfirst ? first : rest, arg);
		if (rc)
			die("zk_spawn", rc);
	}
	for (long i = 0; i < n; i++)
		zk_join(f[i], NULL);
	int64_t elapsed = zk_now_ns() - t0;
	free(f);
	return elapsed;
}

static void *mutex_main(void *a)
{
	mutex_elapsed = spawn_join_all(mutex_tasks, mutex_tasks, mutex_task, NULL, NULL);
	return NULL;
}

static int bench_mutex(void)
{
	int workers = (int)arg("workers", 2, 2);
	mutex_tasks = arg("tasks", 1000, 1000);
	if (mutex_tasks < 1)
		mutex_tasks = 1;
	long n = arg("n", 1000000, 100000);
	if (n < mutex_tasks)
		n = mutex_tasks;
	mutex_per = n / mutex_tasks;
	long total = mutex_per * mutex_tasks;
	int rc = run_main(workers, mutex_main, NULL);
	if (bench_counter != (uint64_t)total) {
		fprintf(stderr, "zk_bench: mutex: counter %llu != %ld\n",
			(unsigned long long)bench_counter, total);
		return 1;
	}
	bench_result("mutex", "ops_per_sec", (double)total * 1e9 / (double)mutex_elapsed, "ops/s");
	return rc;
}

/* ---- mpmc ---------------------------------------------------------------------
 *
 * `producers` fibers (default 4) send n values in all through one channel
 * of capacity `cap` (default 128) to `consumers` fibers (default 4); the
 * last producer to finish closes it.  msgs_per_sec = n / (time until every
 * consumer has seen the close).  Every value is checked to arrive once (by
 * sum and count). */

struct mpmc {
	zk_chan_t *ch;
	long per, producers;
	_Atomic long producing;
	_Atomic uint64_t sum, count;
};

static void *mpmc_producer(void *a)
{
	struct mpmc *m = a;
	for (long i = 1; i <= m->per; i++) {
		uint64_t v = (uint64_t)i;
		int rc = zk_chan_send(m->ch, &v);
		if (rc)
			die("zk_chan_send", rc);
	}
	if (atomic_fetch_sub(&m->producing, 1) == 1)
		zk_chan_close(m->ch);
	return NULL;
}

static void *mpmc_consumer(void *a)
{
	struct mpmc *m = a;
	uint64_t v, sum = 0, count = 0;
	int rc;
	while ((rc = zk_chan_recv(m->ch, &v)) == 0) {
		sum += v;
		count++;
	}
	if (rc != -EPIPE)
		die("zk_chan_recv", rc);
	atomic_fetch_add(&m->sum, sum);
	atomic_fetch_add(&m->count, count);
	return NULL;
}

static long mpmc_consumers;
static int64_t mpmc_elapsed;

static void *mpmc_main(void *a)
{
	struct mpmc *m = a;
	mpmc_elapsed = spawn_join_all(m->producers + mpmc_consumers, mpmc_consumers,
				      mpmc_consumer, mpmc_producer, m);
	return NULL;
}

static int bench_mpmc(void)
{
	struct mpmc m = { 0 };
	int workers = (int)arg("workers", 2, 2);
	m.producers = arg("producers", 4, 4);
	mpmc_consumers = arg("consumers", 4, 4);
	long cap = arg("cap", 128, 128);
	long n = arg("n", 2000000, 200000);
	if (m.producers < 1 || mpmc_consumers < 1 || cap < 0) {
		fprintf(stderr, "zk_bench: mpmc: need producers >= 1, consumers >= 1, cap >= 0\n");
		return 1;
	}
	m.per = n / m.producers > 0 ? n / m.producers : 1;
	atomic_store(&m.producing, m.producers);
	int rc = zk_chan_create(&m.ch, sizeof(uint64_t), (size_t)cap);
	if (rc)
		die("zk_chan_create", rc);
	rc = run_main(workers, mpmc_main, &m);
	zk_chan_destroy(m.ch);
	uint64_t total = (uint64_t)(m.per * m.producers);
	uint64_t want_sum = (uint64_t)m.producers * ((uint64_t)m.per * (uint64_t)(m.per + 1) / 2);
	if (atomic_load(&m.count) != total || atomic_load(&m.sum) != want_sum) {
		fprintf(stderr, "zk_bench: mpmc: %llu values (sum %llu), want %llu (sum %llu)\n",
			(unsigned long long)atomic_load(&m.count), (unsigned long long)atomic_load(&m.sum),
			(unsigned long long)total, (unsigned long long)want_sum);
		return 1;
	}
	bench_result("mpmc", "msgs_per_sec", (double)total * 1e9 / (double)mpmc_elapsed, "msgs/s");
	return rc;
}

/* ---- timers ---------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t i)
{
	uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static uint64_t timer_us(uint64_t i)
{
	return 1000 + splitmix64(i) % 99001;
}

static int64_t timers_t0;
static uint64_t *timers_over;
static int64_t *timers_woke;

static void *timer_task(void *a)
{
	uint64_t i = (uint64_t)(uintptr_t)a;
	int64_t d = (int64_t)timer_us(i) * 1000;
	int64_t start = zk_now_ns();
	zk_sleep_until(start + d);
	int64_t w = zk_now_ns();
	int64_t over = w - start - d;
	timers_over[i] = over > 0 ? (uint64_t)over : 0;
	timers_woke[i] = w - timers_t0;
	return NULL;
}

static long timers_n;

static void *timers_main(void *a)
{
	timers_t0 = zk_now_ns();
	for (long i = 0; i < timers_n; i++) {
		int rc = zk_spawn(NULL, timer_task, (void *)(uintptr_t)i);
		if (rc)
			die("zk_spawn", rc);
	}
	return NULL;
}

static int bench_timers(void)
{
	int workers = (int)arg("workers", 1, 1);
	timers_n = arg("n", 100000, 10000);
	if (timers_n < 1)
		timers_n = 1;
	timers_over = calloc((size_t)timers_n, sizeof(*timers_over));
	timers_woke = calloc((size_t)timers_n, sizeof(*timers_woke));
	int rc = run_main(workers, timers_main, NULL); /* returns when all woke */
	int64_t last = 0, started = 0;
	for (long i = 0; i < timers_n; i++) {
		if (timers_woke[i] > last)
			last = timers_woke[i];
		/* when the fiber went to sleep, relative to the start */
		int64_t s = timers_woke[i] - (int64_t)timers_over[i] - (int64_t)timer_us((uint64_t)i) * 1000;
		if (s > started)
			started = s;
	}
	qsort(timers_over, (size_t)timers_n, sizeof(uint64_t), bench_cmp_u64);
	bench_result("timers", "timer_ops_per_sec", (double)timers_n * 1e9 / (double)last, "ops/s");
	bench_result("timers", "overshoot_p99_us",
		     bench_percentile(timers_over, (size_t)timers_n, 99) / 1000.0, "us");
	fprintf(stderr, "# timers: wall %.1f ms, all asleep after %.1f ms, overshoot p50 %.1f us, max %.1f us\n",
		last / 1e6, started / 1e6,
		bench_percentile(timers_over, (size_t)timers_n, 50) / 1000.0,
		timers_over[timers_n - 1] / 1000.0);
	free(timers_over);
	free(timers_woke);
	return rc;
}

/* ---- mem_parked / mem_queued -------------------------------------------------- */

struct park_round {
	zk_chan_t *release;
	_Atomic long parked;
	long n;
	long before, after;
};

static void *parked_task(void *a)
{
	struct park_round *r = a;
	char c;
	atomic_fetch_add(&r->parked, 1);
	zk_chan_recv(r->release, &c); /* until closed */
	return NULL;
}

static void park_round(struct park_round *r)
{
	zk_chan_create(&r->release, 1, 0);
	atomic_store(&r->parked, 0);
	r->before = bench_rss_bytes();
	long spawned = 0;
	while (spawned < r->n) {
		long k = r->n - spawned < 1000 ? r->n - spawned : 1000;
		for (long i = 0; i < k; i++) {
			int rc = zk_spawn(NULL, parked_task, r);
			if (rc)
				die("zk_spawn", rc);
		}
		spawned += k;
		while (atomic_load(&r->parked) < spawned)
			zk_yield();
	}
	zk_yield(); /* the last ones from "counted" to parked */
	r->after = bench_rss_bytes();
	zk_chan_close(r->release);
}

static void *mem_parked_main(void *a)
{
	struct park_round *r = a;
	struct park_round warm = { 0 };
	warm.n = 1000;
	park_round(&warm);
	park_round(r);
	return NULL;
}

static int bench_mem_parked(void)
{
	int workers = (int)arg("workers", 1, 1);
	static struct park_round r;
	r.n = arg("n", 100000, 10000);
	if (r.n < 1)
		r.n = 1;
	int rc = run_main(workers, mem_parked_main, &r);
	fprintf(stderr, "# mem_parked: n=%ld rss before %ld after %ld\n", r.n, r.before, r.after);
	long d = r.after > r.before ? r.after - r.before : 0;
	bench_result("mem_parked", "bytes_per_task", (double)d / (double)r.n, "bytes");
	return rc;
}

static _Atomic long queued_ran;
static long queued_before, queued_after, queued_ran_early;

static void *queued_task(void *a)
{
	atomic_fetch_add_explicit(&queued_ran, 1, memory_order_relaxed);
	return NULL;
}

static void *mem_queued_main(void *a)
{
	long n = *(long *)a;
	queued_before = bench_rss_bytes();
	for (long i = 0; i < n; i++) {
		int rc = zk_spawn(NULL, queued_task, NULL);
		if (rc)
			die("zk_spawn", rc);
	}
	queued_after = bench_rss_bytes();
	queued_ran_early = atomic_load(&queued_ran);
	return NULL; /* the runtime runs them all before zk_runtime_run returns */
}

static int bench_mem_queued(void)
{
	long n = arg("n", 1000000, 100000);
	if (n < 1)
		n = 1;
	int rc = run_main(1, mem_queued_main, &n); /* one worker always: nothing runs early */
	fprintf(stderr, "# mem_queued: n=%ld rss before %ld after %ld; tasks run before measuring: %ld\n",
		n, queued_before, queued_after, queued_ran_early);
	long d = queued_after > queued_before ? queued_after - queued_before : 0;
	bench_result("mem_queued", "bytes_per_task", (double)d / (double)n, "bytes");
	return rc;
}

int zk_bench_sync(const char *bench, int argc, char **argv)
{
	s_argc = argc;
	s_argv = argv;
	if (!strcmp(bench, "chan_pingpong"))
		return bench_chan_pingpong();
	if (!strcmp(bench, "park_pingpong"))
		return bench_park_pingpong();
	if (!strcmp(bench, "wake_latency"))
		return bench_wake_latency();
	if (!strcmp(bench, "mpmc"))
		return bench_mpmc();
	if (!strcmp(bench, "mutex"))
		return bench_mutex();
	if (!strcmp(bench, "timers"))
		return bench_timers();
	if (!strcmp(bench, "mem_parked"))
		return bench_mem_parked();
	if (!strcmp(bench, "mem_queued"))
		return bench_mem_queued();
	return -1;
}
