/*
 * test_stack.c - fiber stacks: a guard-page hit and a canary hit are
 * reported on one line naming the fiber and its stack size and abort
 * (checked in forked children); the pool reuses stacks, respects its cache
 * bound and gives pages back past its high-water mark; running out of
 * address space makes spawn fail with a negative errno instead of crashing;
 * the default stack size is what zokio.h documents.
 */
#include <check.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "zokio.h"
#include "fiber.h"
#include "stack.h"

static size_t page_size(void)
{
	return (size_t)sysconf(_SC_PAGESIZE);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The usable size the pool gives a stack configured with `size` bytes. */
static size_t usable_for(size_t size, int canary)
{
	struct zk__stack_pool p;
	struct zk__stack_cache c = { 0 };
	struct zk__stack *s;
	ck_assert_int_eq(zk__stack_pool_init(&p, size, canary, 4, 4), 0);
	ck_assert_int_eq(zk__stack_get(&p, &c, &s), 0);
	size_t n = zk__stack_usable(s);
	zk__stack_put(&p, NULL, s);
	zk__stack_pool_destroy(&p);
	return n;
}

/* ---- overflow reports (forked children) -------------------------------- */

/* Run child() in a forked process with stderr going to a pipe; return its
 * wait status and what it wrote to stderr (at most 64 KiB, NUL-terminated). */
static int run_forked(void (*child)(void *), void *arg, char *out, size_t outsz, int timeout_s)
{
	int pfd[2];
	ck_assert_int_eq(pipe(pfd), 0);
	fflush(NULL);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(pfd[0]);
		dup2(pfd[1], 2);
		close(pfd[1]);
		alarm((unsigned)timeout_s); /* never hang the suite */
		child(arg);
		_exit(99); /* child() must not return */
	}
	close(pfd[1]);
	size_t len = 0;
	double deadline = now_s() + timeout_s + 5;
	for (;;) {
		struct pollfd pe = { .fd = pfd[0], .events = POLLIN };
		int ms = (int)((deadline - now_s()) * 1000);
		if (ms <= 0 || poll(&pe, 1, ms) <= 0)
			break;
		char buf[4096];
		ssize_t r = read(pfd[0], buf, sizeof(buf));
		if (r <= 0)
			break;
		size_t n = (size_t)r;
		if (n > outsz - 1 - len)
			n = outsz - 1 - len;
		memcpy(out + len, buf, n);
		len += n;
	}
	out[len] = 0;
	close(pfd[0]);
	int status;
	if (waitpid(pid, &status, WNOHANG) == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
	}
	return status;
}

/* The one "zokio:" line of a report, or fail. */
static void check_report(const char *out, const char *name, size_t usable, size_t configured,
			 const char *how)
{
	const char *line = strstr(out, "zokio:");
	ck_assert_msg(line != NULL, "no diagnostic on stderr; got: \"%.1500s\"", out);
	const char *eol = strchr(line, '\n');
	ck_assert_msg(eol != NULL, "diagnostic is not a complete line: \"%.1500s\"", line);
	char l[512];
	size_t n = (size_t)(eol - line) < sizeof(l) - 1 ? (size_t)(eol - line) : sizeof(l) - 1;
	memcpy(l, line, n);
	l[n] = 0;
	ck_assert_msg(strstr(l, name) != NULL, "fiber name missing: \"%s\"", l);
	ck_assert_msg(strstr(l, "overflowed") != NULL, "\"overflowed\" missing: \"%s\"", l);
	char a[32], b[32];
	snprintf(a, sizeof(a), "%zu", usable);
	snprintf(b, sizeof(b), "%zu", configured);
	ck_assert_msg(strstr(l, a) || strstr(l, b), "stack size (%s or %s) missing: \"%s\"", a, b, l);
	if (how)
		ck_assert_msg(strstr(l, how) != NULL, "\"%s\" missing: \"%s\"", how, l);
	if (getenv("ZK_TEST_VERBOSE"))
		fprintf(stderr, "%s\n", l);
}

