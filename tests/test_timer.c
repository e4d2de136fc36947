/*
 * test_timer.c - timers: the per-worker heap (ordering, cancellation,
 * 1,000,000 pending), sleeps (order, accuracy, cancellation, plain
 * threads), the per-fiber deadline, and timers of finished waits never
 * firing into later ones.
 */
#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "zokio.h"
#include "timer.h"

#define MS 1000000ll

static void run_on(int workers, zk_fiber_fn fn, void *arg)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = workers;
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
	ck_assert_int_eq(zk_spawn_ex(rt, NULL, fn, arg, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
}

static uint64_t splitmix(uint64_t i)
{
	uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

/* ---- the heap itself -------------------------------------------------------- */

struct rec {
	struct zk__timer t;
	int fired;
};

static int64_t fire_now, batch_min, batch_max;
static long nfired, out_of_order;

/* Within one zk__timers_fire call timers fire latest first; across calls
 * every timer fired is no earlier than any fired before. */
static void on_fire(struct zk__timer *t)
{
	struct rec *r = t->arg;
	if (t->when > fire_now)
		out_of_order++;
	if (t->when < batch_min)
		batch_min = t->when;
	if (t->when > batch_max)
		batch_max = t->when;
	r->fired++;
	nfired++;
}

START_TEST(test_heap_fires_in_order_and_never_fires_cancelled_with_1m_pending)
{
	enum { N = 1000000 };
	struct zk__timers ts;
	zk__timers_init(&ts);
	struct rec *r = calloc(N, sizeof(*r));
	ck_assert_ptr_nonnull(r);
	for (long i = 0; i < N; i++) {
		zk__timer_init(&r[i].t, on_fire, NULL, &r[i]);
		ck_assert_int_eq(zk__timer_arm(&ts, &r[i].t, 1000 + (int64_t)(splitmix(i) % 1000000)), 0);
	}
	ck_assert_int_eq(ts.n, N);
	/* cancel every third, from the middle of the heap */
	long cancelled = 0;
	for (long i = 0; i < N; i += 3) {
		ck_assert_int_eq(zk__timer_disarm(&r[i].t), 1);
		cancelled++;
	}
	ck_assert_int_eq(zk__timer_disarm(&r[0].t), 0); /* twice: no-op */
	nfired = out_of_order = 0;
	int64_t prev_max = 0;
	/* fire in slices: nothing fires before it is due, and in order */
	for (fire_now = 0; fire_now <= 1050000; fire_now += 50000) {
		for (;;) {
			batch_min = INT64_MAX;
			batch_max = 0;
			if (zk__timers_fire(&ts, fire_now) == 0)
				break;
			if (batch_min < prev_max)
				out_of_order++;
			prev_max = batch_max;
		}
	}
	ck_assert_int_eq(out_of_order, 0);
	ck_assert_int_eq(nfired, N - cancelled);
	ck_assert_int_eq(ts.n, 0);
	ck_assert(zk__timers_next(&ts) == ZK__NO_DEADLINE);
	for (long i = 0; i < N; i++)
		ck_assert_int_eq(r[i].fired, i % 3 == 0 ? 0 : 1);
	free(r);
	zk__timers_fini(&ts);
}
END_TEST

static int order_buf[8];
static int order_n;

static void on_fire_order(struct zk__timer *t)
{
	order_buf[order_n++] = (int)(intptr_t)t->arg;
}

START_TEST(test_equal_deadlines_fire_in_arm_order)
{
	struct zk__timers ts;
	zk__timers_init(&ts);
	struct zk__timer t[8];
	order_n = 0;
	for (int i = 0; i < 8; i++) {
		zk__timer_init(&t[i], on_fire_order, NULL, (void *)(intptr_t)i);
		zk__timer_arm(&ts, &t[i], i < 4 ? 500 : 100);
	}
	ck_assert_int_eq(zk__timers_fire(&ts, 99), 0);
	ck_assert_int_eq(zk__timers_fire(&ts, 500), 8);
	int want[8] = { 4, 5, 6, 7, 0, 1, 2, 3 };
	for (int i = 0; i < 8; i++) /* fired latest first within a batch */
		ck_assert_int_eq(order_buf[7 - i], want[i]);
	zk__timers_fini(&ts);
}
END_TEST

/* ---- sleeping fibers ----------------------------------------------------------- */

enum { NSLEEP = 200 };
static int wake_order[NSLEEP];
static int nwoke;
static int64_t sleep_base;

static void *sleeper(void *arg)
{
	int slot = (int)(intptr_t)arg;
	ck_assert_int_eq(zk_sleep_until(sleep_base + (int64_t)slot * MS), 0);
	wake_order[nwoke++] = slot;
	return NULL;
}

static void *sleep_order_main(void *arg)
{
	nwoke = 0;
	sleep_base = zk_now_ns() + 300 * MS; /* after every sleeper has started */
	for (int i = 0; i < NSLEEP; i++) /* spawn in a scrambled order */
		ck_assert_int_eq(zk_spawn(NULL, sleeper, (void *)(intptr_t)((i * 7919) % NSLEEP)), 0);
	return NULL;
}

START_TEST(test_sleepers_wake_in_deadline_order)
{
	run_on(1, sleep_order_main, NULL);
	ck_assert_int_eq(nwoke, NSLEEP);
	for (int i = 0; i < NSLEEP; i++)
		ck_assert_int_eq(wake_order[i], i);
}
END_TEST

static void *accuracy_main(void *arg)
{
	for (int i = 0; i < 20; i++) {
		int64_t t0 = zk_now_ns();
		ck_assert_int_eq(zk_sleep_ns(2 * MS), 0);
		int64_t el = zk_now_ns() - t0;
		ck_assert_int_ge(el, 2 * MS);
		ck_assert_int_lt(el, 2 * MS + 200 * MS); /* sanity on shared, loaded cores */
	}
	ck_assert_int_eq(zk_sleep_ns(0), 0);
	ck_assert_int_eq(zk_sleep_until(zk_now_ns() - MS), 0);
	return NULL;
}

START_TEST(test_sleep_lasts_at_least_its_duration_and_not_much_more)
{
	run_on(2, accuracy_main, NULL);
}
END_TEST

static void *long_sleeper(void *arg)
{
	int64_t t0 = zk_now_ns();
	int rc = zk_sleep_ns(10000 * MS);
	ck_assert_int_lt(zk_now_ns() - t0, 5000 * MS);
	return (void *)(intptr_t)rc;
}

static void *cancel_main(void *arg)
{
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn(&f, long_sleeper, NULL), 0);
	zk_sleep_ns(5 * MS);
	ck_assert_int_eq(zk_cancel(f), 0);
	void *res;
	ck_assert_int_eq(zk_join(f, &res), 0);
	ck_assert_int_eq((intptr_t)res, -ECANCELED);
	return NULL;
}

START_TEST(test_cancel_ends_a_sleep_with_ecanceled)
{
	run_on(2, cancel_main, NULL);
}
END_TEST

static void *deadline_main(void *arg)
{
	ck_assert_int_eq(zk_deadline_get(), -1);
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(zk_deadline_set(t0 + 10 * MS), 0);
	ck_assert_int_eq(zk_deadline_get(), t0 + 10 * MS);
	ck_assert_int_eq(zk_sleep_ns(5000 * MS), -ETIMEDOUT);
	int64_t el = zk_now_ns() - t0;
	ck_assert_int_ge(el, 10 * MS);
	ck_assert_int_lt(el, 2000 * MS);
	/* past the deadline every wait fails at once */
	ck_assert_int_eq(zk_sleep_ns(MS), -ETIMEDOUT);
	zk_chan_t *ch;
	ck_assert_int_eq(zk_chan_create(&ch, sizeof(int), 0), 0);
	int v;
	ck_assert_int_eq(zk_chan_recv(ch, &v), -ETIMEDOUT);
	/* a sleep that ends before the deadline succeeds */
	ck_assert_int_eq(zk_deadline_set(zk_now_ns() + 1000 * MS), 0);
	ck_assert_int_eq(zk_sleep_ns(MS), 0);
	ck_assert_int_eq(zk_deadline_clear(), 0);
	ck_assert_int_eq(zk_deadline_get(), -1);
	ck_assert_int_eq(zk_sleep_ns(MS), 0);
	ck_assert_int_eq(zk_chan_destroy(ch), 0);
	return NULL;
}

START_TEST(test_fiber_deadline_makes_waits_fail_with_etimedout)
{
	run_on(1, deadline_main, NULL);
}
END_TEST

START_TEST(test_sleep_and_deadline_on_a_plain_thread)
{
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(zk_sleep_ns(2 * MS), 0);
	ck_assert_int_ge(zk_now_ns() - t0, 2 * MS);
	ck_assert_int_eq(zk_deadline_set(0), -EPERM);
	ck_assert_int_eq(zk_deadline_get(), -1);
}
END_TEST

/* Fibers on 2 workers do a timed receive that a sender satisfies early
 * (the timer is disarmed, often from the other worker), then sleep: a
 * stale timer would end a sleep early. */
enum { NSTALE = 400 };

struct stale {
	zk_chan_t *ch;
	long early;
};

static void *stale_receiver(void *arg)
{
	struct stale *s = arg;
	int v;
	ck_assert_int_eq(zk_chan_recv_timed(s->ch, &v, zk_now_ns() + 10000 * MS), 0);
	for (int i = 0; i < 3; i++) {
		int64_t t0 = zk_now_ns();
		ck_assert_int_eq(zk_sleep_ns(2 * MS), 0);
		if (zk_now_ns() - t0 < 2 * MS)
			__atomic_add_fetch(&s->early, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void *stale_main(void *arg)
{
	struct stale *s = arg;
	zk_fiber_t *f[NSTALE];
	for (int i = 0; i < NSTALE; i++)
		ck_assert_int_eq(zk_spawn(&f[i], stale_receiver, s), 0);
	zk_sleep_ns(MS);
	for (int i = 0; i < NSTALE; i++)
		ck_assert_int_eq(zk_chan_send(s->ch, &i), 0);
	for (int i = 0; i < NSTALE; i++)
		ck_assert_int_eq(zk_join(f[i], NULL), 0);
	return NULL;
}

START_TEST(test_timer_of_a_finished_wait_never_ends_a_later_one)
{
	struct stale s = { NULL, 0 };
	ck_assert_int_eq(zk_chan_create(&s.ch, sizeof(int), 0), 0);
	run_on(2, stale_main, &s);
	ck_assert_int_eq(s.early, 0);
	ck_assert_int_eq(zk_chan_destroy(s.ch), 0);
}
END_TEST

/* Many sleepers spread over 2 workers all wake, and the runtime waits for
 * them (sleeping fibers keep it alive). */
static long woke_many;

static void *short_sleeper(void *arg)
{
	zk_sleep_ns((int64_t)(splitmix((uint64_t)(intptr_t)arg) % (20 * MS)));
	__atomic_add_fetch(&woke_many, 1, __ATOMIC_RELAXED);
	return NULL;
}

static void *many_main(void *arg)
{
	for (intptr_t i = 0; i < 5000; i++)
		ck_assert_int_eq(zk_spawn(NULL, short_sleeper, (void *)i), 0);
	return NULL;
}

START_TEST(test_thousands_of_sleepers_on_two_workers_all_wake)
{
	woke_many = 0;
	run_on(2, many_main, NULL);
	ck_assert_int_eq(woke_many, 5000);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("timer");
	TCase *tc = tcase_create("timer");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_heap_fires_in_order_and_never_fires_cancelled_with_1m_pending);
	tcase_add_test(tc, test_equal_deadlines_fire_in_arm_order);
	tcase_add_test(tc, test_sleepers_wake_in_deadline_order);
	tcase_add_test(tc, test_sleep_lasts_at_least_its_duration_and_not_much_more);
	tcase_add_test(tc, test_cancel_ends_a_sleep_with_ecanceled);
	tcase_add_test(tc, test_fiber_deadline_makes_waits_fail_with_etimedout);
	tcase_add_test(tc, test_sleep_and_deadline_on_a_plain_thread);
	tcase_add_test(tc, test_timer_of_a_finished_wait_never_ends_a_later_one);
	tcase_add_test(tc, test_thousands_of_sleepers_on_two_workers_all_wake);
	suite_add_tcase(s, tc);
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
