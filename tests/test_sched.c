/*
 * test_sched.c - the work-stealing scheduler across workers: the Chase-Lev
 * deque under contention, a million fibers on two workers, no lost
 * wake-ups in a cross-worker token ping-pong, fairness of yield loops and
 * wake chains, spawn floods spread by stealing, pinning and no_migration,
 * spawn and join from plain threads, the fiber dump (from code and from a
 * signal), shutdown by cancellation, and ZOKIO_WORKERS.
 *
 * Sizes: the big tests run at full size natively and smaller under
 * ThreadSanitizer (ZK_TSAN, which also caps live fibers+threads at 8128)
 * or when ZK_TEST_QUICK is set (valgrind runs); see scaled().
 */
#include <check.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "zokio.h"
#include "deque.h"
#include "fiber.h"
#include "scheduler.h"
#include "watchdog.h"

/* ---- helpers ------------------------------------------------------------- */

static long scaled(long full, long small)
{
#ifdef ZK_TSAN
	(void)full;
	return small;
#else
	return getenv("ZK_TEST_QUICK") ? small : full;
#endif
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__)
	__asm__ volatile("pause");
#elif defined(__aarch64__)
	__asm__ volatile("yield");
#endif
}

static zk_runtime_t *rt_new(int workers, int no_migration)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = workers;
	o.no_migration = no_migration;
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
	return rt;
}

/* Run fn(arg) as the first fiber of rt; return its result. */
static void *run_main(zk_runtime_t *rt, zk_fiber_fn fn, void *arg, const char *name)
{
	zk_fiber_t *f;
	void *res = NULL;
	zk_spawn_opts_t so = { .name = name };
	ck_assert_int_eq(zk_spawn_ex(rt, &f, fn, arg, &so), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_join(f, &res), 0);
	return res;
}

static int fiber_state(zk_fiber_t *f)
{
	return atomic_load(&f->state);
}

/* A one-shot event with one waiting fiber, built on the internal park
 * contract: the waiter publishes itself after its context is saved and
 * re-checks the flag (Dekker with the setter: each stores, then loads the
 * other's variable, both seq_cst). */
struct event {
	_Atomic int set;
	_Atomic(zk_fiber_t *) waiter;
};

static int event_publish(zk_fiber_t *self, void *arg)
{
	struct event *e = arg; /* long-lived: safe to use after publishing */
	atomic_store(&e->waiter, self);
	if (atomic_load(&e->set)) {
		zk_fiber_t *me = self;
		if (atomic_compare_exchange_strong(&e->waiter, &me, NULL))
			return 1; /* no need to wait after all */
	}
	return 0;
}

/* Fiber only.  0 once set, or -ECANCELED with ZK__PARK_CANCELLABLE. */
static int event_wait(struct event *e, const char *what, int flags)
{
	while (!atomic_load(&e->set)) {
		int rc = zk__park(what, event_publish, e, flags);
		if (rc < 0) {
			zk_fiber_t *me = zk_self();
			atomic_compare_exchange_strong(&e->waiter, &me, NULL);
			return rc;
		}
	}
	return 0;
}

/* Any thread. */
static void event_set(struct event *e)
{
	atomic_store(&e->set, 1);
	zk_fiber_t *f = atomic_exchange(&e->waiter, NULL);
	if (f)
		zk__unpark(f, 0);
}

/* A token passed between two sides; whoever does not hold it parks. */
struct baton;
struct side {
	struct baton *b;
	int me;
};
struct baton {
	_Atomic int turn;
	_Atomic(zk_fiber_t *) waiter[2];
	struct side side[2];
};

static void baton_init(struct baton *b)
{
	memset(b, 0, sizeof(*b));
	for (int i = 0; i < 2; i++) {
		b->side[i].b = b;
		b->side[i].me = i;
	}
}

static int baton_publish(zk_fiber_t *self, void *arg)
{
	struct side *s = arg;
	struct baton *b = s->b;
	int me = s->me;
	atomic_store(&b->waiter[me], self);
	if (atomic_load(&b->turn) == me) {
		zk_fiber_t *exp = self;
		if (atomic_compare_exchange_strong(&b->waiter[me], &exp, NULL))
			return 1;
	}
	return 0;
}

static void baton_wait(struct baton *b, int me)
{
	while (atomic_load(&b->turn) != me)
		zk__park("baton", baton_publish, &b->side[me], 0);
}

static void baton_pass(struct baton *b, int me)
{
	atomic_store(&b->turn, 1 - me);
	zk_fiber_t *f = atomic_exchange(&b->waiter[1 - me], NULL);
	if (f)
		zk__unpark(f, 0);
}


/*
 * One fiber on each worker.  The root spawns candidates (pinned unless the
 * test wants otherwise); the first candidate to start on worker w claims w
 * and then waits, without yielding, until every worker is claimed, which
 * keeps its worker busy so that the others have to steal the remaining
 * candidates.  Each claimer then runs body(w).  The rest return at once.
 */
#define MAX_WORKERS 4
#define CANDIDATES 64

struct per_worker {
	int nworkers;
	int pinned;
	void (*body)(int w, void *arg);
	void *arg;
	_Atomic int claimed[MAX_WORKERS];
	_Atomic int nclaimed;
	_Atomic int timed_out;
};

static void *candidate(void *arg)
{
	struct per_worker *pw = arg;
	int w = zk_worker_index();
	int exp = 0;
	if (w < 0 || w >= pw->nworkers || !atomic_compare_exchange_strong(&pw->claimed[w], &exp, 1))
		return NULL;
	atomic_fetch_add(&pw->nclaimed, 1);
	double end = now_s() + 20;
	while (atomic_load(&pw->nclaimed) < pw->nworkers) {
		if (now_s() > end) {
			atomic_store(&pw->timed_out, 1);
			return NULL;
		}
		cpu_relax();
	}
	pw->body(w, pw->arg);
	return (void *)1;
}

static void *per_worker_root(void *arg)
{
	struct per_worker *pw = arg;
	zk_fiber_t *f[CANDIDATES];
	zk_spawn_opts_t so = { .name = "candidate", .pinned = pw->pinned };
	for (int i = 0; i < CANDIDATES; i++)
		ck_assert_int_eq(zk_spawn_ex(NULL, &f[i], candidate, pw, &so), 0);
	intptr_t n = 0;
	for (int i = 0; i < CANDIDATES; i++) {
		void *r;
		ck_assert_int_eq(zk_join(f[i], &r), 0);
		n += (intptr_t)r;
	}
	return (void *)n;
}

/* Run body(w, arg) once on each of rt's workers (rt must not be running). */
static void on_each_worker(zk_runtime_t *rt, int nworkers, int pinned, void (*body)(int, void *), void *arg)
{
	struct per_worker pw;
	memset(&pw, 0, sizeof(pw));
	pw.nworkers = nworkers;
	pw.pinned = pinned;
	pw.body = body;
	pw.arg = arg;
	intptr_t n = (intptr_t)run_main(rt, per_worker_root, &pw, "per-worker-root");
	ck_assert_msg(!atomic_load(&pw.timed_out), "could not get a fiber started on every worker");
	ck_assert_int_eq(n, nworkers);
}

/* ---- the deque ----------------------------------------------------------- */

/* Items are fake fiber pointers: 16-aligned, never NULL or ZK__STEAL_RETRY. */
#define DQ_ITEM(i) ((struct zk_fiber *)(uintptr_t)(((uintptr_t)(i) + 1) << 4))

START_TEST(test_deque_push_take_steal_edges)
{
	static struct zk__deque d;
	zk__deque_init(&d);
	ck_assert_ptr_null(zk__deque_take(&d));
	ck_assert_ptr_null(zk__deque_steal(&d));
	for (int round = 0; round < 5; round++) { /* indices wrap around the ring */
		for (int i = 0; i < ZK__DEQUE_SIZE; i++)
			ck_assert_int_eq(zk__deque_push(&d, DQ_ITEM(i)), i); /* items held before */
		ck_assert_int_eq(zk__deque_push(&d, DQ_ITEM(999)), -1); /* full */
		ck_assert_int_eq(zk__deque_size(&d), ZK__DEQUE_SIZE);
		ck_assert_ptr_eq(zk__deque_steal(&d), DQ_ITEM(0));   /* thieves: oldest */
		ck_assert_ptr_eq(zk__deque_take(&d), DQ_ITEM(ZK__DEQUE_SIZE - 1)); /* owner: newest */
		for (int i = 1; i < ZK__DEQUE_SIZE / 2; i++)
			ck_assert_ptr_eq(zk__deque_steal(&d), DQ_ITEM(i));
		for (int i = ZK__DEQUE_SIZE - 2; i >= ZK__DEQUE_SIZE / 2; i--)
			ck_assert_ptr_eq(zk__deque_take(&d), DQ_ITEM(i));
		ck_assert_ptr_null(zk__deque_take(&d));
		ck_assert_ptr_null(zk__deque_steal(&d));
		ck_assert_int_eq(zk__deque_size(&d), 0);
	}
}
END_TEST