static int recurse_frames;
static volatile int recurse_limit = 1 << 30; /* never reached: keeps -Winfinite-recursion quiet */

/* Unbounded recursion; the volatile buffer keeps every frame on the stack
 * and the use after the call keeps the compiler from making it a loop.
 * Frames stay well under a page so the guard page cannot be skipped. */
__attribute__((noinline)) static int recurse_forever(int depth)
{
	volatile char buf[192];
	for (size_t i = 0; i < sizeof(buf); i += 32)
		buf[i] = (char)depth;
	recurse_frames = depth;
	if (depth == recurse_limit)
		return buf[0];
	return recurse_forever(depth + 1) + buf[depth % sizeof(buf)];
}

static void *overflow_fiber(void *arg)
{
	recurse_forever(0);
	return NULL;
}

struct overflow_child_args {
	size_t stack_size;
	int workers;
	int on_worker; /* recurse only on this worker (-1: wherever it runs) */
};

static _Atomic int claimed;

/* Overflow on a chosen worker: the first probe that starts there recurses;
 * the others keep their own worker busy (no yield) so that the chosen
 * worker has to steal one of them. */
static void *overflow_probe(void *arg)
{
	int want = (int)(intptr_t)arg;
	int expected = 0;
	if (zk_worker_index() == want && atomic_compare_exchange_strong(&claimed, &expected, 1)) {
		zk_fiber_set_name(zk_self(), "deep-probe");
		recurse_forever(0);
	}
	double end = now_s() + 10;
	while (!atomic_load(&claimed) && now_s() < end)
		;
	return NULL;
}

static void overflow_child(void *arg)
{
	struct overflow_child_args *a = arg;
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = a->workers;
	o.stack_size = a->stack_size;
	zk_runtime_t *rt;
	if (zk_runtime_create(&rt, &o) != 0)
		_exit(2);
	if (a->on_worker < 0) {
		zk_spawn_opts_t so = { .name = "deep-diver" };
		if (zk_spawn_ex(rt, NULL, overflow_fiber, NULL, &so) != 0)
			_exit(3);
	} else {
		for (int i = 0; i < 64; i++)
			if (zk_spawn_ex(rt, NULL, overflow_probe, (void *)(intptr_t)a->on_worker, NULL) != 0)
				_exit(3);
	}
	zk_runtime_run(rt);
	_exit(4); /* the overflow did not kill us */
}

START_TEST(test_guard_page_hit_is_reported_with_name_and_size_then_aborts)
{
	static char out[65536];
	struct overflow_child_args a = { 32 * 1024, 1, -1 };
	int st = run_forked(overflow_child, &a, out, sizeof(out), 20);
	ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT,
		      "child should die by SIGABRT; status 0x%x, stderr: \"%.1500s\"", st, out);
	check_report(out, "deep-diver", usable_for(a.stack_size, 0), a.stack_size, NULL);
}
END_TEST

START_TEST(test_guard_page_hit_on_second_worker_is_reported)
{
	/* Every worker thread needs its own alternate signal stack. */
	static char out[65536];
	struct overflow_child_args a = { ZK_DEFAULT_STACK_SIZE, 2, 1 };
	int st = run_forked(overflow_child, &a, out, sizeof(out), 20);
	ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT,
		      "child should die by SIGABRT; status 0x%x, stderr: \"%.1500s\"", st, out);
	check_report(out, "deep-probe", usable_for(a.stack_size, 0), a.stack_size, NULL);
}
END_TEST

/* What a frame deeper than the stack would have written: the lowest bytes,
 * canary included.  Not instrumented, because to AddressSanitizer this is
 * memory below the live frames (which is the point). */
__attribute__((noinline, no_sanitize_address)) static void scribble_bottom(char *lo, size_t n)
{
	for (volatile char *p = lo; p < lo + n; p++)
		*p = (char)0xa5;
}

