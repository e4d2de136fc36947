/*
 * test_sync.c - sync primitives, channels and select, on two workers:
 * exactly-once MPMC delivery, mutual exclusion, mutex fairness (barging,
 * no starvation), close semantics, select fairness, timeouts and
 * cancellation on every kind of wait, fibers sharing objects with plain
 * threads, scopes, generators, and the end combinators (zk_join_timed,
 * zk_wait_first) with their timeouts and cancellation.
 */
#include <check.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "zokio.h"
#include "watchdog.h"

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

static intptr_t join_rc(zk_fiber_t *f)
{
	void *r;
	ck_assert_int_eq(zk_join(f, &r), 0);
	return (intptr_t)r;
}

/* ---- MPMC: 1,000,000 messages, 4 producers, 4 consumers ------------------- */

enum { PRODUCERS = 4, CONSUMERS = 4, PER_PRODUCER = 250000 };

struct mpmc {
	zk_chan_t *ch;
	uint8_t *seen;        /* PRODUCERS * PER_PRODUCER counters */
	long received[CONSUMERS];
	long order_errors;
};

static struct mpmc mp;

static void *producer(void *arg)
{
	uint64_t p = (uint64_t)(intptr_t)arg;
	for (uint64_t i = 0; i < PER_PRODUCER; i++) {
		uint64_t v = p << 32 | i;
		ck_assert_int_eq(zk_chan_send(mp.ch, &v), 0);
	}
	return NULL;
}

static void *consumer(void *arg)
{
	int c = (int)(intptr_t)arg;
	int64_t last[PRODUCERS];
	for (int p = 0; p < PRODUCERS; p++)
		last[p] = -1;
	uint64_t v;
	int rc;
	while ((rc = zk_chan_recv(mp.ch, &v)) == 0) {
		uint64_t p = v >> 32, i = v & 0xffffffffu;
		ck_assert_uint_lt(p, PRODUCERS);
		ck_assert_uint_lt(i, PER_PRODUCER);
		__atomic_add_fetch(&mp.seen[p * PER_PRODUCER + i], 1, __ATOMIC_RELAXED);
		/* one producer's values arrive in its sending order */
		if ((int64_t)i <= last[p])
			__atomic_add_fetch(&mp.order_errors, 1, __ATOMIC_RELAXED);
		last[p] = (int64_t)i;
		mp.received[c]++;
	}
	ck_assert_int_eq(rc, -EPIPE);
	return NULL;
}

static void *mpmc_main(void *arg)
{
	zk_fiber_t *prod[PRODUCERS], *cons[CONSUMERS];
	for (intptr_t c = 0; c < CONSUMERS; c++)
		ck_assert_int_eq(zk_spawn(&cons[c], consumer, (void *)c), 0);
	for (intptr_t p = 0; p < PRODUCERS; p++)
		ck_assert_int_eq(zk_spawn(&prod[p], producer, (void *)p), 0);
	for (int p = 0; p < PRODUCERS; p++)
		join_rc(prod[p]);
	ck_assert_int_eq(zk_chan_close(mp.ch), 0);
	for (int c = 0; c < CONSUMERS; c++)
		join_rc(cons[c]);
	return NULL;
}

START_TEST(test_chan_mpmc_delivers_a_million_messages_exactly_once)
{
	memset(&mp, 0, sizeof(mp));
	ck_assert_int_eq(zk_chan_create(&mp.ch, sizeof(uint64_t), 64), 0);
	mp.seen = calloc(PRODUCERS * PER_PRODUCER, 1);
	run_on(2, mpmc_main, NULL);
	long total = 0;
	for (int c = 0; c < CONSUMERS; c++)
		total += mp.received[c];
	ck_assert_int_eq(total, PRODUCERS * PER_PRODUCER);
	for (long i = 0; i < PRODUCERS * PER_PRODUCER; i++)
		if (mp.seen[i] != 1)
			ck_abort_msg("message %ld seen %d times", i, mp.seen[i]);
	ck_assert_int_eq(mp.order_errors, 0);
	free(mp.seen);
	ck_assert_int_eq(zk_chan_destroy(mp.ch), 0);
}
END_TEST

/* Same over a rendezvous and an unbounded channel, smaller. */
static void *pair_main(void *arg)
{
	zk_chan_t *ch = arg;
	zk_fiber_t *prod[2], *cons[2];
	memset(&mp.received, 0, sizeof(mp.received));
	mp.ch = ch;
	for (intptr_t c = 0; c < 2; c++)
		ck_assert_int_eq(zk_spawn(&cons[c], consumer, (void *)c), 0);
	for (intptr_t p = 0; p < 2; p++)
		ck_assert_int_eq(zk_spawn(&prod[p], producer, (void *)p), 0);
	for (int p = 0; p < 2; p++)
		join_rc(prod[p]);
	ck_assert_int_eq(zk_chan_close(ch), 0);
	for (int c = 0; c < 2; c++)
		join_rc(cons[c]);
	return NULL;
}

START_TEST(test_chan_rendezvous_and_unbounded_deliver_exactly_once)
{
	size_t caps[2] = { 0, ZK_CHAN_UNBOUNDED };
	for (int k = 0; k < 2; k++) {
		memset(&mp, 0, sizeof(mp));
		mp.seen = calloc(PRODUCERS * PER_PRODUCER, 1);
		zk_chan_t *ch;
		ck_assert_int_eq(zk_chan_create(&ch, sizeof(uint64_t), caps[k]), 0);
		run_on(2, pair_main, ch);
		ck_assert_int_eq(mp.received[0] + mp.received[1], 2 * PER_PRODUCER);
		for (long i = 0; i < 2 * PER_PRODUCER; i++)
			ck_assert_int_eq(mp.seen[i], 1);
		ck_assert_int_eq(mp.order_errors, 0);
		free(mp.seen);
		ck_assert_int_eq(zk_chan_destroy(ch), 0);
	}
}
END_TEST

/* ---- mutex ------------------------------------------------------------------- */

enum { MUTEX_FIBERS = 1000, MUTEX_ITERS = 200 };
static zk_mutex_t mu = ZK_MUTEX_INIT;
static long counter;
static int inside;

static void *incrementer(void *arg)
{
	for (int i = 0; i < MUTEX_ITERS; i++) {
		ck_assert_int_eq(zk_mutex_lock(&mu), 0);
		ck_assert_int_eq(__atomic_add_fetch(&inside, 1, __ATOMIC_RELAXED), 1);
		long c = counter;
		if (i % 16 == 0)
			zk_yield(); /* hold it across a switch: others must queue */
		counter = c + 1;
		__atomic_sub_fetch(&inside, 1, __ATOMIC_RELAXED);
		ck_assert_int_eq(zk_mutex_unlock(&mu), 0);
	}
	return NULL;
}