struct dq_stress {
	struct zk__deque dq;
	long n;
	_Atomic unsigned char *seen;
	_Atomic int go;
	_Atomic int done;
	_Atomic long dups, bad, stolen;
};

static void dq_record(struct dq_stress *t, struct zk_fiber *f)
{
	uintptr_t v = (uintptr_t)f;
	if ((v & 15) || v == 0 || (long)(v >> 4) - 1 >= t->n) {
		atomic_fetch_add(&t->bad, 1);
		return;
	}
	if (atomic_fetch_add_explicit(&t->seen[(v >> 4) - 1], 1, memory_order_relaxed) != 0)
		atomic_fetch_add(&t->dups, 1);
}

static void *dq_thief(void *arg)
{
	struct dq_stress *t = arg;
	long mine = 0;
	atomic_fetch_add(&t->go, 1);
	for (;;) {
		struct zk_fiber *f = zk__deque_steal(&t->dq);
		if (f == ZK__STEAL_RETRY)
			continue;
		if (f) {
			dq_record(t, f);
			mine++;
			continue;
		}
		/* Empty.  The owner sets done only after draining the deque, and
		 * pushes nothing after that. */
		if (atomic_load(&t->done))
			break;
		cpu_relax();
	}
	atomic_fetch_add(&t->stolen, mine);
	return NULL;
}

START_TEST(test_deque_every_item_taken_exactly_once_with_two_thieves)
{
	struct dq_stress *t = calloc(1, sizeof(*t));
	ck_assert_ptr_nonnull(t);
	t->n = scaled(2000000, 200000);
	t->seen = calloc((size_t)t->n, 1);
	ck_assert_ptr_nonnull(t->seen);
	zk__deque_init(&t->dq);
	pthread_t th[2];
	for (int i = 0; i < 2; i++)
		ck_assert_int_eq(pthread_create(&th[i], NULL, dq_thief, t), 0);
	while (atomic_load(&t->go) < 2)
		sched_yield();

	uint32_t rng = 12345;
	long next = 0, owner = 0, full = 0;
	double end = now_s() + 60;
	while (next < t->n) {
		rng = rng * 1103515245u + 12345u;
		int burst = (int)((rng >> 16) % 64) + 1;
		for (int j = 0; j < burst && next < t->n; j++) {
			if (zk__deque_push(&t->dq, DQ_ITEM(next)) < 0) {
				full++;
				break;
			}
			next++;
		}
		int takes = (int)((rng >> 8) % 48);
		for (int j = 0; j < takes; j++) {
			struct zk_fiber *f = zk__deque_take(&t->dq);
			if (!f)
				break;
			dq_record(t, f);
			owner++;
		}
		ck_assert_msg(now_s() < end, "deque stress made no end (%ld of %ld pushed)", next, t->n);
	}
	struct zk_fiber *f;
	while ((f = zk__deque_take(&t->dq))) {
		dq_record(t, f);
		owner++;
	}
	atomic_store(&t->done, 1);
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);

	ck_assert_int_eq(atomic_load(&t->bad), 0);
	ck_assert_int_eq(atomic_load(&t->dups), 0);
	ck_assert_int_eq(owner + atomic_load(&t->stolen), t->n);
	for (long i = 0; i < t->n; i++)
		ck_assert_msg(atomic_load(&t->seen[i]) == 1, "item %ld taken %d times", i,
			      (int)atomic_load(&t->seen[i]));
	ck_assert_msg(atomic_load(&t->stolen) > 0, "thieves never stole: the test proved nothing");
	ck_assert_int_gt(owner, 0);
	free((void *)t->seen);
	free(t);
}
END_TEST

/* ---- a million fibers on two workers ----------------------------------- */

struct million {
	long groups;
	long leaves;
	_Atomic long bad;
};

static uint32_t mix(uint32_t x)
{
	x ^= x >> 16;
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x846ca68bu;
	x ^= x >> 16;
	return x;
}

static void *leaf(void *arg)
{
	long i = (long)(intptr_t)arg;
	uint32_t r = mix((uint32_t)i);
	if (r % 4 == 0) /* a quarter of them yield 1..3 times */
		for (uint32_t k = 0; k < 1 + (r >> 8) % 3; k++)
			zk_yield();
	return (void *)(intptr_t)(i * 3 + 1);
}

struct group_arg {
	struct million *m;
	long g;
};

struct waiting_leaf {
	struct event ev;
	long i;
};

/* The first leaf of every group parks until its group wakes it (from
 * whichever worker the group runs on). */
static void *leaf_waiter(void *arg)
{
	struct waiting_leaf *wl = arg;
	if (event_wait(&wl->ev, "group", 0) != 0)
		return NULL;
	return leaf((void *)(intptr_t)wl->i);
}

static void *group(void *arg)
{
	struct group_arg *ga = arg;
	struct million *m = ga->m;
	long n = m->leaves;
	long base = ga->g * n;
	zk_fiber_t **f = malloc((size_t)n * sizeof(*f));
	struct waiting_leaf wl;
	memset(&wl, 0, sizeof(wl));
	wl.i = base;
	ck_assert_ptr_nonnull(f);
	for (long j = 0; j < n; j++) {
		int rc = j == 0 ? zk_spawn(&f[j], leaf_waiter, &wl)
				: zk_spawn(&f[j], leaf, (void *)(intptr_t)(base + j));
		if (rc != 0) {
			atomic_fetch_add(&m->bad, 1);
			n = j;
			break;
		}
	}
	zk_yield(); /* give the waiter a chance to park first */
	event_set(&wl.ev);
	long sum = 0;
	for (long k = 0; k < n; k++) {
		long j = (k * 7919) % n; /* join in a scrambled order */
		void *r;
		if (zk_join(f[j], &r) != 0 || (intptr_t)r != (base + j) * 3 + 1)
			atomic_fetch_add(&m->bad, 1);
		sum += (intptr_t)r;
	}
	free(f);
	return (void *)(intptr_t)sum;
}

static void *million_root(void *arg)
{
	struct million *m = arg;
	enum { WINDOW = 4 }; /* groups in flight: bounds the live records */
	zk_fiber_t *f[WINDOW];
	struct group_arg ga[WINDOW];
	long total = 0;
	for (long g = 0; g < m->groups; g++) {
		int slot = (int)(g % WINDOW);
		if (g >= WINDOW) {
			void *r;
			ck_assert_int_eq(zk_join(f[slot], &r), 0);
			total += (intptr_t)r;
		}
		ga[slot].m = m;
		ga[slot].g = g;
		ck_assert_int_eq(zk_spawn(&f[slot], group, &ga[slot]), 0);
	}
	for (long g = m->groups > WINDOW ? m->groups - WINDOW : 0; g < m->groups; g++) {
		void *r;
		ck_assert_int_eq(zk_join(f[g % WINDOW], &r), 0);
		total += (intptr_t)r;
	}
	return (void *)(intptr_t)total;
}

