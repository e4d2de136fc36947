/*
 * test_fiber.c - fibers on one worker: spawn/join order and results, exit,
 * detach, yield order, names, fiber-local storage, many fibers alive at
 * once, recursive spawning, and the runtime life cycle; and, across two
 * workers and from plain threads, the end combinators (zk_join_timed,
 * zk_wait_first) with their timeouts and cancellation.
 */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "zokio.h"

static zk_runtime_t *rt1(void)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = 1;
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
	return rt;
}

/* Run fn(arg) as the first fiber of a one-worker runtime; return its result. */
static void *run1(zk_fiber_fn fn, void *arg)
{
	zk_runtime_t *rt = rt1();
	zk_fiber_t *f;
	void *res = NULL;
	ck_assert_int_eq(zk_spawn_ex(rt, &f, fn, arg, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_join(f, &res), 0);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
	return res;
}

static void *add_one(void *arg)
{
	return (void *)((intptr_t)arg + 1);
}

static void *spawn_join_many(void *arg)
{
	enum { N = 1000 };
	zk_fiber_t *f[N];
	for (intptr_t i = 0; i < N; i++)
		ck_assert_int_eq(zk_spawn(&f[i], add_one, (void *)i), 0);
	intptr_t sum = 0;
	for (int i = N - 1; i >= 0; i--) { /* join in reverse: order must not matter */
		void *r;
		ck_assert_int_eq(zk_join(f[i], &r), 0);
		ck_assert_int_eq((intptr_t)r, i + 1);
		sum += (intptr_t)r;
	}
	return (void *)sum;
}

START_TEST(test_join_returns_each_fibers_result)
{
	ck_assert_int_eq((intptr_t)run1(spawn_join_many, NULL), 1000 * 1001 / 2);
}
END_TEST

static int order[16];
static int norder;

static void *record(void *arg)
{
	order[norder++] = (int)(intptr_t)arg;
	return NULL;
}

static void *spawn_then_yield(void *arg)
{
	zk_fiber_t *f[3];
	for (intptr_t i = 0; i < 3; i++)
		ck_assert_int_eq(zk_spawn(&f[i], record, (void *)i), 0);
	ck_assert_int_eq(norder, 0); /* spawn does not run the child */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(zk_join(f[i], NULL), 0);
	ck_assert_int_eq(norder, 3);
	return NULL;
}

START_TEST(test_spawned_fiber_runs_only_when_spawner_waits)
{
	norder = 0;
	run1(spawn_then_yield, NULL);
}
END_TEST

static void *yielder(void *arg)
{
	for (int i = 0; i < 3; i++) {
		order[norder++] = (int)(intptr_t)arg;
		zk_yield();
	}
	return NULL;
}

static void *two_yielders(void *arg)
{
	zk_fiber_t *a, *b;
	zk_spawn(&a, yielder, (void *)1);
	zk_spawn(&b, yielder, (void *)2);
	zk_join(a, NULL);
	zk_join(b, NULL);
	return NULL;
}

START_TEST(test_yield_alternates_two_fibers)
{
	norder = 0;
	run1(two_yielders, NULL);
	ck_assert_int_eq(norder, 6);
	for (int i = 1; i < 6; i++)
		ck_assert_int_ne(order[i], order[i - 1]);
}
END_TEST

static volatile int exit_depth;

/* Recurses until exit_depth reaches 0, then leaves through zk_exit. */
static void deep_exit(void)
{
	if (exit_depth-- == 0)
		zk_exit((void *)42);
	else
		deep_exit();
	ck_abort_msg("zk_exit returned");
}

static void *exits_from_deep(void *arg)
{
	exit_depth = 10;
	deep_exit();
	return NULL;
}

static void *join_exiter(void *arg)
{
	zk_fiber_t *f;
	void *r = NULL;
	zk_spawn(&f, exits_from_deep, NULL);
	ck_assert_int_eq(zk_join(f, &r), 0);
	return r;
}

START_TEST(test_exit_from_nested_call_gives_join_its_result)
{
	ck_assert_int_eq((intptr_t)run1(join_exiter, NULL), 42);
}
END_TEST

static int detached_ran;

static void *detached_child(void *arg)
{
	zk_yield();
	detached_ran++;
	return NULL;
}

static void *spawn_detached(void *arg)
{
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn(NULL, detached_child, NULL), 0);
	ck_assert_int_eq(zk_spawn(&f, detached_child, NULL), 0);
	ck_assert_int_eq(zk_detach(f), 0);
	return NULL;
}

