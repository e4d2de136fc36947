/*
 * timer.h - per-worker timers, the monotonic clock, and timed parking.
 */
#ifndef ZK_TIMER_H
#define ZK_TIMER_H

#include "config.h"
#include "fiber.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/* "No deadline" inside the runtime (the public API uses any value < 0). */
#define ZK__NO_DEADLINE INT64_MAX
#define ZK__TIMER_IDLE UINT32_MAX

struct zk__timers;
struct zk__timer;

/* Called by the owning worker, with the heap's lock held, when t is due.
 * It must not arm or disarm timers of the same heap. */
typedef void (*zk__timer_fn)(struct zk__timer *t);

/* One pending expiry.  The record belongs to its user (timed parks keep it
 * on the fiber's stack); the heap only points at it while it is armed. */
struct zk__timer {
	int64_t when;               /* absolute, zk__now() clock */
	uint64_t seq;               /* arm order: equal deadlines fire FIFO */
	uint32_t idx;               /* slot in the heap, ZK__TIMER_IDLE if not armed */
	struct zk__timers *owner;   /* heap it is armed on (valid while armed) */
	zk__timer_fn fn;
	zk_fiber_t *fiber;          /* for the default fn: unpark with -ETIMEDOUT */
	void *arg;
};

/* A heap slot: a copy of the record's deadline, and the record. */
struct zk__slot {
	int64_t when;
	struct zk__timer *t;
};

/* A worker's timers: a 4-ary min-heap of slots ordered by (when, seq).  See
 * timer.c for why this shape and what it costs. */
struct zk__timers {
	pthread_mutex_t lock;
	struct zk__slot *heap;
	uint32_t n, cap;
	uint64_t seq;
	_Atomic int64_t next;       /* earliest when, ZK__NO_DEADLINE if empty */
};

/* CLOCK_MONOTONIC in nanoseconds. */
int64_t zk__now(void);

void zk__timers_init(struct zk__timers *ts);
void zk__timers_fini(struct zk__timers *ts);

/* Initialise a record whose expiry unparks fiber with -ETIMEDOUT (fn NULL)
 * or calls fn. */
void zk__timer_init(struct zk__timer *t, zk__timer_fn fn, zk_fiber_t *fiber, void *arg);

/* Arm t (not armed) to fire at when.  Returns 0 or -ENOMEM. */
int zk__timer_arm(struct zk__timers *ts, struct zk__timer *t, int64_t when);

/* Disarm t from any thread.  When this returns, t's fn is not running and
 * will not run: a record disarmed here may be freed or reused.  Returns 1
 * if t was still pending, 0 if it had fired (or was never armed). */
int zk__timer_disarm(struct zk__timer *t);

/* Fire every timer due at now (called by the owning worker).  Returns how
 * many fired. */
int zk__timers_fire(struct zk__timers *ts, int64_t now);

/* Earliest pending deadline, ZK__NO_DEADLINE if none.  A hint: another
 * thread may disarm meanwhile (which only makes it later). */
static inline int64_t zk__timers_next(struct zk__timers *ts)
{
	return atomic_load_explicit(&ts->next, memory_order_relaxed);
}

/* Park like zk__park, but wake with -ETIMEDOUT at deadline (absolute
 * zk__now() time; < 0 or ZK__NO_DEADLINE for none) or at the fiber's own
 * deadline (zk_deadline_set), whichever is earlier.  A deadline already
 * past returns -ETIMEDOUT at once without calling publish, just as a
 * cancellable park of a cancelled fiber returns -ECANCELED without
 * calling it: callers that prepare state for publish must undo it when
 * publish did not run.  The timer is armed on the parking worker before
 * publish makes the fiber visible and is disarmed before this returns, so
 * it can never end a later park. */
int zk__park_until(const char *what, zk__publish_fn publish, void *arg, int flags,
		   int64_t deadline);

/* zk__park_until flag: ignore the fiber's own deadline (for waits that must
 * complete, such as re-taking the mutex at the end of a condition wait). */
#define ZK__PARK_NO_FIBER_DEADLINE 2

/* The earlier of deadline and the calling fiber's deadline (none for a
 * plain thread's own), as ZK__NO_DEADLINE when neither is set. */
int64_t zk__effective_deadline(int64_t deadline);

/* Block a plain thread until zk__waiter_wake(w) or deadline (absolute,
 * ZK__NO_DEADLINE for none).  Returns 0 when woken, -ETIMEDOUT. */
int zk__waiter_block_until(struct zk__waiter *w, int64_t deadline);

#endif