START_TEST(test_million_fibers_on_two_workers_with_yields_wakes_and_joins)
{
	/* groups x (1 + leaves) fibers: 1000 x 1000 = 1,000,000 natively;
	 * 100 x 200 = 20,000 under TSan (slow, and capped in live fibers) or
	 * ZK_TEST_QUICK.  A quarter of the leaves yield, one per group parks
	 * until its group wakes it, every leaf is joined. */
	struct million m = { scaled(1000, 100), scaled(999, 199), 0 };
	zk_runtime_t *rt = rt_new(2, 0);
	double t0 = now_s();
	intptr_t total = (intptr_t)run_main(rt, million_root, &m, "million");
	double dt = now_s() - t0;
	long n = m.groups * m.leaves;
	ck_assert_int_eq(atomic_load(&m.bad), 0);
	ck_assert_int_eq(total, 3 * (n * (n - 1) / 2) + n); /* sum of 3i+1 */
	zk_worker_stats_t st[2];
	ck_assert_int_eq(zk_runtime_stats(rt, st, 2), 2);
	/* (Whether the second worker got a share depends on the OS giving it
	 * a CPU in time; the placement tests check spreading.) */
	ck_assert_uint_ge(st[0].fibers_run + st[1].fibers_run, (uint64_t)(n + m.groups));
	if (getenv("ZK_TEST_VERBOSE"))
		fprintf(stderr, "%ld fibers in %.2f s; run %llu + %llu, steals %llu + %llu\n",
			n + m.groups, dt, (unsigned long long)st[0].fibers_run,
			(unsigned long long)st[1].fibers_run, (unsigned long long)st[0].steals,
			(unsigned long long)st[1].steals);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

/* ---- no lost wake-ups: token ping-pong across workers ------------------- */

struct pingpong {
	struct baton b;
	long rounds;          /* passes per side */
	int yields;           /* also yield every round */
	int joins;            /* also spawn+join a child every `joins` rounds */
	_Atomic long passes;
	_Atomic long moved;   /* times a side ran on another worker than its own */
	_Atomic int home[2];
};

static void *nop(void *arg)
{
	return arg;
}

static void pingpong_body(int w, void *arg)
{
	struct pingpong *pp = arg;
	if (w > 1)
		return;
	atomic_store(&pp->home[w], zk_worker_index());
	for (long i = 0; i < pp->rounds; i++) {
		baton_wait(&pp->b, w);
		if (zk_worker_index() != w)
			atomic_fetch_add(&pp->moved, 1);
		atomic_fetch_add_explicit(&pp->passes, 1, memory_order_relaxed);
		baton_pass(&pp->b, w);
		if (pp->yields) {
			zk_yield();
			if (zk_worker_index() != w)
				atomic_fetch_add(&pp->moved, 1);
		}
		if (pp->joins && i % pp->joins == 0) {
			zk_fiber_t *c;
			void *r = NULL;
			ck_assert_int_eq(zk_spawn(&c, nop, (void *)(intptr_t)i), 0);
			ck_assert_int_eq(zk_join(c, &r), 0);
			ck_assert_int_eq((intptr_t)r, i);
			if (zk_worker_index() != w)
				atomic_fetch_add(&pp->moved, 1);
		}
	}
}

static void pingpong_run(struct pingpong *pp, int pinned, int no_migration)
{
	baton_init(&pp->b);
	zk_runtime_t *rt = rt_new(2, no_migration);
	struct watchdog wd;
	/* The end of the run counts as progress too: a worker that misses the
	 * "all done" wake-up hangs zk_runtime_run as surely as a lost token. */
	watchdog_start(&wd, rt, 10, 240, "cross-worker ping-pong", &pp->passes);
	on_each_worker(rt, 2, pinned, pingpong_body, pp);
	watchdog_stop(&wd);
	ck_assert_int_eq(atomic_load(&pp->passes), 2 * pp->rounds);
	if (getenv("ZK_TEST_VERBOSE")) {
		zk_worker_stats_t st[2];
		zk_runtime_stats(rt, st, 2);
		fprintf(stderr, "ping-pong: run %llu + %llu, parks %llu + %llu, wakeups %llu + %llu\n",
			(unsigned long long)st[0].fibers_run, (unsigned long long)st[1].fibers_run,
			(unsigned long long)st[0].parks, (unsigned long long)st[1].parks,
			(unsigned long long)st[0].wakeups, (unsigned long long)st[1].wakeups);
	}
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}

START_TEST(test_token_pingpong_across_workers_loses_no_wakeups)
{
	/* 1,000,000 passes natively (each wakes a fiber pinned to the other
	 * worker, which is often asleep: a futex wake-up per pass, some 5-40 us
	 * depending on the machine's load), 100,000 under TSan or
	 * ZK_TEST_QUICK.  The watchdog aborts on 10 s without a pass. */
	struct pingpong pp;
	memset(&pp, 0, sizeof(pp));
	pp.rounds = scaled(500000, 50000);
	double t0 = now_s();
	pingpong_run(&pp, 1, 0);
	ck_assert_int_eq(atomic_load(&pp.moved), 0);
	if (getenv("ZK_TEST_VERBOSE"))
		fprintf(stderr, "%ld passes in %.2f s\n", 2 * pp.rounds, now_s() - t0);
}
END_TEST

/* ---- zk_park / zk_unpark --------------------------------------------------- */

static void *park_semantics_main(void *arg)
{
	(void)arg;
	zk_fiber_t *me = zk_self();
	/* a permit given before the park makes it return at once */
	ck_assert_int_eq(zk_unpark(me), 0);
	ck_assert_int_eq(zk_park(), 0);
	/* permits do not add up: two unparks, one permit */
	ck_assert_int_eq(zk_unpark(me), 0);
	ck_assert_int_eq(zk_unpark(me), 0);
	ck_assert_int_eq(zk_park_timed(zk_now_ns() + 1000000), 0);
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(zk_park_timed(t0 + 2000000), -ETIMEDOUT);
	ck_assert(zk_now_ns() - t0 >= 2000000);
	/* a deadline already past fails at once, and keeps a waiting permit */
	ck_assert_int_eq(zk_park_timed(0), -ETIMEDOUT);
	ck_assert_int_eq(zk_unpark(me), 0);
	ck_assert_int_eq(zk_park_timed(0), 0);
	/* the fiber's own deadline applies */
	ck_assert_int_eq(zk_deadline_set(zk_now_ns() + 1000000), 0);
	ck_assert_int_eq(zk_park(), -ETIMEDOUT);
	ck_assert_int_eq(zk_deadline_clear(), 0);
	ck_assert_int_eq(zk_unpark(NULL), -EINVAL);
	return NULL;
}

static void *park_until_cancelled(void *arg)
{
	(void)arg;
	return (void *)(intptr_t)zk_park();
}

static void *park_cancel_main(void *arg)
{
	(void)arg;
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn(&f, park_until_cancelled, NULL), 0);
	while (fiber_state(f) != ZK__PARKED)
		zk_yield();
	ck_assert_int_eq(zk_cancel(f), 0);
	void *r;
	ck_assert_int_eq(zk_join(f, &r), 0);
	ck_assert_int_eq((intptr_t)r, -ECANCELED);
	return NULL;
}