/* Recurse until the frames come within 8 KiB of the lowest usable byte,
 * then overwrite the bottom (as deeper frames would) without going past
 * it: with canary stacks there is no guard, and the memory below belongs
 * to someone else.  Then switch, which is where the canary is checked; the
 * 8 KiB left are for the calls that lead to that check (plenty even with
 * sanitizer instrumentation). */
__attribute__((noinline)) static int dig_to_canary(char *lo, int depth)
{
	volatile char buf[192];
	for (size_t i = 0; i < sizeof(buf); i += 32)
		buf[i] = (char)depth;
	if ((char *)buf > lo + 8192)
		return dig_to_canary(lo, depth + 1) + buf[depth % sizeof(buf)];
	scribble_bottom(lo, 256);
	zk_yield();
	return buf[0];
}

static void *canary_fiber(void *arg)
{
	dig_to_canary(zk_self()->stack->lo, 0);
	return NULL;
}

static void canary_child(void *arg)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = 1;
	o.guard = ZK_GUARD_CANARY;
	o.stack_size = *(size_t *)arg;
	zk_runtime_t *rt;
	if (zk_runtime_create(&rt, &o) != 0)
		_exit(2);
	zk_spawn_opts_t so = { .name = "canary-crusher" };
	if (zk_spawn_ex(rt, NULL, canary_fiber, NULL, &so) != 0)
		_exit(3);
	zk_runtime_run(rt);
	_exit(4);
}

START_TEST(test_canary_overwrite_is_reported_at_the_next_switch)
{
	static char out[65536];
	size_t size = 48 * 1024;
	int st = run_forked(canary_child, &size, out, sizeof(out), 20);
	ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT,
		      "child should die by SIGABRT; status 0x%x, stderr: \"%.1500s\"", st, out);
	check_report(out, "canary-crusher", usable_for(size, 1), size, "canary overwritten");
}
END_TEST

static void *canary_intact_fiber(void *arg)
{
	/* Use a good part of the stack without reaching the bottom. */
	volatile char big[16 * 1024];
	for (size_t i = 0; i < sizeof(big); i += 64)
		big[i] = 1;
	zk_yield();
	return (void *)(intptr_t)big[64];
}

