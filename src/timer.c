/*
 * timer.c - per-worker timers, sleeps and deadlines.
 *
 * Structure.  Each worker owns a 4-ary min-heap of pending timers.  A heap
 * slot holds the deadline and a pointer to the record; the record holds its
 * slot index, so a timer can be removed from the middle in O(log n).
 *   arm       O(log4 n): append, sift up (one comparison per level)
 *   disarm    O(log4 n): move the last slot into the hole, sift up or down
 *   fire      O(log4 n) per due timer: pop the minimum, sift down (four
 *             comparisons per level, on one or two cache lines: the four
 *             children of a slot are adjacent, 16 bytes each)
 *   peek      O(1): the earliest deadline is kept in an atomic so the
 *             scheduler's per-round check is one load (plus a clock read
 *             only when something is pending)
 * With 1,000,000 pending timers the heap is 10 levels deep and its array
 * 16 MiB; the records themselves belong to their users (a timed park keeps
 * its record on the fiber's stack), so an armed timer costs 16 bytes here.
 * A timing wheel would make arm/disarm O(1) but rounds deadlines to its
 * tick (or cascades); the heap keeps nanosecond deadlines exact and is
 * cheap enough at this scale.
 *
 * Ownership and threads.  A timer is armed on the worker that parks (timed
 * parks arm inside publish, which runs on that worker), and only that
 * worker fires it.  The fiber, though, may be woken by something else and
 * resume on another worker, which then disarms the timer: so each heap has
 * a mutex, taken by the owner for arm and fire and by anyone for disarm.
 * fire() calls the expiry function with the lock held; disarm() takes the
 * same lock, so once disarm returns the expiry has either completed or will
 * never run.  That is what stops a timer of an earlier park from waking a
 * later one: zk__park_until disarms before it returns, and a fiber cannot
 * park again before that.
 */
#include "config.h"
#include "timer.h"
#include "scheduler.h"

#include <errno.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ZK__HEAP_D 4

int64_t zk__now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- the heap ------------------------------------------------------------ */

/* A slot holds the deadline beside the record's pointer, so comparisons
 * stay in the heap's array; only a tie reads the records (for seq).  Moving
 * a record still writes its idx. */
static inline int earlier(struct zk__slot a, struct zk__slot b)
{
	return a.when < b.when || (a.when == b.when && a.t->seq < b.t->seq);
}

static inline void place(struct zk__timers *ts, uint32_t i, struct zk__slot s)
{
	ts->heap[i] = s;
	s.t->idx = i;
}

static void sift_up(struct zk__timers *ts, uint32_t i, struct zk__slot s)
{
	while (i > 0) {
		uint32_t p = (i - 1) / ZK__HEAP_D;
		struct zk__slot ps = ts->heap[p];
		if (!earlier(s, ps))
			break;
		place(ts, i, ps);
		i = p;
	}
	place(ts, i, s);
}

static void sift_down(struct zk__timers *ts, uint32_t i, struct zk__slot s)
{
	for (;;) {
		uint32_t c = i * ZK__HEAP_D + 1;
		if (c >= ts->n)
			break;
		uint32_t end = c + ZK__HEAP_D < ts->n ? c + ZK__HEAP_D : ts->n;
		uint32_t m = c;
		for (uint32_t k = c + 1; k < end; k++)
			if (earlier(ts->heap[k], ts->heap[m]))
				m = k;
		if (!earlier(ts->heap[m], s))
			break;
		place(ts, i, ts->heap[m]);
		i = m;
	}
	place(ts, i, s);
}

static void update_next(struct zk__timers *ts)
{
	int64_t next = ts->n ? ts->heap[0].when : ZK__NO_DEADLINE;
	atomic_store_explicit(&ts->next, next, memory_order_relaxed);
}

/* Take slot i out of the heap (lock held). */
static void heap_remove(struct zk__timers *ts, uint32_t i)
{
	ts->heap[i].t->idx = ZK__TIMER_IDLE;
	struct zk__slot last = ts->heap[--ts->n];
	if (i < ts->n) {
		if (i > 0 && earlier(last, ts->heap[(i - 1) / ZK__HEAP_D]))
			sift_up(ts, i, last);
		else
			sift_down(ts, i, last);
	}
}

void zk__timers_init(struct zk__timers *ts)
{
	pthread_mutex_init(&ts->lock, NULL);
	ts->heap = NULL;
	ts->n = ts->cap = 0;
	ts->seq = 0;
	atomic_init(&ts->next, ZK__NO_DEADLINE);
}