START_TEST(test_park_unpark_permit_semantics)
{
	ck_assert_int_eq(zk_park(), -EPERM); /* plain thread */
	zk_runtime_t *rt = rt_new(1, 0);
	run_main(rt, park_semantics_main, NULL, "park-semantics");
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
	rt = rt_new(2, 0);
	run_main(rt, park_cancel_main, NULL, "park-cancel");
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

/* Two fibers pinned to different workers pass a turn with park/unpark only.
 * Side 0 also parks with short deadlines that race the other side's
 * unparks, and then sleeps: an unpark that lost its race to the timeout
 * must neither be lost (the token would stop) nor end that later sleep
 * early (a stray wake of the wrong park). */
struct parkpong {
	_Atomic int turn;
	_Atomic(zk_fiber_t *) side[2];
	long rounds;
	_Atomic long passes;
	_Atomic long timeouts;
	_Atomic long short_sleeps;
	_Atomic int ended;
};

static void parkpong_body(int w, void *arg)
{
	struct parkpong *pp = arg;
	if (w > 1)
		return;
	atomic_store(&pp->side[w], zk_self());
	while (!atomic_load(&pp->side[1 - w]))
		zk_yield();
	zk_fiber_t *other = atomic_load(&pp->side[1 - w]);
	for (long i = 0; i < pp->rounds; i++) {
		while (atomic_load(&pp->turn) != w) {
			int rc;
			if (w == 0 && (i & 3) == 0)
				rc = zk_park_timed(zk_now_ns() + 1000 * (i % 17));
			else
				rc = zk_park();
			ck_assert_msg(rc == 0 || rc == -ETIMEDOUT, "zk_park: %d", rc);
			if (rc == -ETIMEDOUT)
				atomic_fetch_add(&pp->timeouts, 1);
		}
		atomic_fetch_add_explicit(&pp->passes, 1, memory_order_relaxed);
		if (w == 0 && (i & 255) == 0) {
			int64_t t0 = zk_now_ns();
			ck_assert_int_eq(zk_sleep_ns(20000), 0);
			if (zk_now_ns() - t0 < 20000)
				atomic_fetch_add(&pp->short_sleeps, 1);
		}
		atomic_store(&pp->turn, 1 - w);
		ck_assert_int_eq(zk_unpark(other), 0);
	}
	/* neither side ends (and lets its handle go) while the other may
	 * still unpark it */
	atomic_fetch_add(&pp->ended, 1);
	while (atomic_load(&pp->ended) < 2)
		zk_yield();
}

START_TEST(test_park_unpark_pingpong_across_workers_loses_no_wakeups)
{
	struct parkpong pp;
	memset(&pp, 0, sizeof(pp));
	pp.rounds = scaled(200000, 20000);
	zk_runtime_t *rt = rt_new(2, 0);
	struct watchdog wd;
	watchdog_start(&wd, rt, 10, 240, "park/unpark ping-pong", &pp.passes);
	on_each_worker(rt, 2, 1, parkpong_body, &pp);
	watchdog_stop(&wd);
	ck_assert_int_eq(atomic_load(&pp.passes), 2 * pp.rounds);
	ck_assert_int_eq(atomic_load(&pp.short_sleeps), 0);
	if (getenv("ZK_TEST_VERBOSE"))
		fprintf(stderr, "park ping-pong: %ld passes, %ld timeouts\n", 2 * pp.rounds,
			atomic_load(&pp.timeouts));
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

/* ---- cancellation racing a park ------------------------------------------------
 *
 * A park may be entered just as zk_cancel runs on another worker: the
 * fiber checks the flag, switches away, and only then becomes PARKED.
 * However the two interleave, the fiber must wake with -ECANCELED (the
 * store-load pairing in scheduler.c, after_switch / zk_cancel).  Each
 * victim yields a pseudo-random number of times and then parks in a
 * channel receive or zk_park that nothing else ends; the canceller, on
 * the other worker, cancels it after a pseudo-random spin.  A lost cancel
 * leaves a victim asleep forever: the watchdog reports it. */
struct cancel_race {
	zk_chan_t *ch;
	long n;
	_Atomic long done;  /* victims that ran and saw their cancel */
	_Atomic long iters; /* victims joined: the watchdog's progress */
	_Atomic long armed; /* the victim is about to park */
};

static void *cancel_victim(void *arg)
{
	struct cancel_race *cr = arg;
	uint64_t x = zk_fiber_id(zk_self()) * 0x9e3779b97f4a7c15ull;
	for (int i = (int)(x >> 61); i > 0; i--)
		zk_yield();
	atomic_store(&cr->armed, 1);
	int rc;
	if (x & 1) {
		uint64_t v;
		rc = zk_chan_recv(cr->ch, &v);
	} else {
		while ((rc = zk_park()) == 0)
			; /* a permit is never given: only cancellation ends this */
	}
	atomic_fetch_add(&cr->done, 1);
	return (void *)(intptr_t)rc;
}

static void *cancel_race_main(void *arg)
{
	struct cancel_race *cr = arg;
	for (long i = 0; i < cr->n; i++) {
		zk_fiber_t *v;
		atomic_store(&cr->armed, 0);
		ck_assert_int_eq(zk_spawn_on(NULL, 0, &v, cancel_victim, cr, NULL), 0);
		/* mostly just as the victim parks: a few hundred ns either way */
		if (i % 8)
			while (!atomic_load(&cr->armed))
				cpu_relax();
		for (long k = (i * 7919) % 24; k > 0; k--)
			cpu_relax();
		ck_assert_int_eq(zk_cancel(v), 0);
		void *r = NULL;
		int rc = zk_join(v, &r);
		/* cancelled before it started: it never runs (join says so);
		 * else its wait ends with -ECANCELED, whether the cancel came
		 * before, during or after the park */
		if (rc == 0)
			ck_assert_int_eq((intptr_t)r, -ECANCELED);
		else
			ck_assert_int_eq(rc, -ECANCELED);
		atomic_fetch_add(&cr->iters, 1);
	}
	return NULL;
}

static void cancel_race_run(void)
{
	struct cancel_race cr;
	memset(&cr, 0, sizeof(cr));
	cr.n = scaled(10000, 1000);
	zk_runtime_t *rt = rt_new(2, 0);
	ck_assert_int_eq(zk_chan_create(&cr.ch, sizeof(uint64_t), 0), 0);
	struct watchdog wd;
	watchdog_start(&wd, rt, 10, 240, "cancel racing a park", &cr.iters);
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn_on(rt, 1, &f, cancel_race_main, &cr, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_join(f, NULL), 0);
	watchdog_stop(&wd);
	ck_assert_int_eq(atomic_load(&cr.iters), cr.n);
	if (getenv("ZK_TEST_VERBOSE"))
		fprintf(stderr, "cancel race: %ld of %ld victims parked or ran\n", atomic_load(&cr.done), cr.n);
	ck_assert_int_eq(zk_chan_destroy(cr.ch), 0);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}

START_TEST(test_cancel_racing_a_park_always_wakes_the_fiber)
{
	cancel_race_run();
}
END_TEST

/* The same with the portable protocol (PARKING state, a fence on both
 * sides) that parks use where membarrier is missing.  The probe runs once
 * per process, at the first runtime: Check forks a process per test. */
START_TEST(test_cancel_racing_a_park_without_membarrier)
{
	setenv("ZOKIO_NO_MEMBARRIER", "1", 1);
	cancel_race_run();
}
END_TEST

/* ---- pinning and no_migration ------------------------------------------- */

START_TEST(test_pinned_fibers_never_change_worker)
{
	/* Two pinned fibers on different workers wake each other 1,000 times,
	 * yielding and joining children in between: each resume is checked. */
	struct pingpong pp;
	memset(&pp, 0, sizeof(pp));
	pp.rounds = 1000;
	pp.yields = 1;
	pp.joins = 10;
	pingpong_run(&pp, 1, 0);
	ck_assert_int_eq(atomic_load(&pp.home[0]), 0);
	ck_assert_int_eq(atomic_load(&pp.home[1]), 1);
	ck_assert_msg(atomic_load(&pp.moved) == 0, "pinned fibers changed worker %ld times",
		      atomic_load(&pp.moved));
}
END_TEST

START_TEST(test_no_migration_keeps_started_fibers_on_their_worker)
{
	struct pingpong pp;
	memset(&pp, 0, sizeof(pp));
	pp.rounds = 1000;
	pp.yields = 1;
	pp.joins = 10;
	pingpong_run(&pp, 0, 1); /* not pinned; the runtime forbids migration */
	ck_assert_msg(atomic_load(&pp.moved) == 0, "started fibers changed worker %ld times",
		      atomic_load(&pp.moved));
}
END_TEST

START_TEST(test_unpinned_fibers_may_migrate_when_woken_across_workers)
{
	/* The control for the two tests above: without pinning, a fiber woken
	 * from another worker runs there (its LIFO slot), so the same checks
	 * do see it move.  Had pinning no effect, the tests above would fail. */
	struct pingpong pp;
	memset(&pp, 0, sizeof(pp));
	pp.rounds = 1000;
	pingpong_run(&pp, 0, 0);
	ck_assert_int_gt(atomic_load(&pp.moved), 0);
}
END_TEST

/* ---- fairness ------------------------------------------------------------ */

struct fair {
	_Atomic int flag[2];
	int need;                 /* how many flags the spinners wait for */
	_Atomic int starved;
	_Atomic int spinning;
	_Atomic long yields;
	struct baton b;
};

static void *set_flag0(void *arg)
{
	atomic_store(&((struct fair *)arg)->flag[0], 1);
	return NULL;
}

static void *set_flag1(void *arg)
{
	atomic_store(&((struct fair *)arg)->flag[1], 1);
	return NULL;
}

static int fair_all_set(struct fair *fr)
{
	for (int i = 0; i < fr->need; i++)
		if (!atomic_load(&fr->flag[i]))
			return 0;
	return 1;
}

/* Yield until the flags are set; give up (and say so) after 10 s. */
static void spin_until_flags(struct fair *fr)
{
	double end = now_s() + 10;
	atomic_fetch_add(&fr->spinning, 1);
	while (!fair_all_set(fr)) {
		zk_yield();
		atomic_fetch_add_explicit(&fr->yields, 1, memory_order_relaxed);
		if (now_s() > end) {
			atomic_store(&fr->starved, 1);
			for (int i = 0; i < 2; i++)
				atomic_store(&fr->flag[i], 1);
		}
	}
}

static void *spinner_spawning_setter(void *arg)
{
	ck_assert_int_eq(zk_spawn(NULL, set_flag0, arg), 0);
	spin_until_flags(arg);
	return NULL;
}

struct plain_spawn {
	zk_runtime_t *rt;
	struct fair *fr;
	int wait_spinners;
};

/* A plain thread spawns the second setter once the spinners spin. */
static void *plain_spawns_setter(void *arg)
{
	struct plain_spawn *ps = arg;
	double end = now_s() + 10;
	while (atomic_load(&ps->fr->spinning) < ps->wait_spinners && now_s() < end)
		sleep_ms(1);
	sleep_ms(5);
	zk_spawn_opts_t so = { .name = "plain-setter" };
	ck_assert_int_eq(zk_spawn_ex(ps->rt, NULL, set_flag1, ps->fr, &so), 0);
	return NULL;
}

START_TEST(test_yield_loop_cannot_starve_other_fibers_on_one_worker)
{
	struct fair fr;
	memset(&fr, 0, sizeof(fr));
	fr.need = 2;
	zk_runtime_t *rt = rt_new(1, 0);
	/* setter 0 is spawned by the spinner itself; setter 1 comes from a
	 * plain thread (the global injector) while the spinner spins */
	ck_assert_int_eq(zk_spawn_ex(rt, NULL, spinner_spawning_setter, &fr, NULL), 0);
	struct plain_spawn ps = { rt, &fr, 1 };
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, plain_spawns_setter, &ps), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	pthread_join(th, NULL);
	ck_assert_msg(!atomic_load(&fr.starved), "a yield loop starved the fibers that end it");
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

static void fair_body(int w, void *arg)
{
	struct fair *fr = arg;
	if (w == 0)
		ck_assert_int_eq(zk_spawn(NULL, set_flag0, fr), 0);
	spin_until_flags(fr);
}

struct fair_run {
	zk_runtime_t *rt;
	struct fair *fr;
};

static void *fair_runner(void *arg)
{
	struct fair_run *r = arg;
	on_each_worker(r->rt, 2, 1, fair_body, r->fr);
	return NULL;
}

START_TEST(test_yield_loops_on_both_workers_cannot_starve_other_fibers)
{
	struct fair fr;
	memset(&fr, 0, sizeof(fr));
	fr.need = 2;
	zk_runtime_t *rt = rt_new(2, 0);
	/* Both workers spin in a yield loop; one setter is spawned on worker
	 * 0 by its spinner, the other from a plain thread. */
	struct plain_spawn ps = { rt, &fr, 2 };
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, plain_spawns_setter, &ps), 0);
	struct fair_run r = { rt, &fr };
	fair_runner(&r);
	pthread_join(th, NULL);
	ck_assert_msg(!atomic_load(&fr.starved), "yield loops starved the fibers that end them");
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

/* Two fibers that wake each other forever (each wake lands in the LIFO
 * slot) must not starve a third fiber waiting in the yield queue. */
struct pair_arg {
	struct fair *fr;
	int me;
};

static void *waker_pair(void *arg)
{
	struct pair_arg *pa = arg;
	struct fair *fr = pa->fr;
	int me = pa->me;
	double end = now_s() + 10;
	for (;;) {
		baton_wait(&fr->b, me);
		int stop = atomic_load(&fr->flag[0]);
		if (!stop && now_s() > end) {
			atomic_store(&fr->starved, 1);
			atomic_store(&fr->flag[0], 1);
			stop = 1;
		}
		baton_pass(&fr->b, me);
		if (stop)
			break;
	}
	return NULL;
}

static void *yield_then_set(void *arg)
{
	zk_yield(); /* now in the queue that is looked at last */
	atomic_store(&((struct fair *)arg)->flag[0], 1);
	return NULL;
}

static void *wake_chain_root(void *arg)
{
	struct fair *fr = arg;
	zk_fiber_t *a, *b, *c;
	struct pair_arg pa[2] = { { fr, 0 }, { fr, 1 } };
	ck_assert_int_eq(zk_spawn(&a, waker_pair, &pa[0]), 0);
	ck_assert_int_eq(zk_spawn(&b, waker_pair, &pa[1]), 0);
	ck_assert_int_eq(zk_spawn(&c, yield_then_set, fr), 0);
	zk_join(a, NULL);
	zk_join(b, NULL);
	zk_join(c, NULL);
	return NULL;
}

START_TEST(test_fibers_waking_each_other_cannot_starve_a_yielded_fiber)
{
	struct fair fr;
	memset(&fr, 0, sizeof(fr));
	baton_init(&fr.b);
	zk_runtime_t *rt = rt_new(1, 0);
	run_main(rt, wake_chain_root, &fr, "chain-root");
	ck_assert_msg(!atomic_load(&fr.starved), "a wake chain starved a yielded fiber");
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

/* ---- spreading a spawn flood ---------------------------------------------- */

struct flood {
	_Atomic long ran[2];
	int root_worker;
	int hold;         /* root keeps its worker busy until the others ran */
	int settle_us;    /* root first sleeps this long: its worker runs dry */
	long n;
	_Atomic int timed_out;
};

static void *flood_child(void *arg)
{
	struct flood *fl = arg;
	double end = now_s() + 5e-6; /* a little work, so that stealing pays */
	while (now_s() < end)
		;
	int w = zk_worker_index();
	if (w == 0 || w == 1)
		atomic_fetch_add(&fl->ran[w], 1);
	return NULL;
}

static void *flood_root(void *arg)
{
	struct flood *fl = arg;
	if (fl->settle_us)
		ck_assert_int_eq(zk_sleep_ns((int64_t)fl->settle_us * 1000), 0);
	fl->root_worker = zk_worker_index();
	for (long i = 0; i < fl->n; i++)
		ck_assert_int_eq(zk_spawn(NULL, flood_child, fl), 0);
	if (fl->hold) {
		/* Do not yield: the fibers left in this worker's deque can only
		 * run if the other worker steals them. */
		double end = now_s() + 30;
		while (atomic_load(&fl->ran[1 - fl->root_worker]) < fl->n)
			if (now_s() > end) {
				atomic_store(&fl->timed_out, 1);
				break;
			}
	}
	return NULL;
}

static void flood_run(struct flood *fl, zk_worker_stats_t st[2])
{
	zk_runtime_t *rt = rt_new(2, 0);
	run_main(rt, flood_root, fl, "flood-root");
	ck_assert_int_eq(atomic_load(&fl->ran[0]) + atomic_load(&fl->ran[1]), fl->n);
	ck_assert_int_eq(zk_runtime_stats(rt, st, 2), 2);
	if (getenv("ZK_TEST_VERBOSE"))
		fprintf(stderr, "flood from worker %d: ran %ld / %ld, steals %llu / %llu, injector %llu / %llu\n",
			fl->root_worker, atomic_load(&fl->ran[0]), atomic_load(&fl->ran[1]),
			(unsigned long long)st[0].steals, (unsigned long long)st[1].steals,
			(unsigned long long)st[0].injector_pops, (unsigned long long)st[1].injector_pops);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}

START_TEST(test_spawn_flood_from_one_worker_is_spread_over_both)
{
	/* 10,000 spawns overflow the deque (ZK__DEQUE_SIZE slots): the other worker gets
	 * its share through stealing and through the global injector. */
	struct flood fl;
	memset(&fl, 0, sizeof(fl));
	fl.n = 10000;
	zk_worker_stats_t st[2];
	flood_run(&fl, st);
	int other = 1 - fl.root_worker;
	ck_assert_uint_gt(st[0].fibers_run, 0);
	ck_assert_uint_gt(st[1].fibers_run, 0);
	ck_assert_uint_gt(st[other].steals + st[other].injector_pops, 0);
	ck_assert_msg(atomic_load(&fl.ran[other]) >= fl.n / 10,
		      "worker %d ran only %ld of %ld flooded fibers", other, atomic_load(&fl.ran[other]), fl.n);
}
END_TEST

/* A flood of n fibers from a root that (after sleeping settle_us, if
 * any) holds its worker until the other worker has run every one of
 * them, which it must.  Returns the root's worker. */
static int flood_held(long n, int settle_us, zk_worker_stats_t st[2])
{
	struct flood fl;
	memset(&fl, 0, sizeof(fl));
	fl.n = n;
	fl.hold = 1;
	fl.settle_us = settle_us;
	flood_run(&fl, st);
	int other = 1 - fl.root_worker;
	ck_assert_msg(!atomic_load(&fl.timed_out), "the idle worker did not take the flood (ran %ld of %ld)",
		      atomic_load(&fl.ran[other]), fl.n);
	ck_assert_int_eq(atomic_load(&fl.ran[other]), fl.n);
	return fl.root_worker;
}

START_TEST(test_idle_worker_steals_from_a_busy_workers_deque)
{
	/* The flooding fiber keeps its worker busy: every fiber, including
	 * those left in that worker's deque, must be run by the other worker,
	 * and the deque's can only get there by stealing. */
	zk_worker_stats_t st[2];
	int root = flood_held(10000, 0, st);
	int other = 1 - root;
	ck_assert_msg(st[other].steals > 0, "worker %d never stole", other);
	ck_assert_uint_gt(st[root].fibers_run, 0);
}
END_TEST

START_TEST(test_a_small_flood_from_a_worker_that_just_ran_dry_reaches_the_idle_one)
{
	/* As above, but the flooding worker ran out of work a moment ago and
	 * the flood is small (spawned well within a millisecond, no deque
	 * overflow), so under lazy spreading (two workers sharing the poller)
	 * its pushes wake nobody: a sleeping worker must notice that this one
	 * has stopped running fibers and take them all. */
	zk_worker_stats_t st[2];
	flood_held(100, 200, st);
}
END_TEST

/* ---- plain threads: spawn and join --------------------------------------- */

struct plain {
	zk_runtime_t *rt;
	struct event keeper_ev;
	_Atomic int keeper_running;
	_Atomic int release;
	zk_fiber_t *early[100];
	_Atomic int failures;
};

static void *times_two(void *arg)
{
	if ((intptr_t)arg % 3 == 0)
		zk_yield();
	return (void *)((intptr_t)arg * 2);
}

static void *keeper(void *arg)
{
	struct plain *p = arg;
	atomic_store(&p->keeper_running, 1);
	event_wait(&p->keeper_ev, "keeper", 0);
	return NULL;
}

static void *wait_for_release(void *arg)
{
	struct plain *p = arg;
	double end = now_s() + 10;
	while (!atomic_load(&p->release) && now_s() < end)
		zk_yield();
	return (void *)(intptr_t)(atomic_load(&p->release) ? 42 : -1);
}

static void *spawn_before_run(void *arg)
{
	struct plain *p = arg;
	for (intptr_t i = 0; i < 100; i++)
		if (zk_spawn_ex(p->rt, &p->early[i], times_two, (void *)i, NULL) != 0)
			atomic_fetch_add(&p->failures, 1);
	return NULL;
}

static void *release_later(void *arg)
{
	sleep_ms(50);
	atomic_store(&((struct plain *)arg)->release, 1);
	return NULL;
}

#define PLAIN_N 1000

static void *plain_during_run(void *arg)
{
	struct plain *p = arg;
	static zk_fiber_t *f[PLAIN_N];
	double end = now_s() + 10;
	while (!atomic_load(&p->keeper_running) && now_s() < end)
		sleep_ms(1);
	if (!atomic_load(&p->keeper_running))
		atomic_fetch_add(&p->failures, 1000000);
	/* Not a worker: zk_spawn refuses, zk_spawn_ex needs the runtime. */
	if (zk_spawn(NULL, times_two, NULL) != -EPERM)
		atomic_fetch_add(&p->failures, 1);
	if (zk_spawn_ex(NULL, NULL, times_two, NULL, NULL) != -EINVAL)
		atomic_fetch_add(&p->failures, 1);
	/* Spawn while the runtime runs, join from here. */
	for (intptr_t i = 0; i < PLAIN_N; i++)
		if (zk_spawn_ex(p->rt, &f[i], times_two, (void *)(i + 1000), NULL) != 0)
			atomic_fetch_add(&p->failures, 1);
	for (int i = 0; i < PLAIN_N; i++) {
		void *r = NULL;
		if (zk_join(f[i], &r) != 0 || (intptr_t)r != 2 * (i + 1000))
			atomic_fetch_add(&p->failures, 1);
	}
	/* The fibers another plain thread spawned before the run. */
	for (int i = 0; i < 100; i++) {
		void *r = NULL;
		if (zk_join(p->early[i], &r) != 0 || (intptr_t)r != 2 * i)
			atomic_fetch_add(&p->failures, 1);
	}
	/* A join that must block: the fiber ends only once a third thread
	 * releases it. */
	zk_fiber_t *w;
	pthread_t rel;
	if (zk_spawn_ex(p->rt, &w, wait_for_release, p, NULL) != 0)
		atomic_fetch_add(&p->failures, 1);
	pthread_create(&rel, NULL, release_later, p);
	void *r = NULL;
	if (zk_join(w, &r) != 0 || (intptr_t)r != 42)
		atomic_fetch_add(&p->failures, 1);
	pthread_join(rel, NULL);
	/* Wake a parked fiber from here: the keeper lets the runtime end. */
	event_set(&p->keeper_ev);
	return NULL;
}

START_TEST(test_spawn_and_join_from_plain_threads)
{
	struct plain p;
	memset(&p, 0, sizeof(p));
	p.rt = rt_new(2, 0);
	pthread_t th;
	/* before the run, from a thread that is not the one that will run it */
	ck_assert_int_eq(pthread_create(&th, NULL, spawn_before_run, &p), 0);
	pthread_join(th, NULL);
	ck_assert_int_eq(zk_spawn_ex(p.rt, NULL, keeper, &p, NULL), 0);
	ck_assert_int_eq(pthread_create(&th, NULL, plain_during_run, &p), 0);
	struct watchdog wd;
	watchdog_start(&wd, p.rt, 0, 30, "plain-thread spawn/join", NULL);
	ck_assert_int_eq(zk_runtime_run(p.rt), 0);
	watchdog_stop(&wd);
	pthread_join(th, NULL);
	ck_assert_int_eq(atomic_load(&p.failures), 0);
	zk_worker_stats_t st[2];
	ck_assert_int_eq(zk_runtime_stats(p.rt, st, 2), 2);
	ck_assert_uint_gt(st[0].injector_pops + st[1].injector_pops, 0);
	ck_assert_int_eq(zk_runtime_destroy(p.rt), 0);
}
END_TEST

/* ---- the fiber dump ---------------------------------------------------------- */

struct dumpt {
	zk_runtime_t *rt;
	struct event ev[3];
	zk_fiber_t *parked[3];
	int fd;
	int listed;
	uint64_t root_id, new_id;
};

static void *dump_parker(void *arg)
{
	return (void *)(intptr_t)event_wait(arg, "dump-event", 0);
}

static void *dump_root(void *arg)
{
	struct dumpt *d = arg;
	char name[32];
	for (int i = 0; i < 3; i++) {
		snprintf(name, sizeof(name), "dump-parked-%d", i);
		zk_spawn_opts_t so = { .name = name };
		ck_assert_int_eq(zk_spawn_ex(NULL, &d->parked[i], dump_parker, &d->ev[i], &so), 0);
	}
	for (int tries = 0; tries < 1000; tries++) {
		int n = 0;
		for (int i = 0; i < 3; i++)
			n += fiber_state(d->parked[i]) == ZK__PARKED;
		if (n == 3)
			break;
		zk_yield();
	}
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(fiber_state(d->parked[i]), ZK__PARKED);
	/* one more that has not run yet (one worker: it runs when we wait) */
	zk_fiber_t *nf;
	zk_spawn_opts_t so = { .name = "dump-new" };
	ck_assert_int_eq(zk_spawn_ex(NULL, &nf, nop, NULL, &so), 0);
	d->new_id = zk_fiber_id(nf);
	d->root_id = zk_fiber_id(zk_self());
	d->listed = zk_runtime_dump(d->rt, d->fd);
	for (int i = 0; i < 3; i++) {
		event_set(&d->ev[i]);
		void *r;
		ck_assert_int_eq(zk_join(d->parked[i], &r), 0);
		ck_assert_int_eq((intptr_t)r, 0);
	}
	ck_assert_int_eq(zk_join(nf, NULL), 0);
	return NULL;
}

/* The line of the dump that mentions `needle`, or fail. */
static const char *dump_line(const char *text, const char *needle, char *line, size_t size)
{
	const char *p = strstr(text, needle);
	ck_assert_msg(p != NULL, "\"%s\" not in the dump:\n%s", needle, text);
	const char *b = p;
	while (b > text && b[-1] != '\n')
		b--;
	const char *e = strchr(p, '\n');
	ck_assert_ptr_nonnull(e);
	size_t n = (size_t)(e - b) < size - 1 ? (size_t)(e - b) : size - 1;
	memcpy(line, b, n);
	line[n] = 0;
	return line;
}

START_TEST(test_runtime_dump_lists_every_live_fiber_with_name_and_state)
{
	struct dumpt d;
	memset(&d, 0, sizeof(d));
	d.rt = rt_new(1, 0);
	FILE *tmp = tmpfile();
	ck_assert_ptr_nonnull(tmp);
	d.fd = fileno(tmp);
	run_main(d.rt, dump_root, &d, "dump-root");
	ck_assert_int_eq(d.listed, 5); /* root + 3 parked + 1 new */

	char text[8192];
	ssize_t n = pread(d.fd, text, sizeof(text) - 1, 0);
	ck_assert_int_gt(n, 0);
	text[n] = 0;
	int lines = 0;
	for (ssize_t i = 0; i < n; i++)
		lines += text[i] == '\n';
	ck_assert_msg(lines == 5, "one line per live fiber expected, got %d:\n%s", lines, text);
	char line[256], id[32];
	for (int i = 0; i < 3; i++) {
		char name[32];
		snprintf(name, sizeof(name), "dump-parked-%d", i);
		dump_line(text, name, line, sizeof(line));
		ck_assert_msg(strstr(line, "parked") && strstr(line, "dump-event"),
			      "parked fiber's line lacks state or wait: %s", line);
		ck_assert_msg(strstr(line, "worker 0"), "no worker in: %s", line);
	}
	dump_line(text, "dump-root", line, sizeof(line));
	ck_assert_msg(strstr(line, "running"), "root should be running: %s", line);
	snprintf(id, sizeof(id), "%llu", (unsigned long long)d.root_id);
	ck_assert_msg(strstr(line, id), "root's id %s missing: %s", id, line);
	dump_line(text, "dump-new", line, sizeof(line));
	ck_assert_msg(strstr(line, "new"), "never-run fiber should be new: %s", line);
	snprintf(id, sizeof(id), "%llu", (unsigned long long)d.new_id);
	ck_assert_msg(strstr(line, id), "id %s missing: %s", id, line);

	/* nothing live any more */
	ck_assert_int_eq(zk_runtime_dump(d.rt, d.fd), 0);
	ck_assert_int_eq(zk_runtime_dump(NULL, d.fd), -EINVAL);
	fclose(tmp);
	ck_assert_int_eq(zk_runtime_destroy(d.rt), 0);
}
END_TEST

struct sigdump {
	zk_runtime_t *rt;
	zk_fiber_t *f;
	struct event ev;
	int ctl;
	_Atomic int failed;
};

static void *sig_trigger(void *arg)
{
	struct sigdump *sd = arg;
	double end = now_s() + 10;
	while (fiber_state(sd->f) != ZK__PARKED && now_s() < end)
		sleep_ms(1);
	if (zk_dump_on_signal(SIGUSR1) != 0)
		atomic_store(&sd->failed, 1);
	raise(SIGUSR1);
	char c;
	if (read(sd->ctl, &c, 1) != 1) /* the parent has seen the dump */
		atomic_store(&sd->failed, 1);
	event_set(&sd->ev);
	return NULL;
}

static void *sig_parked(void *arg)
{
	event_wait(arg, "sig-event", 0);
	return NULL;
}

START_TEST(test_dump_on_signal_writes_the_dump_to_stderr)
{
	int err[2], ctl[2];
	ck_assert_int_eq(pipe(err), 0);
	ck_assert_int_eq(pipe(ctl), 0);
	fflush(NULL);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		close(err[0]);
		close(ctl[1]);
		dup2(err[1], 2);
		alarm(30);
		static struct sigdump sd;
		sd.ctl = ctl[0];
		sd.rt = rt_new(1, 0);
		zk_spawn_opts_t so = { .name = "sig-parked" };
		if (zk_spawn_ex(sd.rt, &sd.f, sig_parked, &sd.ev, &so) != 0)
			_exit(2);
		pthread_t th;
		pthread_create(&th, NULL, sig_trigger, &sd);
		if (zk_runtime_run(sd.rt) != 0)
			_exit(3);
		pthread_join(th, NULL);
		zk_join(sd.f, NULL);
		_exit(atomic_load(&sd.failed) ? 4 : 0);
	}
	close(err[1]);
	close(ctl[0]);
	static char out[65536];
	size_t len = 0;
	int seen = 0;
	double end = now_s() + 20;
	while (len < sizeof(out) - 1) {
		struct pollfd pe = { .fd = err[0], .events = POLLIN };
		int ms = (int)((end - now_s()) * 1000);
		if (ms <= 0 || poll(&pe, 1, ms) <= 0)
			break;
		ssize_t r = read(err[0], out + len, sizeof(out) - 1 - len);
		if (r <= 0)
			break;
		len += (size_t)r;
		out[len] = 0;
		const char *l = strstr(out, "sig-parked");
		if (!seen && strstr(out, "zokio: fiber dump") && l && strchr(l, '\n')) {
			seen = 1;
			ck_assert_int_eq(write(ctl[1], "x", 1), 1);
		}
	}
	out[len] = 0;
	close(err[0]);
	close(ctl[1]);
	int st;
	if (waitpid(pid, &st, WNOHANG) == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &st, 0);
	}
	ck_assert_msg(seen, "no dump naming the parked fiber on stderr; got \"%.1500s\"", out);
	char line[256];
	dump_line(out, "sig-parked", line, sizeof(line));
	ck_assert_msg(strstr(line, "parked") && strstr(line, "sig-event"), "bad dump line: %s", line);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status 0x%x; stderr \"%.1500s\"", st, out);
}
END_TEST

