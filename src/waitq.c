/*
 * waitq.c - the one wait function behind every sync primitive and channel
 * (protocol in waitq.h).
 */
#include "config.h"
#include "waitq.h"

#include <errno.h>

struct wq_publish {
	void (*unlock)(void *);
	void *arg;
	int published;
};

/* Runs once the fiber is PARKED: from here on wakers may see its node. */
static int wq_publish(zk_fiber_t *self, void *arg)
{
	struct wq_publish *p = arg;
	void (*unlock)(void *) = p->unlock;
	void *unlock_arg = p->arg;
	p->published = 1;
	zk__park_commit(self); /* p lives on self's stack: done with it */
	unlock(unlock_arg);
	return 0;
}

int zk__wq_wait(struct zk__waiter *w, const char *what, void (*unlock)(void *), void *arg,
		int flags, int64_t deadline)
{
	if (w->fiber) {
		struct wq_publish p = { unlock, arg, 0 };
		int rc = zk__park_until(what, wq_publish, &p, flags, deadline);
		if (!p.published)
			unlock(arg); /* refused before parking: cancelled or past deadline */
		return rc;
	}
	unlock(arg);
	return zk__waiter_block_until(w, deadline < 0 ? ZK__NO_DEADLINE : deadline);
}

int zk__wq_wait_locked(struct zk__spin *lock, struct zk__wq *q, struct zk__wnode *n,
		       const char *what, int flags, int64_t deadline)
{
	for (;;) {
		/* publish only releases the one lock: nothing after that */
		int rc = zk__wq_wait(n->waiter, what, zk__spin_unlock_cb, lock,
				     flags | ZK__PARK_PUBLISH_LAST, deadline);
		/* rc == 0: woken by the waker that completed n (wakers set done
		 * before waking, and the wake orders it before this read). */
		if (rc == 0 && n->done)
			return n->result;
		zk__spin_lock(lock);
		if (n->done) {
			/* a waker won the race with our timeout: its result stands */
			zk__spin_unlock(lock);
			return n->result;
		}
		if (rc) {
			zk__wq_remove(q, n);
			return rc;
		}
		/* Woken without a completion (cannot happen by the protocol;
		 * tolerate it): still queued, wait again. */
		atomic_store_explicit(&n->waiter->futex, 0, memory_order_relaxed);
	}
}