START_TEST(test_runtime_run_waits_for_detached_fibers)
{
	detached_ran = 0;
	run1(spawn_detached, NULL);
	ck_assert_int_eq(detached_ran, 2);
}
END_TEST

static void *self_join(void *arg)
{
	ck_assert_int_eq(zk_join(zk_self(), NULL), -EDEADLK);
	ck_assert_ptr_nonnull(zk_self());
	ck_assert_ptr_eq(zk_runtime_current(), arg);
	ck_assert_int_eq(zk_worker_index(), 0);
	return NULL;
}

START_TEST(test_self_join_is_edeadlk_and_context_queries_work)
{
	zk_runtime_t *rt = rt1();
	ck_assert_ptr_null(zk_self());
	ck_assert_int_eq(zk_worker_index(), -1);
	ck_assert_int_eq(zk_spawn(NULL, self_join, NULL), -EPERM);
	ck_assert_int_eq(zk_spawn_ex(rt, NULL, self_join, rt, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}
END_TEST

static void *named(void *arg)
{
	ck_assert_str_eq(zk_fiber_name(zk_self()), "worker-7");
	ck_assert_int_ne(zk_fiber_id(zk_self()), 0);
	return NULL;
}

START_TEST(test_fiber_names_are_copied_and_truncated)
{
	zk_runtime_t *rt = rt1();
	zk_fiber_t *f;
	char name[] = "worker-7";
	zk_spawn_opts_t so = { .name = name };
	ck_assert_int_eq(zk_spawn_ex(rt, &f, named, NULL, &so), 0);
	name[0] = 'X'; /* the copy must not change */
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_fiber_set_name(f, "a-very-long-name-that-goes-past-thirty-one-bytes"), 0);
	ck_assert_int_eq(strlen(zk_fiber_name(f)), 31);
	ck_assert_int_eq(zk_fiber_set_name(NULL, "x"), -EINVAL);
	ck_assert_int_eq(zk_join(f, NULL), 0);
	zk_runtime_destroy(rt);
}
END_TEST

static zk_key_t key;
static int dtor_calls;

static void count_dtor(void *v)
{
	dtor_calls += (int)(intptr_t)v;
}

static void *tls_user(void *arg)
{
	ck_assert_ptr_null(zk_key_get(key));
	ck_assert_int_eq(zk_key_set(key, arg), 0);
	zk_yield(); /* another fiber sets its own value meanwhile */
	ck_assert_ptr_eq(zk_key_get(key), arg);
	return NULL;
}

static void *tls_main(void *arg)
{
	zk_fiber_t *a, *b;
	zk_spawn(&a, tls_user, (void *)1);
	zk_spawn(&b, tls_user, (void *)10);
	zk_join(a, NULL);
	zk_join(b, NULL);
	return NULL;
}

START_TEST(test_fiber_local_values_are_per_fiber_and_destroyed_at_exit)
{
	dtor_calls = 0;
	ck_assert_int_eq(zk_key_create(&key, count_dtor), 0);
	ck_assert_int_eq(zk_key_set(key, (void *)1), -EPERM); /* not in a fiber */
	run1(tls_main, NULL);
	ck_assert_int_eq(dtor_calls, 11);
	ck_assert_int_eq(zk_key_delete(key), 0);
	ck_assert_int_eq(zk_key_delete(key), -EINVAL);
	ck_assert_int_eq(zk_key_delete(ZK_KEYS_MAX), -EINVAL);
}
END_TEST

static int started;
static int alive_n;

static void *wait_for_all_started(void *arg)
{
	/* stay alive, with a stack, until every one of them has started */
	started++;
	while (started < alive_n)
		zk_yield();
	return arg;
}

static void *hundred_thousand(void *arg)
{
	intptr_t N = alive_n;
	zk_fiber_t **f = malloc((size_t)N * sizeof(*f));
	started = 0;
	for (intptr_t i = 0; i < N; i++)
		ck_assert_int_eq(zk_spawn(&f[i], wait_for_all_started, (void *)i), 0);
	intptr_t sum = 0;
	for (int i = 0; i < N; i++) {
		void *r;
		ck_assert_int_eq(zk_join(f[i], &r), 0);
		sum += (intptr_t)r;
	}
	free(f);
	return (void *)sum;
}

START_TEST(test_100000_fibers_alive_at_once)
{
	/* 100,000 stacks: with mprotect guards that is 200,000 mappings, over
	 * the default vm.max_map_count; guard pages via MADV_GUARD_INSTALL or
	 * canaries are needed.  Use canary stacks of 16 KiB so the test does
	 * not depend on the kernel. */
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = 1;
	o.guard = ZK_GUARD_CANARY;
	o.stack_size = 16 * 1024;
	/* ZK_TEST_QUICK (set for the runs under valgrind) scales it down */
	alive_n = getenv("ZK_TEST_QUICK") ? 10000 : 100000;
#if defined(__SANITIZE_THREAD__)
	alive_n = 4000; /* TSan models each fiber as a thread: 8128 at most */
#endif
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
	zk_fiber_t *f;
	void *r;
	ck_assert_int_eq(zk_spawn_ex(rt, &f, hundred_thousand, NULL, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_join(f, &r), 0);
	ck_assert_int_eq((intptr_t)r, (intptr_t)alive_n * (alive_n - 1) / 2);
	zk_runtime_destroy(rt);
}
END_TEST

static void *tree(void *arg)
{
	intptr_t depth = (intptr_t)arg;
	if (depth == 0)
		return (void *)1;
	zk_fiber_t *l, *r;
	ck_assert_int_eq(zk_spawn(&l, tree, (void *)(depth - 1)), 0);
	ck_assert_int_eq(zk_spawn(&r, tree, (void *)(depth - 1)), 0);
	void *a, *b;
	zk_join(l, &a);
	zk_join(r, &b);
	return (void *)((intptr_t)a + (intptr_t)b);
}

START_TEST(test_fibers_spawn_fibers_recursively)
{
	ck_assert_int_eq((intptr_t)run1(tree, (void *)14), 1 << 14);
}
END_TEST

START_TEST(test_bad_options_and_arguments_are_rejected)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	zk_runtime_t *rt;
	o.guard = 7;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), -EINVAL);
	zk_runtime_opts_init(&o);
	o.workers = -1;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), -EINVAL);
	ck_assert_int_eq(zk_runtime_create(NULL, NULL), -EINVAL);
	ck_assert_int_eq(zk_runtime_run(NULL), -EINVAL);
	ck_assert_int_eq(zk_runtime_destroy(NULL), -EINVAL);
	ck_assert_int_eq(zk_join(NULL, NULL), -EINVAL);
	ck_assert_int_eq(zk_detach(NULL), -EINVAL);
	ck_assert_int_eq(zk_cancel(NULL), -EINVAL);
	ck_assert_int_eq(zk_spawn_ex(NULL, NULL, add_one, NULL, NULL), -EINVAL);
	rt = rt1();
	ck_assert_int_eq(zk_spawn_ex(rt, NULL, NULL, NULL, NULL), -EINVAL);
	zk_runtime_destroy(rt);
}
END_TEST