/* ---- shutdown ------------------------------------------------------------ */

struct shut {
	zk_runtime_t *rt;
	struct event never_set;
	_Atomic int runners_started;
	_Atomic int parkers_parked;
	_Atomic int never_ran;
	_Atomic int runner_timeouts;
	int nrunners, nparkers;
};

static void *cancel_runner(void *arg)
{
	struct shut *sh = arg;
	atomic_fetch_add(&sh->runners_started, 1);
	double end = now_s() + 10;
	while (!zk_cancelled()) {
		if (now_s() > end) {
			atomic_fetch_add(&sh->runner_timeouts, 1);
			return NULL;
		}
		zk_yield();
	}
	return (void *)7;
}

static int count_parked_publish(zk_fiber_t *self, void *arg)
{
	struct shut *sh = arg;
	atomic_fetch_add(&sh->parkers_parked, 1);
	return 0; /* no waker but zk_cancel */
}

static void *cancel_parker(void *arg)
{
	struct shut *sh = arg;
	int rc = zk__park("forever", count_parked_publish, sh, ZK__PARK_CANCELLABLE);
	return (void *)(intptr_t)rc;
}

static void *never_runs(void *arg)
{
	atomic_store(&((struct shut *)arg)->never_ran, 1);
	return NULL;
}