static void *mutex_main(void *arg)
{
	static zk_fiber_t *f[MUTEX_FIBERS];
	for (int i = 0; i < MUTEX_FIBERS; i++)
		ck_assert_int_eq(zk_spawn(&f[i], incrementer, NULL), 0);
	for (int i = 0; i < MUTEX_FIBERS; i++)
		join_rc(f[i]);
	return NULL;
}

START_TEST(test_mutex_counter_incremented_by_1000_fibers_is_exact)
{
	counter = 0;
	run_on(2, mutex_main, NULL);
	ck_assert_int_eq(counter, (long)MUTEX_FIBERS * MUTEX_ITERS);
	ck_assert_int_eq(zk_mutex_trylock(&mu), 0);
	ck_assert_int_eq(zk_mutex_trylock(&mu), -EBUSY);
	ck_assert_int_eq(zk_mutex_unlock(&mu), 0);
	ck_assert_int_eq(zk_mutex_unlock(&mu), -EPERM);
	ck_assert_int_eq(zk_mutex_destroy(&mu), 0);
}
END_TEST

/* Waiters are served in arrival order; a running fiber may barge in
 * (normal mode) until a waiter that lost after more than 1 ms switches the
 * mutex to hand-off mode.  One worker makes every step deterministic. */
static int handoff_log[8], handoff_n;

static void *handoff_waiter(void *arg)
{
	ck_assert_int_eq(zk_mutex_lock(&mu), 0);
	handoff_log[handoff_n++] = (int)(intptr_t)arg;
	ck_assert_int_eq(zk_mutex_unlock(&mu), 0);
	return NULL;
}

static void *handoff_main(void *arg)
{
	zk_fiber_t *f[8];
	ck_assert_int_eq(zk_mutex_lock(&mu), 0);
	for (intptr_t i = 0; i < 8; i++) {
		ck_assert_int_eq(zk_spawn(&f[i], handoff_waiter, (void *)i), 0);
		zk_sleep_ns(MS / 2); /* let it queue: arrival order = i */
	}
	/* Normal mode: unlock frees the mutex and wakes waiter 0 to compete;
	 * we are running, so we get it first (barging). */
	ck_assert_int_eq(zk_mutex_unlock(&mu), 0);
	ck_assert_int_eq(zk_mutex_trylock(&mu), 0);
	/* Waiter 0 runs, loses after waiting > 1 ms, and turns on hand-off
	 * mode from the head of the queue. */
	zk_sleep_ns(MS);
	ck_assert_int_eq(handoff_n, 0);
	ck_assert_int_eq(zk_mutex_unlock(&mu), 0);
	/* barging attempt: the mutex belongs to waiter 0 now */
	ck_assert_int_eq(zk_mutex_trylock(&mu), -EBUSY);
	for (int i = 0; i < 8; i++)
		join_rc(f[i]);
	/* the queue drained: back to normal mode, free */
	ck_assert_int_eq(zk_mutex_destroy(&mu), 0);
	return NULL;
}

START_TEST(test_mutex_barges_then_hands_off_to_a_starving_waiter_in_arrival_order)
{
	handoff_n = 0;
	run_on(1, handoff_main, NULL);
	ck_assert_int_eq(handoff_n, 8);
	for (int i = 0; i < 8; i++)
		ck_assert_int_eq(handoff_log[i], i);
}
END_TEST


/* No starvation: two greedy fibers, one per worker, re-take the mutex the
 * moment they release it and hold it across a switch - so a woken waiter
 * always finds it taken again, and with barging alone it would never get
 * in.  Victim fibers and a victim plain thread must still each get their
 * turns while the greedy ones run.  Bounded by iterations, not time: the
 * greedy loops stop when the victims are done or after GREEDY_MAX turns
 * (far more than 1 ms of waiting per victim turn needs, however slow the
 * machine), and the test fails if a victim was left behind. */
enum { GREEDY = 2, VICTIMS = 4, VICTIM_TURNS = 20, GREEDY_MAX = 5000000 };

struct starve {
	zk_mutex_t mu;
	int inside;
	int victims_left;       /* fiber victims + the thread */
	long greedy_turns[GREEDY];
	long victim_turns;
};

static void starve_section(struct starve *st)
{
	ck_assert_int_eq(__atomic_add_fetch(&st->inside, 1, __ATOMIC_RELAXED), 1);
	__atomic_sub_fetch(&st->inside, 1, __ATOMIC_RELAXED);
}

static void *greedy(void *arg)
{
	struct starve *st = arg;
	int me = zk_worker_index();
	long i = 0;
	while (__atomic_load_n(&st->victims_left, __ATOMIC_ACQUIRE) > 0 && i < GREEDY_MAX) {
		ck_assert_int_eq(zk_mutex_lock(&st->mu), 0);
		starve_section(st);
		zk_yield(); /* hold it across a switch */
		ck_assert_int_eq(zk_mutex_unlock(&st->mu), 0);
		i++;
	}
	st->greedy_turns[me] = i;
	return NULL;
}

static void victim_turns(struct starve *st)
{
	for (int t = 0; t < VICTIM_TURNS; t++) {
		ck_assert_int_eq(zk_mutex_lock(&st->mu), 0);
		starve_section(st);
		__atomic_add_fetch(&st->victim_turns, 1, __ATOMIC_RELAXED);
		ck_assert_int_eq(zk_mutex_unlock(&st->mu), 0);
	}
	__atomic_sub_fetch(&st->victims_left, 1, __ATOMIC_RELEASE);
}

static void *victim(void *arg)
{
	victim_turns(arg);
	return NULL;
}

static void *victim_thread(void *arg)
{
	victim_turns(arg);
	return NULL;
}

static void *starve_main(void *arg)
{
	struct starve *st = arg;
	zk_runtime_t *rt = zk_runtime_current();
	zk_fiber_t *g[GREEDY], *v[VICTIMS];
	for (int i = 0; i < GREEDY; i++)
		ck_assert_int_eq(zk_spawn_on(rt, i, &g[i], greedy, st, NULL), 0);
	zk_sleep_ns(MS); /* the greedy ones are at it */
	for (int i = 0; i < VICTIMS; i++)
		ck_assert_int_eq(zk_spawn_on(rt, i % 2, &v[i], victim, st, NULL), 0);
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, victim_thread, st), 0);
	for (int i = 0; i < VICTIMS; i++)
		join_rc(v[i]);
	for (int i = 0; i < GREEDY; i++)
		join_rc(g[i]);
	pthread_join(th, NULL); /* done: the greedy loops end only after it */
	return NULL;
}

