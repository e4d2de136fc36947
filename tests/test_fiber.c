/*
 * test_fiber.c - fibers on one worker: spawn/join order and results, exit,
 * detach, yield order, names, fiber-local storage, many fibers alive at
 * once, recursive spawning, and the runtime life cycle.
 */
#include <check.h>
#include <errno.h>
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