static void *never(void *arg)
{
	ck_abort_msg("a cancelled fiber that never started must not run");
	return NULL;
}

START_TEST(test_cancel_before_start_means_never_runs)
{
	zk_runtime_t *rt = rt1();
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn_ex(rt, &f, never, NULL, NULL), 0);
	ck_assert_int_eq(zk_cancel(f), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_join(f, NULL), -ECANCELED);
	zk_runtime_destroy(rt);
}
END_TEST

START_TEST(test_destroy_discards_fibers_never_run)
{
	zk_runtime_t *rt = rt1();
	for (int i = 0; i < 100; i++)
		ck_assert_int_eq(zk_spawn_ex(rt, NULL, never, NULL, NULL), 0);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0); /* leak-checked under ASan/valgrind */
}
END_TEST

static void *twice_main(void *arg)
{
	return (void *)((intptr_t)arg * 2);
}

START_TEST(test_runtime_can_run_again_and_zk_run_works)
{
	zk_runtime_t *rt = rt1();
	for (intptr_t i = 1; i <= 3; i++) {
		zk_fiber_t *f;
		void *r;
		ck_assert_int_eq(zk_spawn_ex(rt, &f, twice_main, (void *)i, NULL), 0);
		ck_assert_int_eq(zk_runtime_run(rt), 0);
		ck_assert_int_eq(zk_join(f, &r), 0);
		ck_assert_int_eq((intptr_t)r, 2 * i);
	}
	ck_assert_int_eq(zk_runtime_run(rt), 0); /* nothing to do: returns */
	zk_runtime_destroy(rt);
	void *r = NULL;
	ck_assert_int_eq(zk_run(twice_main, (void *)21, &r), 0);
	ck_assert_int_eq((intptr_t)r, 42);
}
END_TEST