START_TEST(test_mutex_waiters_do_not_starve_behind_barging_lockers)
{
	struct starve st;
	memset(&st, 0, sizeof(st));
	st.victims_left = VICTIMS + 1;
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = 2;
	zk_runtime_t *rt;
	ck_assert_int_eq(zk_runtime_create(&rt, &o), 0);
	ck_assert_int_eq(zk_spawn_ex(rt, NULL, starve_main, &st, NULL), 0);
	struct watchdog wd;
	watchdog_start(&wd, rt, 0, 120, "mutex starvation", NULL);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	watchdog_stop(&wd);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
	/* every victim turn happened while the greedy fibers were still
	 * running (their loops stop only once the victims are done) */
	ck_assert_int_eq(st.victims_left, 0);
	ck_assert_int_eq(st.victim_turns, (VICTIMS + 1) * VICTIM_TURNS);
	for (int i = 0; i < GREEDY; i++)
		ck_assert_int_lt(st.greedy_turns[i], GREEDY_MAX);
	ck_assert_int_eq(zk_mutex_destroy(&st.mu), 0);
}
END_TEST

/* ---- close ---------------------------------------------------------------------- */

static void *blocked_recv(void *arg)
{
	int v;
	return (void *)(intptr_t)zk_chan_recv(arg, &v);
}

static void *blocked_send(void *arg)
{
	int v = 7;
	return (void *)(intptr_t)zk_chan_send(arg, &v);
}

static void *close_main(void *arg)
{
	zk_chan_t *rx, *tx;
	ck_assert_int_eq(zk_chan_create(&rx, sizeof(int), 0), 0);
	ck_assert_int_eq(zk_chan_create(&tx, sizeof(int), 2), 0);
	int v = 1;
	ck_assert_int_eq(zk_chan_send(tx, &v), 0);
	ck_assert_int_eq(zk_chan_send(tx, &v), 0); /* full: further senders park */
	zk_fiber_t *r[10], *s[10];
	for (int i = 0; i < 10; i++) {
		ck_assert_int_eq(zk_spawn(&r[i], blocked_recv, rx), 0);
		ck_assert_int_eq(zk_spawn(&s[i], blocked_send, tx), 0);
	}
	zk_sleep_ns(5 * MS);
	ck_assert_int_eq(zk_chan_destroy(rx), -EBUSY);
	ck_assert_int_eq(zk_chan_close(rx), 0);
	ck_assert_int_eq(zk_chan_close(tx), 0);
	ck_assert_int_eq(zk_chan_close(tx), -EPIPE);
	for (int i = 0; i < 10; i++) {
		ck_assert_int_eq(join_rc(r[i]), -EPIPE);
		ck_assert_int_eq(join_rc(s[i]), -EPIPE);
	}
	/* receivers drain the buffer first, then see the close */
	ck_assert_int_eq(zk_chan_recv(tx, &v), 0);
	ck_assert_int_eq(zk_chan_try_recv(tx, &v), 0);
	ck_assert_int_eq(zk_chan_recv(tx, &v), -EPIPE);
	ck_assert_int_eq(zk_chan_try_recv(tx, &v), -EPIPE);
	ck_assert_int_eq(zk_chan_send(tx, &v), -EPIPE);
	ck_assert_int_eq(zk_chan_try_send(rx, &v), -EPIPE);
	ck_assert_int_eq(zk_chan_destroy(rx), 0);
	ck_assert_int_eq(zk_chan_destroy(tx), 0);
	return NULL;
}

START_TEST(test_chan_close_wakes_parked_senders_and_receivers)
{
	run_on(2, close_main, NULL);
}
END_TEST

/* ---- select --------------------------------------------------------------------- */

static void *select_fair_main(void *arg)
{
	enum { K = 3, ROUNDS = 30000 };
	zk_chan_t *ch[K];
	zk_select_case_t c[K];
	int buf[K];
	long hits[K] = { 0 };
	for (int k = 0; k < K; k++) {
		ck_assert_int_eq(zk_chan_create(&ch[k], sizeof(int), ZK_CHAN_UNBOUNDED), 0);
		for (int i = 0; i < ROUNDS; i++)
			ck_assert_int_eq(zk_chan_send(ch[k], &i), 0);
		c[k] = (zk_select_case_t){ ch[k], ZK_SELECT_RECV, &buf[k] };
	}
	for (int i = 0; i < ROUNDS; i++) {
		int res = 1;
		int k = zk_select(c, K, &res);
		ck_assert_int_ge(k, 0);
		ck_assert_int_eq(res, 0);
		hits[k]++;
	}
	/* every case is always ready: each count is Binomial(ROUNDS, 1/3);
	 * 6 standard deviations (~490) bound a fair choice (false failure
	 * rate ~1e-9), while a first-ready or round-robin bias fails it */
	double mean = ROUNDS / (double)K, sd = sqrt(ROUNDS * (1.0 / K) * (1 - 1.0 / K));
	for (int k = 0; k < K; k++) {
		ck_assert_msg(fabs(hits[k] - mean) < 6 * sd, "case %d chosen %ld times of %d", k,
			      hits[k], ROUNDS);
		ck_assert_int_eq(zk_chan_len(ch[k]) + (size_t)hits[k], ROUNDS);
		ck_assert_int_eq(zk_chan_close(ch[k]), 0);
		ck_assert_int_eq(zk_chan_destroy(ch[k]), 0);
	}
	return NULL;
}

START_TEST(test_select_chooses_uniformly_among_ready_cases)
{
	run_on(1, select_fair_main, NULL);
}
END_TEST

struct sel_peer {
	zk_chan_t *ch;
	int value;
};

static void *delayed_sender(void *arg)
{
	struct sel_peer *p = arg;
	zk_sleep_ns(3 * MS);
	return (void *)(intptr_t)zk_chan_send(p->ch, &p->value);
}

static void *delayed_receiver(void *arg)
{
	struct sel_peer *p = arg;
	zk_sleep_ns(3 * MS);
	return (void *)(intptr_t)zk_chan_recv(p->ch, &p->value);
}