static void *shutdown_root(void *arg)
{
	struct shut *sh = arg;
	zk_fiber_t *u, *c, *n;
	ck_assert_int_eq(zk_spawn(&u, cancel_runner, sh), 0);
	ck_assert_int_eq(zk_spawn(&c, cancel_parker, sh), 0);
	for (int i = 0; i < 1000 && !(atomic_load(&sh->runners_started) && atomic_load(&sh->parkers_parked)); i++)
		zk_yield();
	ck_assert_int_eq(atomic_load(&sh->parkers_parked), 1);
	ck_assert_int_eq(zk_spawn(&n, never_runs, sh), 0); /* one worker: not started yet */
	ck_assert_int_eq(zk_cancelled(), 0);
	zk_runtime_shutdown(sh->rt);
	ck_assert_int_eq(zk_cancelled(), 1); /* the running caller is cancelled too */
	void *r;
	ck_assert_int_eq(zk_join(u, &r), 0);
	ck_assert_int_eq((intptr_t)r, 7);
	ck_assert_int_eq(zk_join(c, &r), 0);
	ck_assert_int_eq((intptr_t)r, -ECANCELED);
	ck_assert_int_eq(zk_join(n, &r), -ECANCELED);
	return (void *)1;
}

START_TEST(test_shutdown_cancels_running_parked_and_unstarted_fibers)
{
	struct shut sh;
	memset(&sh, 0, sizeof(sh));
	sh.rt = rt_new(1, 0);
	ck_assert_int_eq((intptr_t)run_main(sh.rt, shutdown_root, &sh, "shutdown-root"), 1);
	ck_assert_int_eq(atomic_load(&sh.never_ran), 0);
	ck_assert_int_eq(atomic_load(&sh.runner_timeouts), 0);
	ck_assert_int_eq(zk_runtime_destroy(sh.rt), 0);
}
END_TEST