static void *nested_run(void *arg)
{
	return (void *)(intptr_t)zk_runtime_run(arg);
}

START_TEST(test_run_from_inside_a_fiber_is_edeadlk)
{
	zk_runtime_t *rt = rt1();
	zk_fiber_t *f;
	void *r;
	zk_spawn_ex(rt, &f, nested_run, rt, NULL);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	zk_join(f, &r);
	ck_assert_int_eq((intptr_t)r, -EDEADLK);
	zk_runtime_destroy(rt);
}
END_TEST

/* ---- end combinators: zk_join_timed, zk_wait_first (two workers) --------- */

#define MS 1000000ll

static void run2(zk_fiber_fn fn, void *arg)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = 2;
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
	ck_assert_int_eq(zk_spawn_ex(rt, NULL, fn, arg, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}

/* A task that ends when its gate is posted, returning its tag (or the
 * wait's error, e.g. -ECANCELED). */
struct gated {
	zk_sem_t gate;
	intptr_t tag;
};

static void *gated_task(void *arg)
{
	struct gated *g = arg;
	int rc = zk_sem_wait(&g->gate);
	return (void *)(rc ? (intptr_t)rc : g->tag);
}

/* Spawn n gated tasks, alternating between the two workers. */
static void spawn_gated(zk_fiber_t **f, struct gated *g, int n, intptr_t tag0)
{
	for (int i = 0; i < n; i++) {
		ck_assert_int_eq(zk_sem_init(&g[i].gate, 0), 0);
		g[i].tag = tag0 + i;
		ck_assert_int_eq(zk_spawn_on(zk_runtime_current(), i % 2, &f[i], gated_task, &g[i], NULL),
				 0);
	}
}

static void *join_timed_waiter(void *arg)
{
	void *r = NULL;
	return (void *)(intptr_t)zk_join_timed(arg, &r, -1);
}

struct thread_join {
	zk_fiber_t *f;
	int rc_timeout, rc_wait;
	void *result;
	int finished;
};

/* From a plain thread: a timed join that expires, then a wait_first that
 * blocks until the task ends (the fiber side joins it). */
static void *thread_join_main(void *arg)
{
	struct thread_join *tj = arg;
	tj->rc_timeout = zk_join_timed(tj->f, &tj->result, zk_now_ns() + 2 * MS);
	tj->rc_wait = zk_wait_first(&tj->f, 1, -1, 0);
	__atomic_store_n(&tj->finished, 1, __ATOMIC_RELEASE);
	return NULL;
}

static void *join_timed_main(void *arg)
{
	zk_fiber_t *f;
	struct gated g;
	spawn_gated(&f, &g, 1, 40);
	void *r = (void *)1;
	/* a deadline that expires, one already past, the fiber's own */
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(zk_join_timed(f, &r, t0 + 3 * MS), -ETIMEDOUT);
	ck_assert_int_ge(zk_now_ns() - t0, 3 * MS);
	ck_assert_int_eq(zk_join_timed(f, &r, zk_now_ns() - 1), -ETIMEDOUT);
	ck_assert_int_eq(zk_deadline_set(zk_now_ns() + 2 * MS), 0);
	ck_assert_int_eq(zk_join_timed(f, &r, -1), -ETIMEDOUT);
	zk_deadline_clear();
	ck_assert_ptr_eq(r, (void *)1); /* untouched by the failures */

	/* a cancelled timed join leaves the task alone, and joinable */
	zk_fiber_t *w;
	ck_assert_int_eq(zk_spawn(&w, join_timed_waiter, f), 0);
	zk_sleep_ns(2 * MS);
	ck_assert_int_eq(zk_detach(f), -EBUSY); /* a wait on it is in progress */
	ck_assert_int_eq(zk_cancel(w), 0);
	void *wr;
	ck_assert_int_eq(zk_join(w, &wr), 0);
	ck_assert_int_eq((intptr_t)wr, -ECANCELED);

	/* a plain thread times out too, then waits for the end */
	struct thread_join tj = { .f = f };
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, thread_join_main, &tj), 0);
	zk_sleep_ns(10 * MS);
	ck_assert_int_eq(zk_sem_post(&g.gate), 0);
	ck_assert_int_eq(zk_wait_first(&f, 1, -1, 0), 0);
	/* the thread's wait uses the handle: keep it valid until that ends */
	for (int i = 0; i < 10000 && !__atomic_load_n(&tj.finished, __ATOMIC_ACQUIRE); i++)
		zk_sleep_ns(MS);
	ck_assert_int_eq(__atomic_load_n(&tj.finished, __ATOMIC_ACQUIRE), 1);
	pthread_join(th, NULL);
	ck_assert_int_eq(zk_join_timed(f, &r, zk_now_ns() + 10000 * MS), 0);
	ck_assert_int_eq((intptr_t)r, 40);
	ck_assert_int_eq(tj.rc_timeout, -ETIMEDOUT);
	ck_assert_int_eq(tj.rc_wait, 0);

	/* an ended task is joined even with a deadline already past */
	spawn_gated(&f, &g, 1, 41);
	ck_assert_int_eq(zk_sem_post(&g.gate), 0);
	ck_assert_int_eq(zk_wait_first(&f, 1, -1, 0), 0);
	ck_assert_int_eq(zk_join_timed(f, &r, zk_now_ns() - 1), 0);
	ck_assert_int_eq((intptr_t)r, 41);
	return NULL;
}