static void *select_main(void *arg)
{
	zk_chan_t *a, *b;
	ck_assert_int_eq(zk_chan_create(&a, sizeof(int), 0), 0);
	ck_assert_int_eq(zk_chan_create(&b, sizeof(int), 0), 0);
	int ra = 0, sb = 99, res = 1;
	zk_select_case_t c[3] = { { a, ZK_SELECT_RECV, &ra }, { b, ZK_SELECT_SEND, &sb }, { NULL, 0, NULL } };

	/* default: nothing ready */
	ck_assert_int_eq(zk_select_try(c, 3, &res), -EAGAIN);
	/* timeout, and the channels are left clean */
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(zk_select_timed(c, 3, &res, t0 + 5 * MS), -ETIMEDOUT);
	ck_assert_int_ge(zk_now_ns() - t0, 5 * MS);
	ck_assert_int_eq(zk_chan_destroy(a) == 0 ? 0 : 1, 0);
	ck_assert_int_eq(zk_chan_create(&a, sizeof(int), 0), 0);
	c[0].chan = a;

	/* a parked select completed by a sender on another fiber */
	struct sel_peer p = { a, 42 };
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn(&f, delayed_sender, &p), 0);
	ck_assert_int_eq(zk_select(c, 3, &res), 0);
	ck_assert_int_eq(res, 0);
	ck_assert_int_eq(ra, 42);
	ck_assert_int_eq(join_rc(f), 0);

	/* ... and by a receiver taking the send case */
	struct sel_peer q = { b, 0 };
	ck_assert_int_eq(zk_spawn(&f, delayed_receiver, &q), 0);
	ck_assert_int_eq(zk_select(c, 3, &res), 1);
	ck_assert_int_eq(join_rc(f), 0);
	ck_assert_int_eq(q.value, 99);

	/* a closed channel is ready with -EPIPE */
	ck_assert_int_eq(zk_chan_close(a), 0);
	ck_assert_int_eq(zk_select(c, 1, &res), 0);
	ck_assert_int_eq(res, -EPIPE);

	/* bad input */
	zk_select_case_t bad = { b, 7, &sb };
	ck_assert_int_eq(zk_select(&bad, 1, &res), -EINVAL);
	/* nothing usable: only the deadline ends it */
	ck_assert_int_eq(zk_select_timed(&c[2], 1, &res, zk_now_ns() + MS), -ETIMEDOUT);

	ck_assert_int_eq(zk_chan_destroy(a), 0);
	ck_assert_int_eq(zk_chan_destroy(b), 0);
	return NULL;
}

START_TEST(test_select_waits_times_out_and_has_a_default)
{
	run_on(2, select_main, NULL);
}
END_TEST

/* Two selects racing over shared channels with plain senders/receivers:
 * every value is delivered once (claims between selects are exclusive). */
enum { SEL_N = 20000 };
static zk_chan_t *sx, *sy;
static long sel_got;

static void *select_consumer(void *arg)
{
	long got = 0;
	int vx, vy, res;
	zk_select_case_t c[2] = { { sx, ZK_SELECT_RECV, &vx }, { sy, ZK_SELECT_RECV, &vy } };
	for (;;) {
		int k = zk_select(c, 2, &res);
		ck_assert_int_ge(k, 0);
		if (res == -EPIPE)
			break;
		got++;
	}
	__atomic_add_fetch(&sel_got, got, __ATOMIC_RELAXED);
	return NULL;
}

static void *select_producer(void *arg)
{
	zk_chan_t *ch = arg;
	for (int i = 0; i < SEL_N; i++)
		ck_assert_int_eq(zk_chan_send(ch, &i), 0);
	return NULL;
}

static void *select_race_main(void *arg)
{
	zk_fiber_t *c[3], *p[2];
	ck_assert_int_eq(zk_chan_create(&sx, sizeof(int), 0), 0);
	ck_assert_int_eq(zk_chan_create(&sy, sizeof(int), 4), 0);
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(zk_spawn(&c[i], select_consumer, NULL), 0);
	ck_assert_int_eq(zk_spawn(&p[0], select_producer, sx), 0);
	ck_assert_int_eq(zk_spawn(&p[1], select_producer, sy), 0);
	join_rc(p[0]);
	join_rc(p[1]);
	/* closing one channel makes every select return -EPIPE from it */
	ck_assert_int_eq(zk_chan_close(sx), 0);
	for (int i = 0; i < 3; i++)
		join_rc(c[i]);
	/* what is left in sy was not received */
	int v;
	while (zk_chan_try_recv(sy, &v) == 0)
		sel_got++;
	ck_assert_int_eq(zk_chan_destroy(sx), 0);
	ck_assert_int_eq(zk_chan_destroy(sy), 0);
	return NULL;
}

START_TEST(test_concurrent_selects_receive_every_value_once)
{
	sel_got = 0;
	run_on(2, select_race_main, NULL);
	ck_assert_int_eq(sel_got, 2 * SEL_N);
}
END_TEST

/* ---- timeouts and cancellation on every wait ---------------------------------- */

/* One object of each kind, set up so that every wait below must park. */
struct objs {
	zk_mutex_t mu;
	zk_cond_t cv;
	zk_mutex_t cv_mu;
	zk_rwlock_t rw_w;     /* write-locked */
	zk_rwlock_t rw_r;     /* read-locked */
	zk_sem_t sem;         /* 0 */
	zk_waitgroup_t wg;    /* 1 */
	zk_barrier_t bar;     /* 3 parties */
	zk_once_t once;       /* its function blocks */
	zk_chan_t *empty, *full;
	zk_sem_t once_gate;
};

static struct objs O;

enum { W_MUTEX, W_COND, W_RDLOCK, W_WRLOCK, W_SEM, W_WG, W_BARRIER, W_ONCE, W_RECV, W_SEND,
       W_SELECT, W_COUNT };

static const char *wait_name[W_COUNT] = { "mutex", "cond", "rdlock", "wrlock", "sem", "waitgroup",
					  "barrier", "once", "recv", "send", "select" };

static void once_blocker(void *arg)
{
	zk_sem_wait(&O.once_gate);
}

/* The wait of kind k with deadline d (< 0: none). */
static int do_wait(int k, int64_t d)
{
	int v = 0, rc, res;
	switch (k) {
	case W_MUTEX:
		return zk_mutex_lock_timed(&O.mu, d);
	case W_COND:
		ck_assert_int_eq(zk_mutex_lock(&O.cv_mu), 0);
		rc = zk_cond_wait_timed(&O.cv, &O.cv_mu, d);
		/* the mutex is held again whatever the outcome */
		ck_assert_int_eq(zk_mutex_trylock(&O.cv_mu), -EBUSY);
		ck_assert_int_eq(zk_mutex_unlock(&O.cv_mu), 0);
		return rc;
	case W_RDLOCK:
		return zk_rwlock_rdlock_timed(&O.rw_w, d);
	case W_WRLOCK:
		return zk_rwlock_wrlock_timed(&O.rw_r, d);
	case W_SEM:
		return zk_sem_wait_timed(&O.sem, d);
	case W_WG:
		return zk_waitgroup_wait_timed(&O.wg, d);
	case W_BARRIER:
		return zk_barrier_wait_timed(&O.bar, d);
	case W_ONCE:
		if (d >= 0)
			zk_deadline_set(d);
		rc = zk_once(&O.once, once_blocker, NULL);
		zk_deadline_clear();
		return rc;
	case W_RECV:
		return zk_chan_recv_timed(O.empty, &v, d);
	case W_SEND:
		return zk_chan_send_timed(O.full, &v, d);
	case W_SELECT: {
		zk_select_case_t c[2] = { { O.empty, ZK_SELECT_RECV, &v }, { O.full, ZK_SELECT_SEND, &v } };
		return zk_select_timed(c, 2, &res, d);
	}
	}
	return -999;
}