START_TEST(test_canary_stacks_run_fibers_that_stay_in_bounds)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = 1;
	o.guard = ZK_GUARD_CANARY;
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
	zk_fiber_t *f[8];
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(zk_spawn_ex(rt, &f[i], canary_intact_fiber, NULL, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	for (int i = 0; i < 8; i++) {
		void *r;
		ck_assert_int_eq(zk_join(f[i], &r), 0);
		ck_assert_int_eq((intptr_t)r, 1);
	}
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

/* ---- the pool ------------------------------------------------------------ */

/* Number of resident pages in [lo, hi). */
static size_t resident_pages(const char *lo, const char *hi)
{
	size_t pg = page_size();
	size_t n = (size_t)(hi - lo) / pg;
	unsigned char *vec = calloc(n, 1);
	ck_assert_ptr_nonnull(vec);
	ck_assert_int_eq(mincore((void *)lo, n * pg, vec), 0);
	size_t r = 0;
	for (size_t i = 0; i < n; i++)
		r += vec[i] & 1;
	free(vec);
	return r;
}

/* The pages the pool may release: from lo to the page that holds the header. */
static const char *release_hi(struct zk__stack *s)
{
	return (const char *)((uintptr_t)s & ~(uintptr_t)(page_size() - 1));
}

static void touch(struct zk__stack *s, int canary)
{
	char *from = s->lo + (canary ? sizeof(uint64_t) : 0);
	memset(from, 0xab, (size_t)(release_hi(s) - from));
}

START_TEST(test_pool_put_then_get_returns_the_same_stack)
{
	struct zk__stack_pool p;
	struct zk__stack_cache c = { 0 };
	struct zk__stack *a, *b, *x;
	ck_assert_int_eq(zk__stack_pool_init(&p, 64 * 1024, 0, 8, 8), 0);
	ck_assert_int_eq(zk__stack_get(&p, &c, &a), 0);
	ck_assert_int_eq(zk__stack_get(&p, &c, &b), 0);
	ck_assert_ptr_ne(a, b);
	zk__stack_put(&p, &c, a);
	ck_assert_int_eq(c.count, 1);
	ck_assert_int_eq(zk__stack_get(&p, &c, &x), 0);
	ck_assert_ptr_eq(x, a);
	ck_assert_int_eq(c.count, 0);
	/* through the global pool as well (no cache on the way back) */
	zk__stack_put(&p, NULL, b);
	ck_assert_int_eq(p.count, 1);
	ck_assert_int_eq(zk__stack_get(&p, &c, &x), 0);
	ck_assert_ptr_eq(x, b);
	ck_assert_int_eq(p.count, 0);
	zk__stack_put(&p, &c, a);
	zk__stack_put(&p, &c, b);
	zk__stack_cache_flush(&p, &c);
	ck_assert_int_eq(c.count, 0);
	ck_assert_int_eq(p.count, 2);
	zk__stack_pool_destroy(&p);
}
END_TEST

START_TEST(test_pool_cache_bound_is_respected)
{
	enum { CACHE = 4, N = 10 };
	struct zk__stack_pool p;
	struct zk__stack_cache c = { 0 };
	struct zk__stack *s[N];
	ck_assert_int_eq(zk__stack_pool_init(&p, 16 * 1024, 0, CACHE, 100), 0);
	p.slab_max = 1; /* one stack per mapping, as these counts assume */
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(zk__stack_get(&p, &c, &s[i]), 0);
	for (int i = 0; i < N; i++) {
		zk__stack_put(&p, &c, s[i]);
		ck_assert_uint_le(c.count, CACHE);
	}
	ck_assert_int_eq(c.count, CACHE);
	ck_assert_int_eq(p.count, N - CACHE);
	/* Getting them all back maps nothing new. */
	struct zk__stack *t[N];
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(zk__stack_get(&p, &c, &t[i]), 0);
		int known = 0;
		for (int j = 0; j < N; j++)
			known |= t[i] == s[j];
		ck_assert_msg(known, "stack %d was freshly mapped although %d were pooled", i, N);
		for (int j = 0; j < i; j++)
			ck_assert_ptr_ne(t[i], t[j]);
	}
	ck_assert_int_eq(p.count, 0);
	for (int i = 0; i < N; i++)
		zk__stack_put(&p, NULL, t[i]);
	zk__stack_pool_destroy(&p);
}
END_TEST

static void pool_release_case(int canary)
{
	enum { HWM = 2, N = 5 };
	struct zk__stack_pool p;
	struct zk__stack_cache c = { 0 };
	struct zk__stack *s[N];
	ck_assert_int_eq(zk__stack_pool_init(&p, 64 * 1024, canary, 1, HWM), 0);
	p.slab_max = 1; /* one stack per mapping, as these counts assume */
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(zk__stack_get(&p, &c, &s[i]), 0);
		touch(s[i], canary);
		size_t pages = (size_t)(release_hi(s[i]) - s[i]->lo) / page_size();
		ck_assert_int_eq(resident_pages(s[i]->lo, release_hi(s[i])), pages);
	}
	zk__stack_put(&p, &c, s[0]); /* cache (bound 1) */
	for (int i = 1; i < N; i++)
		zk__stack_put(&p, &c, s[i]); /* pool: the first HWM stay warm */
	ck_assert_int_eq(c.count, 1);
	ck_assert_int_eq(p.count, N - 1);
	size_t first_kept = canary ? 1 : 0; /* the canary's page stays */
	for (int i = 0; i < N; i++) {
		size_t pages = (size_t)(release_hi(s[i]) - s[i]->lo) / page_size();
		size_t res = resident_pages(s[i]->lo, release_hi(s[i]));
		if (i <= HWM)
			ck_assert_msg(res == pages, "stack %d (within the high-water mark) lost pages: %zu of %zu",
				      i, res, pages);
		else
			ck_assert_msg(res == first_kept,
				      "stack %d was pooled past the high-water mark but %zu of %zu pages stay resident",
				      i, res, pages);
		if (canary)
			ck_assert_msg(zk__stack_canary_ok(s[i]), "releasing pages destroyed stack %d's canary", i);
	}
	/* A released stack is usable again (its pages come back zeroed). */
	struct zk__stack *x = s[N - 1];
	ck_assert_uint_eq((unsigned char)x->lo[p.page + 100], 0);
	touch(x, canary);
	ck_assert_uint_eq((unsigned char)x->lo[p.page + 100], 0xab);
	zk__stack_cache_flush(&p, &c);
	zk__stack_pool_destroy(&p);
}