void zk__timers_fini(struct zk__timers *ts)
{
	free(ts->heap);
	ts->heap = NULL;
	ts->n = ts->cap = 0;
	pthread_mutex_destroy(&ts->lock);
}

void zk__timer_init(struct zk__timer *t, zk__timer_fn fn, zk_fiber_t *fiber, void *arg)
{
	t->when = 0;
	t->seq = 0;
	t->idx = ZK__TIMER_IDLE;
	t->owner = NULL;
	t->fn = fn;
	t->fiber = fiber;
	t->arg = arg;
}

int zk__timer_arm(struct zk__timers *ts, struct zk__timer *t, int64_t when)
{
	pthread_mutex_lock(&ts->lock);
	if (ts->n == ts->cap) {
		uint32_t cap = ts->cap ? ts->cap * 2 : 64;
		struct zk__slot *h = realloc(ts->heap, cap * sizeof(*h));
		if (!h) {
			pthread_mutex_unlock(&ts->lock);
			return -ENOMEM;
		}
		ts->heap = h;
		ts->cap = cap;
	}
	t->when = when;
	t->seq = ts->seq++;
	t->owner = ts;
	sift_up(ts, ts->n++, (struct zk__slot){ when, t });
	update_next(ts);
	pthread_mutex_unlock(&ts->lock);
	return 0;
}

int zk__timer_disarm(struct zk__timer *t)
{
	/* owner is only written by arm, which happens-before any disarm of
	 * the same record (same fiber, or published with it). */
	struct zk__timers *ts = t->owner;
	if (!ts)
		return 0;
	pthread_mutex_lock(&ts->lock);
	int pending = t->idx != ZK__TIMER_IDLE;
	if (pending) {
		heap_remove(ts, t->idx);
		update_next(ts);
	}
	pthread_mutex_unlock(&ts->lock);
	t->owner = NULL;
	return pending;
}

/* At most this many per call, so one call stays short; the scheduler calls
 * again before it sleeps (a deadline already due never lets it sleep). */
#define ZK__FIRE_BATCH 64

int zk__timers_fire(struct zk__timers *ts, int64_t now)
{
	if (zk__timers_next(ts) > now)
		return 0;
	struct zk__timer *due[ZK__FIRE_BATCH];
	int k = 0;
	pthread_mutex_lock(&ts->lock);
	while (k < ZK__FIRE_BATCH && ts->n && ts->heap[0].when <= now) {
		due[k++] = ts->heap[0].t;
		heap_remove(ts, 0);
	}
	/* Latest first: the scheduler runs the fiber it woke last first (LIFO
	 * slot, then the newest end of the deque), so fibers whose timers are
	 * due together run in deadline order. */
	for (int i = k; i-- > 0;) {
		struct zk__timer *t = due[i];
		if (t->fn)
			t->fn(t);
		else
			zk__unpark(t->fiber, -ETIMEDOUT);
	}
	update_next(ts);
	pthread_mutex_unlock(&ts->lock);
	return k;
}

/* ---- timed parking ------------------------------------------------------- */

int64_t zk__effective_deadline(int64_t deadline)
{
	if (deadline < 0)
		deadline = ZK__NO_DEADLINE;
	zk_fiber_t *self = zk__self();
	if (self && self->deadline < deadline)
		deadline = self->deadline;
	return deadline;
}

struct park_until {
	zk__publish_fn publish;
	void *arg;
	struct zk__timer timer;
	int64_t when;
};

static int publish_nothing(zk_fiber_t *self, void *arg)
{
	return 0;
}

/* Runs on the parking worker after the fiber's context is saved: arm the
 * timer first, so that whoever publish lets wake the fiber finds the timer
 * already armed (and disarms it after resuming). */
static int park_until_publish(zk_fiber_t *self, void *arg)
{
	struct park_until *pu = arg;
	struct zk__worker *w = zk__worker_self();
	if (zk__timer_arm(&w->timers, &pu->timer, pu->when) != 0) {
		/* No memory for the heap: wake at once as if timed out. */
		zk__unpark(self, -ETIMEDOUT);
	}
	if (pu->publish(self, pu->arg)) {
		zk__timer_disarm(&pu->timer);
		return 1;
	}
	return 0;
}

/* zk__park_until's path with a deadline that has not passed yet (the
 * caller looked), out of line so that the common untimed park is a plain
 * tail call. */