static void objs_init(void)
{
	memset(&O, 0, sizeof(O));
	ck_assert_int_eq(zk_mutex_lock(&O.mu), 0);
	ck_assert_int_eq(zk_rwlock_wrlock(&O.rw_w), 0);
	ck_assert_int_eq(zk_rwlock_rdlock(&O.rw_r), 0);
	ck_assert_int_eq(zk_sem_init(&O.sem, 0), 0);
	ck_assert_int_eq(zk_sem_init(&O.once_gate, 0), 0);
	ck_assert_int_eq(zk_waitgroup_init(&O.wg), 0);
	ck_assert_int_eq(zk_waitgroup_add(&O.wg, 1), 0);
	ck_assert_int_eq(zk_barrier_init(&O.bar, 3), 0);
	ck_assert_int_eq(zk_chan_create(&O.empty, sizeof(int), 0), 0);
	ck_assert_int_eq(zk_chan_create(&O.full, sizeof(int), 1), 0);
	int v = 0;
	ck_assert_int_eq(zk_chan_send(O.full, &v), 0);
}

/* After the failed waits every object still works: release each one and
 * check that the expected number of parties gets through. */
static void objs_check_and_fini(void)
{
	ck_assert_int_eq(zk_mutex_unlock(&O.mu), 0);
	ck_assert_int_eq(zk_mutex_trylock(&O.mu), 0);
	ck_assert_int_eq(zk_mutex_unlock(&O.mu), 0);
	ck_assert_int_eq(zk_mutex_destroy(&O.mu), 0);
	ck_assert_int_eq(zk_cond_destroy(&O.cv), 0);
	ck_assert_int_eq(zk_rwlock_unlock(&O.rw_w), 0);
	ck_assert_int_eq(zk_rwlock_trywrlock(&O.rw_w), 0);
	ck_assert_int_eq(zk_rwlock_unlock(&O.rw_w), 0);
	ck_assert_int_eq(zk_rwlock_unlock(&O.rw_r), 0);
	ck_assert_int_eq(zk_rwlock_trywrlock(&O.rw_r), 0);
	ck_assert_int_eq(zk_rwlock_unlock(&O.rw_r), 0);
	ck_assert_int_eq(zk_rwlock_destroy(&O.rw_r), 0);
	ck_assert_int_eq(zk_sem_value(&O.sem), 0);
	ck_assert_int_eq(zk_sem_post(&O.sem), 0);
	ck_assert_int_eq(zk_sem_trywait(&O.sem), 0);
	ck_assert_int_eq(zk_sem_destroy(&O.sem), 0);
	ck_assert_int_eq(zk_waitgroup_done(&O.wg), 0);
	ck_assert_int_eq(zk_waitgroup_wait(&O.wg), 0);
	ck_assert_int_eq(zk_waitgroup_done(&O.wg), -EINVAL);
	/* the withdrawn arrivals do not count: 2 more are not enough */
	ck_assert_int_eq(zk_barrier_wait_timed(&O.bar, zk_now_ns() + MS), -ETIMEDOUT);
	ck_assert_int_eq(zk_barrier_destroy(&O.bar), 0);
	ck_assert_int_eq(zk_sem_post(&O.once_gate), 0); /* the once function ends */
	int v;
	ck_assert_int_eq(zk_chan_try_recv(O.full, &v), 0);
	ck_assert_int_eq(zk_chan_try_recv(O.full, &v), -EAGAIN);
	ck_assert_int_eq(zk_chan_destroy(O.empty), 0);
	ck_assert_int_eq(zk_chan_destroy(O.full), 0);
}

static void *once_runner(void *arg)
{
	return (void *)(intptr_t)zk_once(&O.once, once_blocker, NULL);
}

static void *timed_waiter(void *arg)
{
	int k = (int)(intptr_t)arg;
	int64_t t0 = zk_now_ns();
	int rc = do_wait(k, t0 + 3 * MS);
	if (rc != -ETIMEDOUT)
		ck_abort_msg("%s: timed wait returned %d", wait_name[k], rc);
	ck_assert_int_ge(zk_now_ns() - t0, 3 * MS);
	/* a deadline already past fails at once */
	rc = do_wait(k, zk_now_ns() - 1);
	if (rc != -ETIMEDOUT)
		ck_abort_msg("%s: past deadline returned %d", wait_name[k], rc);
	/* and so does the fiber's own deadline */
	zk_deadline_set(zk_now_ns() + 2 * MS);
	rc = do_wait(k, -1);
	zk_deadline_clear();
	if (rc != -ETIMEDOUT)
		ck_abort_msg("%s: fiber deadline returned %d", wait_name[k], rc);
	return NULL;
}

static int waiters_started;

static void *cancelled_waiter(void *arg)
{
	__atomic_add_fetch(&waiters_started, 1, __ATOMIC_RELAXED);
	return (void *)(intptr_t)do_wait((int)(intptr_t)arg, -1);
}

static void *every_wait_main(void *arg)
{
	objs_init();
	zk_fiber_t *runner;
	ck_assert_int_eq(zk_spawn(&runner, once_runner, NULL), 0);
	zk_sleep_ns(MS); /* the runner is inside the once function */
	zk_fiber_t *f[W_COUNT];
	for (intptr_t k = 0; k < W_COUNT; k++)
		ck_assert_int_eq(zk_spawn(&f[k], timed_waiter, (void *)k), 0);
	for (int k = 0; k < W_COUNT; k++)
		join_rc(f[k]);
	for (intptr_t k = 0; k < W_COUNT; k++)
		ck_assert_int_eq(zk_spawn(&f[k], cancelled_waiter, (void *)k), 0);
	while (__atomic_load_n(&waiters_started, __ATOMIC_RELAXED) < W_COUNT)
		zk_sleep_ns(MS);
	zk_sleep_ns(3 * MS); /* parked by now, most likely: cancel works either way */
	for (int k = 0; k < W_COUNT; k++)
		ck_assert_int_eq(zk_cancel(f[k]), 0);
	for (int k = 0; k < W_COUNT; k++) {
		intptr_t rc = join_rc(f[k]);
		if (rc != -ECANCELED)
			ck_abort_msg("%s: cancelled wait returned %ld", wait_name[k], (long)rc);
	}
	objs_check_and_fini();
	ck_assert_int_eq(join_rc(runner), 0);
	return NULL;
}

START_TEST(test_every_wait_times_out_and_is_cancellable_leaving_objects_consistent)
{
	run_on(2, every_wait_main, NULL);
}
END_TEST

/* ---- the other primitives doing their job ------------------------------------ */

struct pc {
	zk_mutex_t mu;
	zk_cond_t cv;
	int items;
	int consumed;
};