START_TEST(test_pool_releases_pages_past_high_water_mark)
{
	pool_release_case(0);
}
END_TEST

START_TEST(test_pool_releases_pages_past_high_water_mark_canary)
{
	pool_release_case(1);
}
END_TEST

START_TEST(test_stack_layout_guard_below_and_canary_set)
{
	struct zk__stack_pool p;
	struct zk__stack *s;
	size_t pg = page_size();
	ck_assert_int_eq(zk__stack_pool_init(&p, 10000, 0, 1, 1), 0);
	ck_assert_int_eq(p.stack_size % pg, 0); /* rounded up to pages */
	ck_assert_uint_ge(p.stack_size, 10000);
	ck_assert_int_eq(zk__stack_get(&p, &(struct zk__stack_cache){ 0 }, &s), 0);
	ck_assert_ptr_eq(s->lo, s->map + pg); /* one guard page below */
	ck_assert_ptr_eq((char *)s + 64, s->lo + p.stack_size); /* header on top */
	ck_assert_int_eq(p.guard == ZK__GUARD_MADVISE || p.guard == ZK__GUARD_MPROTECT, 1);
	zk__stack_put(&p, NULL, s);
	zk__stack_pool_destroy(&p);

	ck_assert_int_eq(zk__stack_pool_init(&p, 16 * 1024, 1, 1, 1), 0);
	ck_assert_int_eq(p.guard, ZK__GUARD_CANARY);
	ck_assert_int_eq(zk__stack_get(&p, &(struct zk__stack_cache){ 0 }, &s), 0);
	ck_assert_ptr_eq(s->lo, s->map); /* no guard mapping */
	ck_assert(zk__stack_canary_ok(s));
	zk__stack_put(&p, NULL, s);
	zk__stack_pool_destroy(&p);
}
END_TEST

/* Stacks come in slabs: many stacks, few mappings.  Each stack of a slab
 * still has its own guard, none overlaps another,
 * and destroying the pool unmaps them all. */
