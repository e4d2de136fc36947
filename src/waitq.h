/*
 * waitq.h - the waiting machinery under every sync primitive and channel:
 * a spin lock guarding the primitive, FIFO queues of waiter nodes, and one
 * wait function that parks a fiber or blocks a plain thread.
 *
 * The protocol, for a primitive P guarded by P->lock:
 *
 *   waiter                                  waker (holding P->lock)
 *   lock(P); can't proceed;                 n = zk__wq_pop_claim(&P->q);
 *   zk__wq_push(&P->q, &n);                 ...hand n what it waited for...
 *   rc = zk__wq_wait(&n, ..., unlock P);    zk__wnode_complete(n, result);
 *
 * The waiter enqueues under the lock but the lock is released only once it
 * is parked (publish-after-save, fiber.h): no waker can see the node of a
 * fiber that is not yet PARKED, so no wake-up is lost.  The waker sets
 * n->done and n->result under the lock before it wakes, so
 *   - rc == 0 means a waker completed the node: n->result is the outcome;
 *   - rc < 0 (timeout, cancellation) races with wakers: the waiter takes
 *     the lock again; if n->done is set by then the waker won and its
 *     result stands (the primitive stays consistent: e.g. a mutex handed
 *     over is owned), otherwise the waiter removes n and fails with rc.
 * A fiber woken by a waker never touches the node again after the wake,
 * and the waker never touches it after completing it, so the node may
 * live on the waiter's stack.
 *
 * Select waits on several queues with one waiter: its nodes share a
 * struct zk__wsel, and a waker must win `winner` (CAS from -1 to the
 * node's case index) before it may complete a select node.  A node whose
 * select was already won is dropped from the queue by whoever meets it.
 */
#ifndef ZK_WAITQ_H
#define ZK_WAITQ_H

#include "config.h"
#include "fiber.h"
#include "scheduler.h"
#include "timer.h"

#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>

/* ---- spin lock: guards a primitive's few words for a few instructions,
 * and stays held across the switch into a parked waiter's publish. ---- */
struct zk__spin {
	_Atomic uint32_t v;
};

static inline void zk__spin_pause(void)
{
#if defined(__x86_64__)
	__asm__ volatile("pause");
#elif defined(__aarch64__)
	__asm__ volatile("yield");
#endif
}

/* One step of waiting for another thread that is a few instructions from
 * letting go: pause, or - after a short spin, when it may have been
 * preempted (shared cores) - give it the CPU.  *spins starts at 0. */
static inline void zk__spin_backoff(unsigned *spins)
{
	if (++*spins < 64)
		zk__spin_pause();
	else
		sched_yield();
}

static inline void zk__spin_lock(struct zk__spin *l)
{
	unsigned spins = 0;
	while (atomic_exchange_explicit(&l->v, 1, memory_order_acquire))
		while (atomic_load_explicit(&l->v, memory_order_relaxed))
			zk__spin_backoff(&spins);
}

static inline void zk__spin_unlock(struct zk__spin *l)
{
	atomic_store_explicit(&l->v, 0, memory_order_release);
}

/* ---- waiter nodes and queues ---------------------------------------------- */

struct zk__wsel {
	_Atomic int winner;          /* -1 while open; case index; -2 withdrawn */
	struct zk__waiter waiter;    /* the one fiber or thread behind all nodes */
};

struct zk__wnode {
	struct zk__wnode *next, *prev;
	struct zk__waiter *waiter;   /* &own, or &sel->waiter */
	struct zk__wsel *sel;        /* NULL unless part of a select */
	void *data;                  /* primitive-specific (element buffer, ...) */
	int kind;                    /* primitive-specific (rwlock mode, case index) */
	int result;                  /* set by the waker with done */
	int done;
	int queued;
	struct zk__waiter own;
};

struct zk__wq {
	struct zk__wnode *head, *tail;
};

/* A node for the calling fiber (or plain thread). */
static inline void zk__wnode_init(struct zk__wnode *n, void *data, int kind)
{
	n->next = n->prev = NULL;
	n->own.fiber = zk__self();
	atomic_init(&n->own.futex, 0);
	n->waiter = &n->own;
	n->sel = NULL;
	n->data = data;
	n->kind = kind;
	n->result = 0;
	n->done = 0;
	n->queued = 0;
}

static inline void zk__wq_push(struct zk__wq *q, struct zk__wnode *n)
{
	n->next = NULL;
	n->prev = q->tail;
	if (q->tail)
		q->tail->next = n;
	else
		q->head = n;
	q->tail = n;
	n->queued = 1;
}

/* Queue n first (a waiter that already waited and goes back in line). */
static inline void zk__wq_push_head(struct zk__wq *q, struct zk__wnode *n)
{
	n->prev = NULL;
	n->next = q->head;
	if (q->head)
		q->head->prev = n;
	else
		q->tail = n;
	q->head = n;
	n->queued = 1;
}

static inline void zk__wq_remove(struct zk__wq *q, struct zk__wnode *n)
{
	if (!n->queued)
		return;
	if (n->prev)
		n->prev->next = n->next;
	else
		q->head = n->next;
	if (n->next)
		n->next->prev = n->prev;
	else
		q->tail = n->prev;
	n->next = n->prev = NULL;
	n->queued = 0;
}

static inline int zk__wq_empty(const struct zk__wq *q)
{
	return q->head == NULL;
}

/* May the caller (a waker) complete n?  Always for a plain node; for a
 * select node only if this call wins the select. */
static inline int zk__wnode_claim(struct zk__wnode *n)
{
	if (!n->sel)
		return 1;
	int open = -1;
	return atomic_compare_exchange_strong_explicit(&n->sel->winner, &open, n->kind,
						       memory_order_acq_rel, memory_order_acquire);
}

/* Dequeue the first node the caller may complete (dropping select nodes
 * whose select is over), or NULL. */
static inline struct zk__wnode *zk__wq_pop_claim(struct zk__wq *q)
{
	struct zk__wnode *n;
	while ((n = q->head)) {
		zk__wq_remove(q, n);
		if (zk__wnode_claim(n))
			return n;
	}
	return NULL;
}

/* Complete a dequeued, claimed node and wake its waiter (lock held). */
static inline void zk__wnode_complete(struct zk__wnode *n, int result)
{
	n->result = result;
	n->done = 1;
	zk__waiter_wake(n->waiter);
}

/* Release the primitive's lock(s) once parked, then wait: see above.
 * unlock(arg) is called exactly once, before this returns.  Returns 0 if
 * woken by a waker, -ETIMEDOUT (deadline, combined with the fiber's own),
 * -ECANCELED (only with ZK__PARK_CANCELLABLE). */
int zk__wq_wait(struct zk__waiter *w, const char *what, void (*unlock)(void *), void *arg,
		int flags, int64_t deadline);

/* zk__wq_wait for the common case of one spin lock. */
static inline void zk__spin_unlock_cb(void *l)
{
	zk__spin_unlock(l);
}

/* Wait with n queued on a primitive guarded by lock (held on entry).
 *   - n->done set: a waker completed n; the result is n->result and the
 *     lock is NOT held - the waiter does not touch the object again, so a
 *     waker may destroy it as soon as its own call returns (a sender
 *     freeing a channel after its last send, say);
 *   - n->done clear: the wait failed (timeout, cancellation); n is off the
 *     queue, the lock IS held for the caller to repair state and release.
 * Returns n->result or the failure. */
int zk__wq_wait_locked(struct zk__spin *lock, struct zk__wq *q, struct zk__wnode *n,
		       const char *what, int flags, int64_t deadline);

#endif