static void *cond_consumer(void *arg)
{
	struct pc *p = arg;
	for (int i = 0; i < 500; i++) {
		zk_mutex_lock(&p->mu);
		while (p->items == 0)
			ck_assert_int_eq(zk_cond_wait(&p->cv, &p->mu), 0);
		p->items--;
		p->consumed++;
		zk_mutex_unlock(&p->mu);
	}
	return NULL;
}

static void *cond_main(void *arg)
{
	struct pc *p = arg;
	zk_fiber_t *c[4];
	for (int i = 0; i < 4; i++)
		zk_spawn(&c[i], cond_consumer, p);
	for (int i = 0; i < 2000; i++) {
		zk_mutex_lock(&p->mu);
		p->items++;
		if (i % 2)
			zk_cond_signal(&p->cv);
		else
			zk_cond_broadcast(&p->cv);
		zk_mutex_unlock(&p->mu);
		if (i % 7 == 0)
			zk_yield();
	}
	for (int i = 0; i < 4; i++)
		join_rc(c[i]);
	return NULL;
}

START_TEST(test_cond_producer_consumer_loses_no_wakeup)
{
	struct pc p;
	memset(&p, 0, sizeof(p));
	run_on(2, cond_main, &p);
	ck_assert_int_eq(p.consumed, 2000);
}
END_TEST

struct rwt {
	zk_rwlock_t rw;
	int readers, max_readers, writers;
	long value;
};

static void *rw_worker(void *arg)
{
	struct rwt *t = arg;
	for (int i = 0; i < 300; i++) {
		if (i % 5 == 0) {
			ck_assert_int_eq(zk_rwlock_wrlock(&t->rw), 0);
			ck_assert_int_eq(__atomic_add_fetch(&t->writers, 1, __ATOMIC_RELAXED), 1);
			ck_assert_int_eq(__atomic_load_n(&t->readers, __ATOMIC_RELAXED), 0);
			t->value++;
			zk_yield();
			__atomic_sub_fetch(&t->writers, 1, __ATOMIC_RELAXED);
		} else {
			ck_assert_int_eq(zk_rwlock_rdlock(&t->rw), 0);
			int r = __atomic_add_fetch(&t->readers, 1, __ATOMIC_RELAXED);
			ck_assert_int_eq(__atomic_load_n(&t->writers, __ATOMIC_RELAXED), 0);
			if (r > __atomic_load_n(&t->max_readers, __ATOMIC_RELAXED))
				__atomic_store_n(&t->max_readers, r, __ATOMIC_RELAXED);
			zk_yield();
			__atomic_sub_fetch(&t->readers, 1, __ATOMIC_RELAXED);
		}
		ck_assert_int_eq(zk_rwlock_unlock(&t->rw), 0);
	}
	return NULL;
}

static void *rw_main(void *arg)
{
	zk_fiber_t *f[16];
	for (int i = 0; i < 16; i++)
		zk_spawn(&f[i], rw_worker, arg);
	for (int i = 0; i < 16; i++)
		join_rc(f[i]);
	return NULL;
}

START_TEST(test_rwlock_excludes_writers_and_shares_readers)
{
	struct rwt t;
	memset(&t, 0, sizeof(t));
	run_on(2, rw_main, &t);
	ck_assert_int_eq(t.value, 16 * 60);
	ck_assert_int_gt(t.max_readers, 1);
	ck_assert_int_eq(zk_rwlock_destroy(&t.rw), 0);
}
END_TEST

struct semt {
	zk_sem_t sem;
	int in, max_in;
	zk_waitgroup_t wg;
	zk_barrier_t bar;
	int serial;
	zk_once_t once;
	int once_runs;
};

static void once_fn(void *arg)
{
	struct semt *t = arg;
	zk_sleep_ns(MS); /* others arrive meanwhile and wait */
	t->once_runs++;
}

static void *sem_worker(void *arg)
{
	struct semt *t = arg;
	ck_assert_int_eq(zk_once(&t->once, once_fn, t), 0);
	ck_assert_int_eq(__atomic_load_n(&t->once_runs, __ATOMIC_RELAXED), 1);
	for (int i = 0; i < 50; i++) {
		ck_assert_int_eq(zk_sem_wait(&t->sem), 0);
		int n = __atomic_add_fetch(&t->in, 1, __ATOMIC_RELAXED);
		ck_assert_int_le(n, 3);
		if (n > __atomic_load_n(&t->max_in, __ATOMIC_RELAXED))
			__atomic_store_n(&t->max_in, n, __ATOMIC_RELAXED);
		zk_yield();
		__atomic_sub_fetch(&t->in, 1, __ATOMIC_RELAXED);
		ck_assert_int_eq(zk_sem_post(&t->sem), 0);
	}
	for (int round = 0; round < 3; round++) {
		int rc = zk_barrier_wait(&t->bar);
		ck_assert(rc == 0 || rc == ZK_BARRIER_SERIAL);
		if (rc == ZK_BARRIER_SERIAL)
			__atomic_add_fetch(&t->serial, 1, __ATOMIC_RELAXED);
	}
	zk_waitgroup_done(&t->wg);
	return NULL;
}

static void *sem_main(void *arg)
{
	struct semt *t = arg;
	ck_assert_int_eq(zk_waitgroup_add(&t->wg, 10), 0);
	for (int i = 0; i < 10; i++)
		zk_spawn(NULL, sem_worker, t);
	ck_assert_int_eq(zk_waitgroup_wait(&t->wg), 0);
	ck_assert_int_eq(t->serial, 3);
	return NULL;
}

START_TEST(test_semaphore_waitgroup_barrier_and_once_work_across_workers)
{
	struct semt t;
	memset(&t, 0, sizeof(t));
	ck_assert_int_eq(zk_sem_init(&t.sem, 3), 0);
	ck_assert_int_eq(zk_waitgroup_init(&t.wg), 0);
	ck_assert_int_eq(zk_barrier_init(&t.bar, 10), 0);
	run_on(2, sem_main, &t);
	ck_assert_int_eq(t.once_runs, 1);
	ck_assert_int_eq(t.max_in >= 1 && t.max_in <= 3, 1);
	ck_assert_int_eq(zk_sem_value(&t.sem), 3);
}
END_TEST

/* ---- plain threads and fibers sharing objects ---------------------------------- */

struct mixed {
	zk_chan_t *to_thread, *to_fiber;
	zk_mutex_t mu;
	long counter;
	int thread_timeout_rc;
};

static void *plain_thread(void *arg)
{
	struct mixed *m = arg;
	int v;
	/* a timed wait on a plain thread (on a channel nobody sends to) */
	zk_chan_t *silent;
	ck_assert_int_eq(zk_chan_create(&silent, sizeof(int), 0), 0);
	m->thread_timeout_rc = zk_chan_recv_timed(silent, &v, zk_now_ns() + 2 * MS);
	ck_assert_int_eq(zk_chan_destroy(silent), 0);
	for (int i = 0; i < 2000; i++) {
		ck_assert_int_eq(zk_chan_recv(m->to_thread, &v), 0);
		ck_assert_int_eq(v, i);
		v = -v;
		ck_assert_int_eq(zk_chan_send(m->to_fiber, &v), 0);
		zk_mutex_lock(&m->mu);
		m->counter++;
		zk_mutex_unlock(&m->mu);
	}
	return NULL;
}