START_TEST(test_pool_maps_stacks_in_slabs_each_guarded)
{
	enum { N = 200 };
	struct zk__stack_pool p;
	struct zk__stack_cache c = { 0 };
	static struct zk__stack *s[N];
	size_t pg = page_size();
	ck_assert_int_eq(zk__stack_pool_init(&p, 16 * 1024, 0, 8, 1000), 0);
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(zk__stack_get(&p, &c, &s[i]), 0);
	unsigned mapped = atomic_load(&p.mapped);
	ck_assert_uint_ge(mapped, N);
	ck_assert_uint_le(mapped, N + ZK__SLAB_MAX);
	ck_assert_uint_eq(c.count + p.count, mapped - N); /* the rest are pooled */
	int slabs = 0;
	for (struct zk__stack *f = p.slabs; f; f = f->slab_next)
		slabs++;
	ck_assert_int_lt(slabs, N / 4);
	int fds[2];
	ck_assert_int_eq(pipe(fds), 0);
	for (int i = 0; i < N; i++) {
		ck_assert_ptr_eq(s[i]->lo, s[i]->map + pg);
		ck_assert_ptr_eq((char *)s[i] + 64, s[i]->lo + p.stack_size);
		for (int j = 0; j < i; j++)
			ck_assert_msg(s[j]->map >= (char *)s[i] + 64 || (char *)s[j] + 64 <= s[i]->map,
				      "stacks %d and %d overlap", i, j);
		/* The guard refuses even the kernel (write(2) from it fails). */
		if (p.guard == ZK__GUARD_MADVISE || p.guard == ZK__GUARD_MPROTECT) {
			errno = 0;
			ck_assert_int_lt(write(fds[1], s[i]->map, 1), 0);
			ck_assert_int_eq(errno, EFAULT);
		}
		/* The usable part is writable from bottom to top. */
		s[i]->lo[0] = 1;
		((char *)s[i])[-1] = 1;
	}
	close(fds[0]);
	close(fds[1]);
	for (int i = 0; i < N; i++)
		zk__stack_put(&p, &c, s[i]);
	zk__stack_cache_flush(&p, &c);
	ck_assert_uint_eq(p.count, mapped);
	char *lo = s[0]->map, *top = (char *)s[0] + 64;
	zk__stack_pool_destroy(&p);
	unsigned char v;
	ck_assert_int_eq(mincore(lo, pg, &v), -1); /* unmapped */
	ck_assert_int_eq(errno, ENOMEM);
	ck_assert_int_eq(mincore(top - pg, pg, &v), -1);
}
END_TEST

/* ---- default size ------------------------------------------------------- */

static void *measure_stack(void *arg)
{
	/* The documented size must really be usable: 48 KiB of locals. */
	volatile char big[48 * 1024];
	for (size_t i = 0; i < sizeof(big); i += 256)
		big[i] = (char)i;
	*(size_t *)arg = zk__stack_usable(zk_self()->stack);
	return (void *)(intptr_t)big[256];
}

START_TEST(test_default_stack_size_is_the_documented_one)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	ck_assert_uint_eq(o.stack_size, ZK_DEFAULT_STACK_SIZE);
	o.workers = 1;
	o.stack_size = 0; /* 0 = default as well */
	for (int pass = 0; pass < 2; pass++) {
		zk_runtime_t *rt;
		if (pass == 0)
			ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
		else
			ck_assert_int_eq(zk_runtime_create(&rt, NULL), 0);
		size_t usable = 0;
		zk_fiber_t *f;
		ck_assert_int_eq(zk_spawn_ex(rt, &f, measure_stack, &usable, NULL), 0);
		ck_assert_int_eq(zk_runtime_run(rt), 0);
		ck_assert_int_eq(zk_join(f, NULL), 0);
		ck_assert_msg(usable >= ZK_DEFAULT_STACK_SIZE - 64, "usable %zu < %d - 64", usable,
			      ZK_DEFAULT_STACK_SIZE);
		ck_assert_uint_le(usable, ZK_DEFAULT_STACK_SIZE + page_size());
		zk_runtime_destroy(rt);
	}
}
END_TEST

/* ---- exhaustion (forked child with a lowered RLIMIT_AS) ----------------- */

#ifndef ZK_TSAN /* see stack_suite() */

#define EXHAUST_HEADROOM (64UL << 20)

static _Atomic int exhaust_release;
static _Atomic int exhaust_running;

static void *parked_until_released(void *arg)
{
	atomic_fetch_add(&exhaust_running, 1);
	while (!atomic_load(&exhaust_release))
		zk_yield();
	return NULL;
}

struct exhaust_result {
	int count;
	int err;
};

static void *exhaust_spawner(void *arg)
{
	struct exhaust_result *res = arg;
	for (int i = 0; i < 100000; i++) {
		int rc = zk_spawn(NULL, parked_until_released, NULL);
		if (rc != 0) {
			res->err = rc;
			break;
		}
		res->count++;
		zk_yield(); /* let it start and take its stack */
	}
	atomic_store(&exhaust_release, 1);
	return NULL;
}

