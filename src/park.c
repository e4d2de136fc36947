/*
 * park.c - zk_park / zk_unpark: a one-permit handshake between a fiber and
 * whoever wakes it, with no queue and no lock (see zokio.h).
 *
 * Each fiber record has one byte, park_permit:
 *   NONE     no permit, the fiber is not parked in zk_park
 *   SET      an unpark arrived; the next zk_park consumes it and returns
 *   PARKED   the fiber is parked in zk_park (set by its publish step, so
 *            only once its registers are saved)
 *   CLAIMED  an unparker took PARKED and is calling zk__unpark; it stores
 *            NONE when that call has returned
 *
 * Why CLAIMED.  zk__unpark wakes whatever park the fiber is in.  If the
 * unparker let go of the word before calling it, the fiber, woken by its
 * timer meanwhile, could return and park on something else (a channel),
 * and the late zk__unpark would end that wait instead.  So the fiber never
 * leaves zk_park while the word is CLAIMED: the claim holder's zk__unpark
 * either ends this park or finds the fiber running and does nothing.  A
 * claim lasts a few instructions (zk__unpark does not block); waiting for
 * it is zk__spin_backoff.
 *
 * Transitions: NONE->SET (unpark), SET->NONE (park consumes), NONE->PARKED
 * (publish), PARKED->CLAIMED (unpark), CLAIMED->NONE (that unparker),
 * PARKED->NONE (the fiber withdraws after a timeout or cancellation).
 */
#include "config.h"
#include "scheduler.h"
#include "timer.h"
#include "waitq.h"
#include "zokio.h"

#include <errno.h>

enum { PERMIT_NONE, PERMIT_SET, PERMIT_PARKED, PERMIT_CLAIMED };

/* Wait out an unparker's claim; returns the state that follows it. */
static uint8_t settled(zk_fiber_t *f)
{
	unsigned spins = 0;
	uint8_t s;
	while ((s = atomic_load_explicit(&f->park_permit, memory_order_acquire)) == PERMIT_CLAIMED)
		zk__spin_backoff(&spins);
	return s;
}

struct park_arg {
	int published;
};

/* Runs after the fiber's registers are saved: from here an unparker may
 * find it.  Returns 1 (do not wait) if a permit arrived since zk_park
 * looked. */
static int publish_park(zk_fiber_t *self, void *arg)
{
	struct park_arg *p = arg;
	p->published = 1;
	zk__park_commit(self); /* unparkers need PARKED; p is not touched again */
	uint8_t expected = PERMIT_NONE;
	if (atomic_compare_exchange_strong_explicit(&self->park_permit, &expected, PERMIT_PARKED,
						    memory_order_acq_rel, memory_order_acquire))
		return 0;
	/* SET: only NONE->SET can have happened, and only we consume it */
	atomic_store_explicit(&self->park_permit, PERMIT_NONE, memory_order_relaxed);
	return 1;
}

int zk_park_timed(int64_t deadline_ns)
{
	zk_fiber_t *self = zk__self();
	if (!self)
		return -EPERM;
	if (settled(self) == PERMIT_SET) {
		/* only we move SET away */
		atomic_store_explicit(&self->park_permit, PERMIT_NONE, memory_order_relaxed);
		return 0;
	}
	struct park_arg p = { 0 };
	/* publish_park's CAS is its last access (PUBLISH_LAST) */
	int rc = zk__park_until("park", publish_park, &p,
				ZK__PARK_CANCELLABLE | ZK__PARK_PUBLISH_LAST, deadline_ns);
	if (rc == 0) {
		/* the permit was consumed by publish or by the unparker's claim */
		settled(self);
		return 0;
	}
	if (!p.published)
		return rc; /* a past deadline or cancellation before we waited */
	/* Woken by the timer or zk_cancel: withdraw, unless an unparker got
	 * to the word first - then its unpark is ours and we report it. */
	uint8_t expected = PERMIT_PARKED;
	if (atomic_compare_exchange_strong_explicit(&self->park_permit, &expected, PERMIT_NONE,
						    memory_order_acq_rel, memory_order_acquire))
		return rc;
	settled(self);
	return 0;
}

int zk_park(void)
{
	return zk_park_timed(-1);
}

int zk_unpark(zk_fiber_t *f)
{
	if (!f)
		return -EINVAL;
	uint8_t s = atomic_load_explicit(&f->park_permit, memory_order_acquire);
	for (;;) {
		switch (s) {
		case PERMIT_SET:
			return 0; /* one permit at most: unparks do not add up */
		case PERMIT_NONE:
			if (atomic_compare_exchange_weak_explicit(&f->park_permit, &s, PERMIT_SET,
								  memory_order_release,
								  memory_order_acquire))
				return 0;
			break;
		case PERMIT_PARKED:
			if (atomic_compare_exchange_weak_explicit(&f->park_permit, &s, PERMIT_CLAIMED,
								  memory_order_acq_rel,
								  memory_order_acquire)) {
				zk__unpark(f, 0);
				atomic_store_explicit(&f->park_permit, PERMIT_NONE, memory_order_release);
				return 0;
			}
			break;
		default: /* CLAIMED: another unpark is waking it; ours is the next permit */
			s = settled(f);
			break;
		}
	}
}