static void *mixed_main(void *arg)
{
	struct mixed *m = arg;
	pthread_t th;
	ck_assert_int_eq(pthread_create(&th, NULL, plain_thread, m), 0);
	zk_sleep_ns(5 * MS);
	for (int i = 0; i < 2000; i++) {
		int v = i;
		ck_assert_int_eq(zk_chan_send(m->to_thread, &v), 0);
		ck_assert_int_eq(zk_chan_recv(m->to_fiber, &v), 0);
		ck_assert_int_eq(v, -i);
		zk_mutex_lock(&m->mu);
		m->counter++;
		zk_mutex_unlock(&m->mu);
	}
	pthread_join(th, NULL); /* the thread has finished its last send by now */
	return NULL;
}

START_TEST(test_fibers_and_plain_threads_share_channels_and_mutexes)
{
	struct mixed m;
	memset(&m, 0, sizeof(m));
	ck_assert_int_eq(zk_chan_create(&m.to_thread, sizeof(int), 0), 0);
	ck_assert_int_eq(zk_chan_create(&m.to_fiber, sizeof(int), 0), 0);
	run_on(2, mixed_main, &m);
	ck_assert_int_eq(m.thread_timeout_rc, -ETIMEDOUT);
	ck_assert_int_eq(m.counter, 4000);
	zk_chan_destroy(m.to_thread);
	zk_chan_destroy(m.to_fiber);
}
END_TEST

/* ---- backpressure: a slow sink holds a fast source back --------------------------- */

struct bp {
	zk_chan_t *a, *b;      /* source -> stage -> sink, capacity 8 each */
	long produced, consumed;
	long max_ahead;         /* produced - consumed, at most */
};

static void *bp_source(void *arg)
{
	struct bp *p = arg;
	for (long i = 0; i < 300; i++) {
		ck_assert_int_eq(zk_chan_send(p->a, &i), 0);
		long ahead = __atomic_add_fetch(&p->produced, 1, __ATOMIC_RELAXED) -
			     __atomic_load_n(&p->consumed, __ATOMIC_RELAXED);
		if (ahead > p->max_ahead)
			p->max_ahead = ahead;
	}
	zk_chan_close(p->a);
	return NULL;
}

static void *bp_stage(void *arg)
{
	struct bp *p = arg;
	long v;
	while (zk_chan_recv(p->a, &v) == 0)
		ck_assert_int_eq(zk_chan_send(p->b, &v), 0);
	zk_chan_close(p->b);
	return NULL;
}

static void *bp_sink(void *arg)
{
	struct bp *p = arg;
	long v, expect = 0;
	while (zk_chan_recv(p->b, &v) == 0) {
		ck_assert_int_eq(v, expect++);
		if (expect % 10 == 0)
			zk_sleep_ns(MS / 2);
		__atomic_add_fetch(&p->consumed, 1, __ATOMIC_RELAXED);
	}
	ck_assert_int_eq(expect, 300);
	return NULL;
}

static void *bp_main(void *arg)
{
	struct bp *p = arg;
	zk_fiber_t *f[3];
	zk_spawn(&f[0], bp_source, p);
	zk_spawn(&f[1], bp_stage, p);
	zk_spawn(&f[2], bp_sink, p);
	for (int i = 0; i < 3; i++)
		join_rc(f[i]);
	return NULL;
}

START_TEST(test_bounded_pipeline_keeps_memory_bounded_when_the_sink_is_slow)
{
	struct bp p;
	memset(&p, 0, sizeof(p));
	ck_assert_int_eq(zk_chan_create(&p.a, sizeof(long), 8), 0);
	ck_assert_int_eq(zk_chan_create(&p.b, sizeof(long), 8), 0);
	run_on(2, bp_main, &p);
	/* in flight: two buffers, the stage's element, the sink's element */
	ck_assert_int_le(p.max_ahead, 8 + 8 + 2 + 1);
	ck_assert_int_eq(zk_chan_destroy(p.a), 0);
	ck_assert_int_eq(zk_chan_destroy(p.b), 0);
}
END_TEST

/* ---- scopes ---------------------------------------------------------------------- */

static int scope_cancelled, scope_finished;

static int sleepy_member(void *arg)
{
	int rc = zk_sleep_ns(10000 * MS);
	if (rc == -ECANCELED)
		__atomic_add_fetch(&scope_cancelled, 1, __ATOMIC_RELAXED);
	return rc == -ECANCELED ? 0 : rc;
}

static int failing_member(void *arg)
{
	zk_sleep_ns(2 * MS);
	return -EIO;
}

static int quick_member(void *arg)
{
	zk_yield();
	__atomic_add_fetch(&scope_finished, 1, __ATOMIC_RELAXED);
	return 0;
}

static void *scope_main(void *arg)
{
	zk_scope_t *s;
	/* all succeed: end waits for every member and returns 0 */
	ck_assert_int_eq(zk_scope_begin(&s), 0);
	for (int i = 0; i < 100; i++)
		ck_assert_int_eq(zk_scope_spawn(s, quick_member, NULL), 0);
	ck_assert_int_eq(zk_scope_end(s), 0);
	ck_assert_int_eq(scope_finished, 100);

	/* one fails: the others are cancelled, its error is returned */
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(zk_scope_begin(&s), 0);
	for (int i = 0; i < 10; i++)
		ck_assert_int_eq(zk_scope_spawn(s, sleepy_member, NULL), 0);
	ck_assert_int_eq(zk_scope_spawn(s, failing_member, NULL), 0);
	ck_assert_int_eq(zk_scope_end(s), -EIO);
	ck_assert_int_eq(scope_cancelled, 10);
	ck_assert_int_lt(zk_now_ns() - t0, 5000 * MS);

	/* spawning into a failed scope is refused */
	ck_assert_int_eq(zk_scope_begin(&s), 0);
	ck_assert_int_eq(zk_scope_spawn(s, failing_member, NULL), 0);
	int rc;
	while ((rc = zk_scope_spawn(s, quick_member, NULL)) == 0)
		zk_sleep_ns(MS); /* until the failure has cancelled the scope */
	ck_assert_int_eq(rc, -ECANCELED);
	ck_assert_int_eq(zk_scope_end(s), -EIO);
	return NULL;
}

START_TEST(test_scope_first_failure_cancels_the_rest_and_is_returned)
{
	scope_cancelled = scope_finished = 0;
	run_on(2, scope_main, NULL);
}
END_TEST