static size_t vm_size(void)
{
	FILE *f = fopen("/proc/self/statm", "r");
	unsigned long pages = 0;
	if (f) {
		if (fscanf(f, "%lu", &pages) != 1)
			pages = 0;
		fclose(f);
	}
	return pages * page_size();
}

static void exhaust_child(void *arg)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = 1;
	zk_runtime_t *rt;
	if (zk_runtime_create(&rt, &o) != 0)
		_exit(2);
	struct exhaust_result res = { 0, 0 };
	zk_fiber_t *f;
	if (zk_spawn_ex(rt, &f, exhaust_spawner, &res, NULL) != 0)
		_exit(3);
	struct rlimit rl;
	rl.rlim_cur = rl.rlim_max = vm_size() + EXHAUST_HEADROOM;
	if (setrlimit(RLIMIT_AS, &rl) != 0)
		_exit(4);
	if (zk_runtime_run(rt) != 0)
		_exit(5);
	if (zk_join(f, NULL) != 0)
		_exit(6);
	size_t per_stack = (size_t)ZK_DEFAULT_STACK_SIZE + page_size();
	int bound = (int)(EXHAUST_HEADROOM / per_stack) + 16;
	fprintf(stderr, "exhaust: %d fibers, then spawn returned %d\n", res.count, res.err);
	if (res.err != -EAGAIN && res.err != -ENOMEM)
		_exit(7);
	if (res.count < 1 || res.count > bound)
		_exit(8);
	if (atomic_load(&exhaust_running) != res.count)
		_exit(9);
	_exit(0);
}

START_TEST(test_spawn_fails_with_negative_errno_when_address_space_runs_out)
{
	static char out[65536];
	int st = run_forked(exhaust_child, NULL, out, sizeof(out), 60);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0,
		      "child status 0x%x (exit %d: 7 = wrong errno, 8 = count not bounded, "
		      "9 = not all ran); stderr: \"%.1500s\"",
		      st, WIFEXITED(st) ? WEXITSTATUS(st) : -1, out);
	if (getenv("ZK_TEST_VERBOSE"))
		fputs(out, stderr);
}
END_TEST
#endif

static Suite *stack_suite(void)
{
	Suite *s = suite_create("stack");
	TCase *tc = tcase_create("overflow");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_guard_page_hit_is_reported_with_name_and_size_then_aborts);
	tcase_add_test(tc, test_guard_page_hit_on_second_worker_is_reported);
	tcase_add_test(tc, test_canary_overwrite_is_reported_at_the_next_switch);
	tcase_add_test(tc, test_canary_stacks_run_fibers_that_stay_in_bounds);
	suite_add_tcase(s, tc);

	tc = tcase_create("pool");
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_pool_put_then_get_returns_the_same_stack);
	tcase_add_test(tc, test_pool_cache_bound_is_respected);
	tcase_add_test(tc, test_pool_releases_pages_past_high_water_mark);
	tcase_add_test(tc, test_pool_releases_pages_past_high_water_mark_canary);
	tcase_add_test(tc, test_stack_layout_guard_below_and_canary_set);
	tcase_add_test(tc, test_pool_maps_stacks_in_slabs_each_guarded);
	tcase_add_test(tc, test_default_stack_size_is_the_documented_one);
	suite_add_tcase(s, tc);

#ifndef ZK_TSAN
	/* Not under ThreadSanitizer: it maps a shadow stack for every fiber
	 * and dies when that mapping fails, so with a lowered RLIMIT_AS the
	 * sanitizer, not zk_spawn, meets the limit first. */
	tc = tcase_create("exhaustion");
	tcase_set_timeout(tc, 90);
	tcase_add_test(tc, test_spawn_fails_with_negative_errno_when_address_space_runs_out);
	suite_add_tcase(s, tc);
#endif
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(stack_suite());
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