START_TEST(test_join_timed_expires_then_a_later_join_succeeds)
{
	run2(join_timed_main, NULL);
}
END_TEST

enum { WF_N = 40 }; /* more than fit on the stack: the allocated path too */

static void *wait_first_main(void *arg)
{
	zk_fiber_t *f[WF_N];
	static struct gated g[WF_N];
	spawn_gated(f, g, WF_N, 100);
	zk_sleep_ns(MS); /* most are parked at their gates by now */
	ck_assert_int_eq(zk_sem_post(&g[23].gate), 0);
	ck_assert_int_eq(zk_wait_first(f, WF_N, -1, 0), 23);
	/* nothing was consumed or cancelled: it still reports 23 at once */
	ck_assert_int_eq(zk_wait_first(f, WF_N, zk_now_ns() - 1, 0), 23);
	/* a subset without 23: the next one to end, on either worker */
	zk_fiber_t *sub[3] = { f[4], f[7], f[30] };
	ck_assert_int_eq(zk_sem_post(&g[7].gate), 0);
	ck_assert_int_eq(zk_wait_first(sub, 3, zk_now_ns() + 10000 * MS, 0), 1);
	for (int i = 0; i < WF_N; i++)
		if (i != 23 && i != 7)
			ck_assert_int_eq(zk_sem_post(&g[i].gate), 0);
	for (int i = 0; i < WF_N; i++) {
		void *r;
		ck_assert_int_eq(zk_join(f[i], &r), 0);
		ck_assert_int_eq((intptr_t)r, 100 + i); /* none was cancelled */
	}
	return NULL;
}