/* The owner is cancelled while it waits: members are cancelled, and the
 * owner returns only after they all ended. */
static int members_alive;

static int counted_member(void *arg)
{
	__atomic_add_fetch(&members_alive, 1, __ATOMIC_RELAXED);
	zk_sleep_ns(10000 * MS);
	zk_sleep_ns(MS); /* cancelled: returns at once, still "running" a bit */
	__atomic_sub_fetch(&members_alive, 1, __ATOMIC_RELAXED);
	return 0;
}

static void *scope_owner(void *arg)
{
	zk_scope_t *s;
	ck_assert_int_eq(zk_scope_begin(&s), 0);
	for (int i = 0; i < 20; i++)
		ck_assert_int_eq(zk_scope_spawn(s, counted_member, NULL), 0);
	int rc = zk_scope_end(s);
	ck_assert_int_eq(__atomic_load_n(&members_alive, __ATOMIC_RELAXED), 0);
	return (void *)(intptr_t)rc;
}

static void *scope_owner_main(void *arg)
{
	zk_fiber_t *owner;
	ck_assert_int_eq(zk_spawn(&owner, scope_owner, NULL), 0);
	while (__atomic_load_n(&members_alive, __ATOMIC_RELAXED) < 20)
		zk_sleep_ns(MS);
	ck_assert_int_eq(zk_cancel(owner), 0);
	ck_assert_int_eq(join_rc(owner), -ECANCELED);
	return NULL;
}

START_TEST(test_scope_owner_cancelled_cancels_members_and_outlives_them)
{
	members_alive = 0;
	run_on(2, scope_owner_main, NULL);
}
END_TEST

/* ---- generators ---------------------------------------------------------------------- */

struct naturals {
	int *resource;  /* allocated while running, freed on the way out */
	int yielded;
	int exit_rc;
};

static void naturals(zk_gen_t *g, void *arg)
{
	struct naturals *n = arg;
	n->resource = malloc(1024);
	int rc = 0;
	for (int i = 0; rc == 0; i++) {
		rc = zk_gen_yield(g, &i);
		if (rc == 0)
			n->yielded++;
	}
	n->exit_rc = rc;
	free(n->resource);
	n->resource = NULL;
}

static void three(zk_gen_t *g, void *arg)
{
	for (int i = 1; i <= 3; i++)
		if (zk_gen_yield(g, &i))
			return;
}

static void *gen_main(void *arg)
{
	/* runs to its end: next reports -EPIPE */
	zk_gen_t *g;
	int v;
	ck_assert_int_eq(zk_gen_create(&g, sizeof(int), three, NULL), 0);
	for (int i = 1; i <= 3; i++) {
		ck_assert_int_eq(zk_gen_next(g, &v), 0);
		ck_assert_int_eq(v, i);
	}
	ck_assert_int_eq(zk_gen_next(g, &v), -EPIPE);
	ck_assert_int_eq(zk_gen_next(g, &v), -EPIPE);
	ck_assert_int_eq(zk_gen_destroy(g), 0);

	/* abandoned mid-stream: the generator unwinds and frees */
	struct naturals n = { NULL, 0, 0 };
	ck_assert_int_eq(zk_gen_create(&g, sizeof(int), naturals, &n), 0);
	zk_sleep_ns(MS);
	ck_assert_int_eq(n.yielded, 0); /* lazy: nothing before the first next */
	for (int i = 0; i < 10; i++) {
		ck_assert_int_eq(zk_gen_next(g, &v), 0);
		ck_assert_int_eq(v, i);
	}
	ck_assert_ptr_nonnull(n.resource);
	ck_assert_int_eq(zk_gen_destroy(g), 0);
	ck_assert_ptr_null(n.resource);
	ck_assert_int_le(n.yielded, 11);
	ck_assert(n.exit_rc == -EPIPE || n.exit_rc == -ECANCELED);

	/* abandoned before it ever ran */
	ck_assert_int_eq(zk_gen_create(&g, sizeof(int), naturals, &n), 0);
	ck_assert_int_eq(zk_gen_destroy(g), 0);
	return NULL;
}

START_TEST(test_generator_yields_in_order_and_can_be_abandoned_mid_stream)
{
	run_on(2, gen_main, NULL);
}
END_TEST

/* ---- end combinators: zk_join_timed, zk_wait_first ------------------------ */

static void run2(zk_fiber_fn fn, void *arg)
{
	run_on(2, fn, arg);
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

int main(void)
{
	Suite *s = suite_create("sync");
	TCase *tc = tcase_create("sync");
	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, test_chan_mpmc_delivers_a_million_messages_exactly_once);
	tcase_add_test(tc, test_chan_rendezvous_and_unbounded_deliver_exactly_once);
	tcase_add_test(tc, test_mutex_counter_incremented_by_1000_fibers_is_exact);
	tcase_add_test(tc, test_mutex_barges_then_hands_off_to_a_starving_waiter_in_arrival_order);
	tcase_add_test(tc, test_mutex_waiters_do_not_starve_behind_barging_lockers);
	tcase_add_test(tc, test_chan_close_wakes_parked_senders_and_receivers);
	tcase_add_test(tc, test_select_chooses_uniformly_among_ready_cases);
	tcase_add_test(tc, test_select_waits_times_out_and_has_a_default);
	tcase_add_test(tc, test_concurrent_selects_receive_every_value_once);
	tcase_add_test(tc, test_every_wait_times_out_and_is_cancellable_leaving_objects_consistent);
	tcase_add_test(tc, test_cond_producer_consumer_loses_no_wakeup);
	tcase_add_test(tc, test_rwlock_excludes_writers_and_shares_readers);
	tcase_add_test(tc, test_semaphore_waitgroup_barrier_and_once_work_across_workers);
	tcase_add_test(tc, test_fibers_and_plain_threads_share_channels_and_mutexes);
	tcase_add_test(tc, test_bounded_pipeline_keeps_memory_bounded_when_the_sink_is_slow);
	tcase_add_test(tc, test_scope_first_failure_cancels_the_rest_and_is_returned);
	tcase_add_test(tc, test_scope_owner_cancelled_cancels_members_and_outlives_them);
	tcase_add_test(tc, test_generator_yields_in_order_and_can_be_abandoned_mid_stream);
	tcase_add_test(tc, test_join_timed_expires_then_a_later_join_succeeds);
	tcase_add_test(tc, test_wait_first_returns_the_first_to_end_across_two_workers);
	tcase_add_test(tc, test_wait_first_cancels_the_rest_when_asked);
	tcase_add_test(tc, test_wait_first_times_out_and_is_cancellable_leaving_tasks_alone);
	tcase_add_test(tc, test_end_waits_racing_timeouts_stay_consistent);
	suite_add_tcase(s, tc);
	SRunner *sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