static void *shutdown_from_plain(void *arg)
{
	struct shut *sh = arg;
	double end = now_s() + 10;
	while ((atomic_load(&sh->runners_started) < sh->nrunners ||
		atomic_load(&sh->parkers_parked) < sh->nparkers) && now_s() < end)
		sleep_ms(1);
	zk_runtime_shutdown(sh->rt);
	return NULL;
}

START_TEST(test_shutdown_from_a_plain_thread_ends_a_two_worker_run)
{
	enum { R = 6, P = 6 };
	struct shut sh;
	memset(&sh, 0, sizeof(sh));
	sh.nrunners = R;
	sh.nparkers = P;
	sh.rt = rt_new(2, 0);
	zk_fiber_t *u[R], *c[P];
	for (int i = 0; i < R; i++)
		ck_assert_int_eq(zk_spawn_ex(sh.rt, &u[i], cancel_runner, &sh, NULL), 0);
	for (int i = 0; i < P; i++)
		ck_assert_int_eq(zk_spawn_ex(sh.rt, &c[i], cancel_parker, &sh, NULL), 0);
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, shutdown_from_plain, &sh), 0);
	struct watchdog wd;
	watchdog_start(&wd, sh.rt, 0, 30, "shutdown", NULL);
	ck_assert_int_eq(zk_runtime_run(sh.rt), 0);
	watchdog_stop(&wd);
	pthread_join(th, NULL);
	ck_assert_int_eq(atomic_load(&sh.runner_timeouts), 0);
	for (int i = 0; i < R; i++) {
		void *r;
		ck_assert_int_eq(zk_join(u[i], &r), 0);
		ck_assert_int_eq((intptr_t)r, 7);
	}
	for (int i = 0; i < P; i++) {
		void *r;
		ck_assert_int_eq(zk_join(c[i], &r), 0);
		ck_assert_int_eq((intptr_t)r, -ECANCELED);
	}
	ck_assert_int_eq(zk_runtime_destroy(sh.rt), 0);
}
END_TEST