START_TEST(test_wait_first_returns_the_first_to_end_across_two_workers)
{
	run2(wait_first_main, NULL);
}
END_TEST

static void *cancel_rest_main(void *arg)
{
	enum { N = 6 };
	zk_fiber_t *f[N];
	struct gated g[N];
	spawn_gated(f, g, N, 200);
	ck_assert_int_eq(zk_sem_post(&g[4].gate), 0);
	ck_assert_int_eq(zk_wait_first(f, N, -1, ZK_WAIT_CANCEL_REST), 4);
	/* the others were cancelled: their gate waits end with -ECANCELED
	 * (or, if one had not started yet, it never runs: join says so) */
	for (int i = 0; i < N; i++) {
		void *r = NULL;
		int rc = zk_join(f[i], &r);
		if (i == 4) {
			ck_assert_int_eq(rc, 0);
			ck_assert_int_eq((intptr_t)r, 204);
		} else if (rc == 0) {
			ck_assert_int_eq((intptr_t)r, -ECANCELED);
		} else {
			ck_assert_int_eq(rc, -ECANCELED);
		}
	}
	return NULL;
}

START_TEST(test_wait_first_cancels_the_rest_when_asked)
{
	run2(cancel_rest_main, NULL);
}
END_TEST

struct wf_args {
	zk_fiber_t **f;
	int n;
};

static void *wait_first_waiter(void *arg)
{
	struct wf_args *a = arg;
	return (void *)(intptr_t)zk_wait_first(a->f, a->n, -1, ZK_WAIT_CANCEL_REST);
}

static void *wait_first_fails_main(void *arg)
{
	enum { N = 4 };
	zk_fiber_t *f[N];
	struct gated g[N];
	spawn_gated(f, g, N, 300);
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(zk_wait_first(f, N, t0 + 3 * MS, ZK_WAIT_CANCEL_REST), -ETIMEDOUT);
	ck_assert_int_ge(zk_now_ns() - t0, 3 * MS);
	ck_assert_int_eq(zk_wait_first(f, N, zk_now_ns() - 1, ZK_WAIT_CANCEL_REST), -ETIMEDOUT);
	ck_assert_int_eq(zk_deadline_set(zk_now_ns() + 2 * MS), 0);
	ck_assert_int_eq(zk_wait_first(f, N, -1, ZK_WAIT_CANCEL_REST), -ETIMEDOUT);
	zk_deadline_clear();
	/* a cancelled waiter returns -ECANCELED and cancels nobody */
	struct wf_args a = { f, N };
	zk_fiber_t *w;
	ck_assert_int_eq(zk_spawn(&w, wait_first_waiter, &a), 0);
	zk_sleep_ns(2 * MS);
	ck_assert_int_eq(zk_cancel(w), 0);
	void *wr;
	ck_assert_int_eq(zk_join(w, &wr), 0);
	ck_assert_int_eq((intptr_t)wr, -ECANCELED);
	/* bad calls */
	ck_assert_int_eq(zk_wait_first(f, 0, -1, 0), -EINVAL);
	ck_assert_int_eq(zk_wait_first(f, N, -1, 8), -EINVAL);
	ck_assert_int_eq(zk_wait_first(NULL, 1, -1, 0), -EINVAL);
	zk_fiber_t *me[2] = { f[0], zk_self() };
	ck_assert_int_eq(zk_wait_first(me, 2, -1, 0), -EDEADLK);
	ck_assert_int_eq(zk_join_timed(zk_self(), NULL, -1), -EDEADLK);
	ck_assert_int_eq(zk_join_timed(NULL, NULL, -1), -EINVAL);
	/* every task is intact: none was cancelled by the failed waits */
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(zk_sem_post(&g[i].gate), 0);
	for (int i = 0; i < N; i++) {
		void *r;
		ck_assert_int_eq(zk_join(f[i], &r), 0);
		ck_assert_int_eq((intptr_t)r, 300 + i);
	}
	return NULL;
}

