/*
 * zk_bench.c - Zokio's side of the perf suite (protocol in perf/bench.h).
 *
 *   switch        raw context switch: zk_jump_fcontext ping-pong between two
 *                 contexts (compare with Boost.Context and swapcontext)
 *   yield         fiber-level switch: two fibers alternating with zk_yield
 *                 (compare with Go's Gosched and Tokio's yield_now)
 *   spawn         spawn+run+join of empty fibers in batches of 1000
 *
 * Channel, lock, timer and memory benchmarks live in zk_bench_sync.c, the
 * I/O servers in zk_bench_io.c.
 * Benchmarks whose feature does not exist yet print NA.
 */
#include "config.h"
#include "bench.h"
#include "fcontext.h"
#include "zokio.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int zk_bench_io(const char *bench, int argc, char **argv); /* zk_bench_io.c */
int zk_bench_sync(const char *bench, int argc, char **argv); /* zk_bench_sync.c */

static int argc_g;
static char **argv_g;

static long arg(const char *key, long dflt)
{
	return bench_arg(argc_g, argv_g, key, dflt);
}

/* ---- switch --------------------------------------------------------------- */

static zk_fcontext_t other;

static void pong(zk_transfer_t t)
{
	for (;;)
		t = zk_jump_fcontext(t.fctx, NULL);
}

static int bench_switch(void)
{
	long n = arg("n", arg("quick", 0) ? 1000000 : 50000000);
	size_t size = 64 * 1024;
	char *stack = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (stack == MAP_FAILED)
		return 1;
	other = zk_make_fcontext(stack + size, size, pong);
	zk_transfer_t t = { other, NULL };
	for (long i = 0; i < 10000; i++) /* warm-up */
		t = zk_jump_fcontext(t.fctx, NULL);
	uint64_t t0 = bench_now_ns();
	for (long i = 0; i < n; i++)
		t = zk_jump_fcontext(t.fctx, NULL);
	uint64_t t1 = bench_now_ns();
	/* each iteration is two switches: there and back */
	bench_result("switch", "ns_per_switch", (double)(t1 - t0) / (2.0 * (double)n), "ns");
	return 0;
}

/* ---- yield ---------------------------------------------------------------- */

static long yield_n;

static void *yielder(void *arg)
{
	for (long i = 0; i < yield_n; i++)
		zk_yield();
	return NULL;
}

static void *yield_main(void *arg)
{
	zk_fiber_t *a, *b;
	zk_spawn(&a, yielder, NULL);
	zk_spawn(&b, yielder, NULL);
	uint64_t t0 = bench_now_ns();
	zk_join(a, NULL);
	zk_join(b, NULL);
	uint64_t t1 = bench_now_ns();
	bench_result("yield", "ns_per_switch", (double)(t1 - t0) / (2.0 * (double)yield_n), "ns");
	return NULL;
}

static zk_runtime_t *make_rt(int workers)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = workers;
	zk_runtime_t *rt;
	int rc = zk_runtime_create(&rt, &o);
	if (rc) {
		fprintf(stderr, "zk_runtime_create: %s\n", strerror(-rc));
		exit(1);
	}
	return rt;
}

static int run_main(int workers, zk_fiber_fn fn)
{
	zk_runtime_t *rt = make_rt(workers);
	zk_spawn_ex(rt, NULL, fn, NULL, NULL);
	int rc = zk_runtime_run(rt);
	if (getenv("ZK_BENCH_STATS")) {
		zk_worker_stats_t st[8];
		int n = zk_runtime_stats(rt, st, 8);
		for (int i = 0; i < n && i < 8; i++)
			fprintf(stderr, "# worker %d: run %llu steals %llu injector %llu parks %llu wakeups %llu\n", i,
				(unsigned long long)st[i].fibers_run, (unsigned long long)st[i].steals,
				(unsigned long long)st[i].injector_pops, (unsigned long long)st[i].parks,
				(unsigned long long)st[i].wakeups);
	}
	zk_runtime_destroy(rt);
	return rc ? 1 : 0;
}

static int bench_yield(void)
{
	yield_n = arg("n", arg("quick", 0) ? 1000000 : 10000000);
	return run_main(1, yield_main);
}

/* ---- spawn ---------------------------------------------------------------- */

static long spawn_n;

static void *empty(void *arg)
{
	return arg;
}

static void *spawn_main(void *arg)
{
	enum { BATCH = 1000 };
	static zk_fiber_t *f[BATCH];
	/* warm-up: fill the stack pool and record slabs */
	for (int i = 0; i < BATCH; i++)
		zk_spawn(&f[i], empty, NULL);
	for (int i = 0; i < BATCH; i++)
		zk_join(f[i], NULL);
	uint64_t t0 = bench_now_ns();
	for (long done = 0; done < spawn_n; done += BATCH) {
		for (int i = 0; i < BATCH; i++)
			if (zk_spawn(&f[i], empty, NULL) != 0)
				abort();
		for (int i = 0; i < BATCH; i++)
			zk_join(f[i], NULL);
	}
	uint64_t t1 = bench_now_ns();
	bench_result("spawn", "tasks_per_sec", (double)spawn_n * 1e9 / (double)(t1 - t0), "tasks/s");
	return NULL;
}

static int bench_spawn(void)
{
	spawn_n = arg("n", arg("quick", 0) ? 200000 : 5000000);
	return run_main((int)arg("workers", 1), spawn_main);
}

int main(int argc, char **argv)
{
	argc_g = argc;
	argv_g = argv;
	if (argc < 2) {
		fprintf(stderr, "usage: %s <benchmark> [key=value ...]\n", argv[0]);
		return 2;
	}
	const char *b = argv[1];
	if (!strcmp(b, "switch"))
		return bench_switch();
	if (!strcmp(b, "yield"))
		return bench_yield();
	if (!strcmp(b, "spawn"))
		return bench_spawn();
	int io = zk_bench_io(b, argc, argv);
	if (io >= 0)
		return io;
	int sync = zk_bench_sync(b, argc, argv);
	if (sync >= 0)
		return sync;
	fprintf(stderr, "%s: unknown benchmark '%s'\n", argv[0], b);
	return 2;
}