static __attribute__((noinline)) int park_timed(zk_fiber_t *self, const char *what,
						zk__publish_fn publish, void *arg, int flags,
						int64_t deadline)
{
	struct park_until pu = { publish, arg, { 0 }, deadline };
	zk__timer_init(&pu.timer, NULL, self, NULL);
	int rc = zk__park(what, park_until_publish, &pu, flags);
	zk__timer_disarm(&pu.timer);
	return rc;
}

int zk__park_until(const char *what, zk__publish_fn publish, void *arg, int flags,
		   int64_t deadline)
{
	zk_fiber_t *self = zk__self();
	if (!self)
		return -EPERM;
	if (!publish)
		publish = publish_nothing;
	if (deadline < 0)
		deadline = ZK__NO_DEADLINE;
	if (!(flags & ZK__PARK_NO_FIBER_DEADLINE) && self->deadline < deadline)
		deadline = self->deadline;
	if (deadline == ZK__NO_DEADLINE)
		return zk__park(what, publish, arg,
				flags & (ZK__PARK_CANCELLABLE | ZK__PARK_PUBLISH_LAST));
	if (deadline <= zk__now())
		return -ETIMEDOUT;
	/* park_until_publish still touches its record after the inner
	 * publish: never PUBLISH_LAST */
	return park_timed(self, what, publish, arg, flags & ZK__PARK_CANCELLABLE, deadline);
}

/* ---- plain threads -------------------------------------------------------- */

int zk__waiter_block_until(struct zk__waiter *w, int64_t deadline)
{
	if (deadline == ZK__NO_DEADLINE) {
		zk__waiter_block(w);
		return 0;
	}
	struct timespec ts = { (time_t)(deadline / 1000000000), (long)(deadline % 1000000000) };
	while (atomic_load_explicit(&w->futex, memory_order_acquire) == 0) {
		/* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time. */
		long r = syscall(SYS_futex, &w->futex, FUTEX_WAIT_BITSET_PRIVATE, 0, &ts, NULL,
				 FUTEX_BITSET_MATCH_ANY);
		if (r != 0 && errno == ETIMEDOUT)
			return atomic_load_explicit(&w->futex, memory_order_acquire) ? 0 : -ETIMEDOUT;
	}
	return 0;
}

/* ---- public API ------------------------------------------------------------ */

int64_t zk_now_ns(void)
{
	return zk__now();
}

int zk_sleep_until(int64_t deadline_ns)
{
	zk_fiber_t *self = zk__self();
	if (!self) {
		struct timespec ts = { (time_t)(deadline_ns / 1000000000),
				       (long)(deadline_ns % 1000000000) };
		if (deadline_ns <= 0)
			return 0;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
			;
		return 0;
	}
	if (atomic_load_explicit(&self->cancel, memory_order_relaxed))
		return -ECANCELED;
	/* One clock read: the fiber's deadline is checked against it too,
	 * and a timer that fires for the sleep's own end needs none. */
	int64_t now = zk__now();
	if (deadline_ns <= now)
		return 0;
	if (self->deadline <= now)
		return -ETIMEDOUT;
	if (self->deadline >= deadline_ns) {
		int rc = park_timed(self, "sleep", publish_nothing, NULL, ZK__PARK_CANCELLABLE,
				    deadline_ns);
		return rc == -ETIMEDOUT ? 0 : rc;
	}
	/* The fiber's deadline comes first: it ends the sleep with
	 * -ETIMEDOUT, unless the sleep's end has passed by then as well. */
	int rc = park_timed(self, "sleep", publish_nothing, NULL, ZK__PARK_CANCELLABLE,
			    self->deadline);
	if (rc == -ETIMEDOUT && zk__now() >= deadline_ns)
		return 0;
	return rc;
}

int zk_sleep_ns(int64_t ns)
{
	if (ns < 0)
		ns = 0;
	return zk_sleep_until(zk__now() + ns);
}

int zk_deadline_set(int64_t deadline_ns)
{
	zk_fiber_t *self = zk__self();
	if (!self)
		return -EPERM;
	self->deadline = deadline_ns < 0 ? ZK__NO_DEADLINE : deadline_ns;
	return 0;
}

int zk_deadline_clear(void)
{
	return zk_deadline_set(-1);
}

int64_t zk_deadline_get(void)
{
	zk_fiber_t *self = zk__self();
	return self && self->deadline != ZK__NO_DEADLINE ? self->deadline : -1;
}