START_TEST(test_wait_first_times_out_and_is_cancellable_leaving_tasks_alone)
{
	run2(wait_first_fails_main, NULL);
}
END_TEST

/* Ends racing timeouts: tasks on both workers end while waits on them
 * time out, many times over.  Whatever wins, the outcome is consistent:
 * an index means that task has ended; every handle is joined once. */
static void *quick_task(void *arg)
{
	if ((intptr_t)arg & 1)
		zk_yield();
	return arg;
}

static void *race_main(void *arg)
{
	int rounds = getenv("ZK_TEST_QUICK") ? 300 : 3000;
	long won = 0, timed_out = 0;
	for (int r = 0; r < rounds; r++) {
		zk_fiber_t *f[3];
		for (intptr_t i = 0; i < 3; i++)
			ck_assert_int_eq(zk_spawn_on(zk_runtime_current(), (int)((r + i) % 2), &f[i],
						     quick_task, (void *)(intptr_t)(r + i), NULL),
					 0);
		int64_t d = zk_now_ns() + (r % 4) * 1000;
		int rc = r % 3 ? zk_wait_first(f, 3, d, 0) : zk_join_timed(f[0], NULL, d);
		if (rc >= 0) {
			won++;
			/* it has ended: a wait with a past deadline sees it */
			if (r % 3)
				ck_assert_int_ge(zk_wait_first(&f[rc], 1, zk_now_ns() - 1, 0), 0);
			else
				f[0] = NULL; /* joined */
		} else {
			ck_assert_int_eq(rc, -ETIMEDOUT);
			timed_out++;
		}
		for (int i = 0; i < 3; i++) {
			void *res;
			if (!f[i])
				continue;
			ck_assert_int_eq(zk_join(f[i], &res), 0);
			ck_assert_int_eq((intptr_t)res, r + i);
		}
	}
	ck_assert_int_eq(won + timed_out, rounds);
	return NULL;
}

START_TEST(test_end_waits_racing_timeouts_stay_consistent)
{
	run2(race_main, NULL);
}
END_TEST

static Suite *fiber_suite(void)
{
	Suite *s = suite_create("fiber");
	TCase *tc = tcase_create("fiber");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_join_returns_each_fibers_result);
	tcase_add_test(tc, test_spawned_fiber_runs_only_when_spawner_waits);
	tcase_add_test(tc, test_yield_alternates_two_fibers);
	tcase_add_test(tc, test_exit_from_nested_call_gives_join_its_result);
	tcase_add_test(tc, test_runtime_run_waits_for_detached_fibers);
	tcase_add_test(tc, test_self_join_is_edeadlk_and_context_queries_work);
	tcase_add_test(tc, test_fiber_names_are_copied_and_truncated);
	tcase_add_test(tc, test_fiber_local_values_are_per_fiber_and_destroyed_at_exit);
	tcase_add_test(tc, test_100000_fibers_alive_at_once);
	tcase_add_test(tc, test_fibers_spawn_fibers_recursively);
	tcase_add_test(tc, test_bad_options_and_arguments_are_rejected);
	tcase_add_test(tc, test_cancel_before_start_means_never_runs);
	tcase_add_test(tc, test_destroy_discards_fibers_never_run);
	tcase_add_test(tc, test_runtime_can_run_again_and_zk_run_works);
	tcase_add_test(tc, test_run_from_inside_a_fiber_is_edeadlk);
	tcase_add_test(tc, test_join_timed_expires_then_a_later_join_succeeds);
	tcase_add_test(tc, test_wait_first_returns_the_first_to_end_across_two_workers);
	tcase_add_test(tc, test_wait_first_cancels_the_rest_when_asked);
	tcase_add_test(tc, test_wait_first_times_out_and_is_cancellable_leaving_tasks_alone);
	tcase_add_test(tc, test_end_waits_racing_timeouts_stay_consistent);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(fiber_suite());
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
