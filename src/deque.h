/*
 * deque.h - bounded Chase-Lev work-stealing deque of fiber pointers.
 *
 * The owning worker pushes and takes at the bottom (LIFO); other workers
 * steal from the top.  Orderings follow Lê, Pop, Cohen and Zappa Nardelli,
 * "Correct and Efficient Work-Stealing for Weak Memory Models" (PPoPP 2013),
 * minus resizing: a full deque tells the caller, who moves work to the
 * global injector instead.
 *
 * Why each ordering is needed:
 *  push   the slot store must be visible before the new bottom: a release
 *         fence between them (paired with the thief's acquire load of
 *         bottom) publishes both the slot and the fiber it points to.
 *  take   bottom is decremented *before* top is read, and the two must not
 *         be reordered (store->load): a seq_cst fence.  Otherwise owner and
 *         thief could both take the last item.  The last item is claimed by
 *         a seq_cst CAS on top, racing the thieves on equal terms.
 *  steal  top is read before bottom, again store/load-sensitive with respect
 *         to the owner's take: acquire on top, seq_cst fence, acquire on
 *         bottom.  The CAS on top claims the item; a failed CAS means another
 *         thief or the owner won, and the caller may retry.
 *  Slots are atomics accessed relaxed: a thief may read a slot that the
 *  owner is overwriting after a wrap-around; its CAS then fails and the
 *  value read is discarded, and relaxed atomics keep that read defined.
 *
 * ThreadSanitizer does not understand atomic_thread_fence, so under
 * --enable-tsan the same orderings are carried by the accesses themselves
 * (seq_cst loads/stores/CAS), which is stronger and TSan-visible.
 */
#ifndef ZK_DEQUE_H
#define ZK_DEQUE_H

#include "config.h"
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define ZK__DEQUE_SIZE 1024 /* power of two; a batch of 1000 spawns fits */

struct zk_fiber;

struct zk__deque {
	_Atomic int64_t top;
	char pad0[64 - sizeof(int64_t)];
	_Atomic int64_t bottom;
	char pad1[64 - sizeof(int64_t)];
	_Atomic(struct zk_fiber *) slot[ZK__DEQUE_SIZE];
};

#ifdef ZK_TSAN
#define ZK__DQ_RELAXED memory_order_seq_cst
#define ZK__DQ_ACQUIRE memory_order_seq_cst
#define ZK__DQ_RELEASE_FENCE() ((void)0)
#define ZK__DQ_SEQ_FENCE() ((void)0)
#else
#define ZK__DQ_RELAXED memory_order_relaxed
#define ZK__DQ_ACQUIRE memory_order_acquire
#define ZK__DQ_RELEASE_FENCE() atomic_thread_fence(memory_order_release)
#define ZK__DQ_SEQ_FENCE() atomic_thread_fence(memory_order_seq_cst)
#endif

static inline void zk__deque_init(struct zk__deque *d)
{
	atomic_init(&d->top, 0);
	atomic_init(&d->bottom, 0);
	for (size_t i = 0; i < ZK__DEQUE_SIZE; i++)
		atomic_init(&d->slot[i], NULL);
}

/* Owner only.  Returns how many items the deque held before (as far as the
 * owner could tell: thieves may have taken some since), or -1 when full. */
static inline int zk__deque_push(struct zk__deque *d, struct zk_fiber *f)
{
	int64_t b = atomic_load_explicit(&d->bottom, ZK__DQ_RELAXED);
	int64_t t = atomic_load_explicit(&d->top, ZK__DQ_ACQUIRE);
	if (b - t >= ZK__DEQUE_SIZE)
		return -1;
	atomic_store_explicit(&d->slot[b & (ZK__DEQUE_SIZE - 1)], f, ZK__DQ_RELAXED);
	ZK__DQ_RELEASE_FENCE();
	atomic_store_explicit(&d->bottom, b + 1, ZK__DQ_RELAXED);
	return b > t ? (int)(b - t) : 0;
}

/* Owner only.  The most recently pushed fiber, or NULL. */
static inline struct zk_fiber *zk__deque_take(struct zk__deque *d)
{
	/* Fast empty check without the fence: only the owner raises bottom and
	 * thieves only raise top, so top >= bottom seen here stays true. */
	if (atomic_load_explicit(&d->top, memory_order_relaxed) >=
	    atomic_load_explicit(&d->bottom, memory_order_relaxed))
		return NULL;
	int64_t b = atomic_load_explicit(&d->bottom, ZK__DQ_RELAXED) - 1;
	atomic_store_explicit(&d->bottom, b, ZK__DQ_RELAXED);
	ZK__DQ_SEQ_FENCE();
	int64_t t = atomic_load_explicit(&d->top, ZK__DQ_RELAXED);
	if (t > b) { /* empty */
		atomic_store_explicit(&d->bottom, b + 1, ZK__DQ_RELAXED);
		return NULL;
	}
	struct zk_fiber *f = atomic_load_explicit(&d->slot[b & (ZK__DEQUE_SIZE - 1)], ZK__DQ_RELAXED);
	if (t == b) { /* last item: race the thieves for it */
		if (!atomic_compare_exchange_strong_explicit(&d->top, &t, t + 1, memory_order_seq_cst,
							     memory_order_relaxed))
			f = NULL;
		atomic_store_explicit(&d->bottom, b + 1, ZK__DQ_RELAXED);
	}
	return f;
}

#define ZK__STEAL_RETRY ((struct zk_fiber *)1)

/* Any thread.  The oldest fiber, NULL when empty, or ZK__STEAL_RETRY when
 * another taker won the race. */
static inline struct zk_fiber *zk__deque_steal(struct zk__deque *d)
{
	int64_t t = atomic_load_explicit(&d->top, ZK__DQ_ACQUIRE);
	ZK__DQ_SEQ_FENCE();
	int64_t b = atomic_load_explicit(&d->bottom, ZK__DQ_ACQUIRE);
	if (t >= b)
		return NULL;
	struct zk_fiber *f = atomic_load_explicit(&d->slot[t & (ZK__DEQUE_SIZE - 1)], ZK__DQ_RELAXED);
	if (!atomic_compare_exchange_strong_explicit(&d->top, &t, t + 1, memory_order_seq_cst,
						     memory_order_relaxed))
		return ZK__STEAL_RETRY;
	return f;
}

/* Any thread; a racy estimate. */
static inline int64_t zk__deque_size(struct zk__deque *d)
{
	int64_t b = atomic_load_explicit(&d->bottom, memory_order_relaxed);
	int64_t t = atomic_load_explicit(&d->top, memory_order_relaxed);
	return b > t ? b - t : 0;
}

#endif