/* The usual shape of a service: a signal thread calls shutdown, the main
 * thread's run returns once the last fiber has ended - possibly while
 * shutdown is still walking the runtime - and destroys the runtime at
 * once.  Destroy must wait for shutdown to be done with it (ASan and TSan
 * see it if not). */
START_TEST(test_destroy_right_after_a_plain_thread_shutdown_waits_for_it)
{
	for (int round = 0; round < 20; round++) {
		struct shut *sh = calloc(1, sizeof(*sh));
		sh->nparkers = 4;
		sh->rt = rt_new(2, 0);
		for (int i = 0; i < sh->nparkers; i++)
			ck_assert_int_eq(zk_spawn_ex(sh->rt, NULL, cancel_parker, sh, NULL), 0);
		pthread_t th;
		ck_assert_int_eq(pthread_create(&th, NULL, shutdown_from_plain, sh), 0);
		ck_assert_int_eq(zk_runtime_run(sh->rt), 0);
		ck_assert_int_eq(zk_runtime_destroy(sh->rt), 0);
		pthread_join(th, NULL);
		free(sh);
	}
}
END_TEST

/* ---- configuration ----------------------------------------------------------- */

static int workers_of(const zk_runtime_opts_t *o)
{
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, o), 0);
	zk_worker_stats_t st[1];
	int n = zk_runtime_stats(rt, st, 1);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
	return n;
}

static void nothing(int w, void *arg)
{
	(void)w;
	(void)arg;
}

START_TEST(test_zokio_workers_env_sets_the_worker_count)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	ck_assert_int_eq(o.workers, 0);
	int cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
	unsetenv("ZOKIO_WORKERS");
	ck_assert_int_eq(workers_of(&o), cpus);
	ck_assert_int_eq(workers_of(NULL), cpus);
	setenv("ZOKIO_WORKERS", "3", 1);
	ck_assert_int_eq(workers_of(&o), 3);
	ck_assert_int_eq(workers_of(NULL), 3);
	o.workers = 2; /* an explicit option wins */
	ck_assert_int_eq(workers_of(&o), 2);
	o.workers = 0;
	setenv("ZOKIO_WORKERS", "1", 1);
	ck_assert_int_eq(workers_of(&o), 1);
	setenv("ZOKIO_WORKERS", "bogus", 1);
	ck_assert_int_eq(workers_of(&o), cpus);

	/* and the three workers really run fibers */
	setenv("ZOKIO_WORKERS", "3", 1);
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, NULL), 0);
	on_each_worker(rt, 3, 1, nothing, NULL);
	zk_worker_stats_t st[3];
	ck_assert_int_eq(zk_runtime_stats(rt, st, 3), 3);
	for (int i = 0; i < 3; i++)
		ck_assert_uint_gt(st[i].fibers_run, 0);
	ck_assert_int_eq(zk_runtime_stats(NULL, st, 3), -EINVAL);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
	unsetenv("ZOKIO_WORKERS");
}
END_TEST

static Suite *sched_suite(void)
{
	Suite *s = suite_create("sched");
	TCase *tc = tcase_create("deque");
	tcase_set_timeout(tc, 90);
	tcase_add_test(tc, test_deque_push_take_steal_edges);
	tcase_add_test(tc, test_deque_every_item_taken_exactly_once_with_two_thieves);
	suite_add_tcase(s, tc);

	tc = tcase_create("scale");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_million_fibers_on_two_workers_with_yields_wakes_and_joins);
	suite_add_tcase(s, tc);

	tc = tcase_create("wakeups");
	tcase_set_timeout(tc, 300);
	tcase_add_test(tc, test_token_pingpong_across_workers_loses_no_wakeups);
	tcase_add_test(tc, test_park_unpark_pingpong_across_workers_loses_no_wakeups);
	tcase_add_test(tc, test_park_unpark_permit_semantics);
	tcase_add_test(tc, test_cancel_racing_a_park_always_wakes_the_fiber);
	tcase_add_test(tc, test_cancel_racing_a_park_without_membarrier);
	suite_add_tcase(s, tc);

	tc = tcase_create("placement");
	tcase_set_timeout(tc, 90);
	tcase_add_test(tc, test_pinned_fibers_never_change_worker);
	tcase_add_test(tc, test_no_migration_keeps_started_fibers_on_their_worker);
	tcase_add_test(tc, test_unpinned_fibers_may_migrate_when_woken_across_workers);
	tcase_add_test(tc, test_spawn_flood_from_one_worker_is_spread_over_both);
	tcase_add_test(tc, test_idle_worker_steals_from_a_busy_workers_deque);
	tcase_add_test(tc, test_a_small_flood_from_a_worker_that_just_ran_dry_reaches_the_idle_one);
	suite_add_tcase(s, tc);

	tc = tcase_create("fairness");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_yield_loop_cannot_starve_other_fibers_on_one_worker);
	tcase_add_test(tc, test_yield_loops_on_both_workers_cannot_starve_other_fibers);
	tcase_add_test(tc, test_fibers_waking_each_other_cannot_starve_a_yielded_fiber);
	suite_add_tcase(s, tc);

	tc = tcase_create("threads");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_spawn_and_join_from_plain_threads);
	tcase_add_test(tc, test_shutdown_cancels_running_parked_and_unstarted_fibers);
	tcase_add_test(tc, test_shutdown_from_a_plain_thread_ends_a_two_worker_run);
	tcase_add_test(tc, test_destroy_right_after_a_plain_thread_shutdown_waits_for_it);
	suite_add_tcase(s, tc);

	tc = tcase_create("observability");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_runtime_dump_lists_every_live_fiber_with_name_and_state);
	tcase_add_test(tc, test_dump_on_signal_writes_the_dump_to_stderr);
	tcase_add_test(tc, test_zokio_workers_env_sets_the_worker_count);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(sched_suite());
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
