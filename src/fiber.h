/*
 * fiber.h - the fiber record and the park/unpark contract that every
 * waiting primitive (join, timers, I/O, locks, channels) is built on.
 */
#ifndef ZK_FIBER_H
#define ZK_FIBER_H

#include "config.h"
#include "fcontext.h"
#include "zokio.h"

#include <stdatomic.h>
#include <stdint.h>

struct zk__stack;
struct zk__waiter;
struct zk__cancel_hook;
struct zk__end_node;

enum zk__fiber_state {
	ZK__FREE = 0,     /* record on a free list */
	ZK__NEW,          /* spawned, never run, no stack yet */
	ZK__RUNNABLE,     /* in some run queue */
	ZK__RUNNING,
	ZK__PARKED,       /* context saved, waiting for zk__unpark */
	ZK__DONE,         /* ended; record lives until the handle is released */
	ZK__PARKING,      /* context saved, publish running (see after_switch) */
	ZK__WAKING,       /* woken while PARKING; the waker is storing its reason */
	ZK__WOKEN,        /* woken while PARKING; after_switch will schedule it */
};

struct zk_fiber {
	/* 128 bytes in a plain build, ordered to leave no holes: a million
	 * queued fibers cost a million of these and nothing else.  Records
	 * are 64-byte aligned (scheduler.c).  The first line holds what
	 * passes between workers: what a fiber spawned on one worker, run
	 * and ended on another and joined on the first touches, and what a
	 * waker on another worker writes.  The second is written at spawn and
	 * after that mostly read, or touched by the fiber's own worker. */
	zk_fcontext_t ctx;           /* saved registers while not running */
	struct zk__stack *stack;     /* NULL until first run and after the end */
	zk_fiber_fn fn;
	union {
		void *arg;           /* until it starts */
		void *result;        /* once it ends */
	};
	_Atomic uintptr_t joiner;    /* the end word: see ZK__JOIN_* below */
	_Atomic int state;           /* enum zk__fiber_state */
	_Atomic int cancel;          /* cancellation requested */
	int wake_reason;             /* what zk__park returns; set by the waker */
	int err;                     /* why it never started (join result) */
	int16_t home;                /* worker it started on, -1 before */
	uint8_t pinned;
	uint8_t fresh;               /* has its first context, not yet entered */
	uint8_t has_tls;             /* tls is allocated (the end looks) */
	/* The current park may be ended by zk_cancel.  Atomic: wakers and
	 * after_switch read it while the fiber, resumed elsewhere, resets it. */
	_Atomic uint8_t cancellable_park;
	_Atomic uint8_t park_permit; /* zk_park/zk_unpark handshake (park.c) */
	/* second line: written at spawn, then mostly read */
	struct zk_fiber *next;       /* run-queue and free-list link */
	zk_runtime_t *rt;
	uint64_t id;
	int64_t deadline;            /* zk_deadline_set; ZK__NO_DEADLINE (INT64_MAX) if none */
	/* Set while parked in I/O: zk_cancel calls it instead of waking the
	 * fiber, because only the driver may decide when the kernel is done
	 * with the operation (driver.h).  The hook outlives every park. */
	_Atomic(struct zk__cancel_hook *) cancel_hook;
	const char *waiting_on;      /* for the fiber dump */
	void **tls;                  /* ZK_KEYS_MAX values, allocated on first set */
	char *name;                  /* ZK__NAME_MAX bytes once set, else NULL */
#ifdef ZK_ASAN
	void *asan_fake;             /* ASan fake-stack save slot while switched out */
#endif
#ifdef ZK_TSAN
	void *tsan;                  /* TSan fiber */
#endif
};

#define ZK__NAME_MAX 32 /* including the terminating NUL */

/*
 * The end word (zk_fiber.joiner) says whether the fiber has ended and who
 * waits for that:
 *   0                    running (or not started), nobody waits
 *   ZK__JOIN_DONE        ended
 *   ZK__JOIN_DETACHED    the handle was given up; the end frees the record
 *   a node pointer       head of the list of calls waiting for the end
 *                        (zk_join, zk_join_timed, zk_wait_first)
 * plus ZK__JOIN_LOCK while someone changes the list: a waiter taking its
 * node out (timeout, cancellation, another task ended first), or the end
 * itself walking the list to wake everyone (DONE | LOCK).  Nodes are
 * 8-byte aligned, so the low three bits are free for these tags.
 */
#define ZK__JOIN_DONE ((uintptr_t)1)
#define ZK__JOIN_DETACHED ((uintptr_t)2)
#define ZK__JOIN_LOCK ((uintptr_t)4)

/* A waiter is a fiber or, on a plain thread, a futex word to block on. */
struct zk__waiter {
	zk_fiber_t *fiber;
	_Atomic uint32_t futex;
};

/* One call waiting for the end of one or more fibers: one node per fiber,
 * all sharing an end_wait.  The end that wins `winner` (CAS from -1 to
 * its node's index) wakes the waiter; the others only skip the node. */
struct zk__end_wait {
	_Atomic int winner;          /* -1 while open, a node index, -2 withdrawn */
	struct zk__waiter waiter;
};

struct zk__end_node {
	struct zk__end_node *next;
	struct zk__end_wait *w;
	int index;
};

/* The fiber ended: mark it DONE, wake every waiter of its end word, free
 * the record if it was detached.  Called once, by the worker that ran the
 * fiber's end (scheduler.c), never on f's own stack.  Inline for the
 * common cases (nobody waits, or detached); fiber.c has the rest. */
void zk__fiber_end_notify_slow(zk_fiber_t *f, uintptr_t w);
void zk__fiber_free(zk_fiber_t *f);

static inline void zk__fiber_end_notify(zk_fiber_t *f)
{
	/* release: the result and err stores before the end */
	uintptr_t w = 0;
	if (atomic_compare_exchange_strong_explicit(&f->joiner, &w, ZK__JOIN_DONE,
						    memory_order_acq_rel, memory_order_relaxed))
		return;
	if (w == ZK__JOIN_DETACHED) {
		zk__fiber_free(f); /* nobody holds the handle: the end frees */
		return;
	}
	zk__fiber_end_notify_slow(f, w);
}

/* Wake whoever waits on w.  The waiter may be gone the moment this returns. */
void zk__waiter_wake(struct zk__waiter *w);
/* Block the calling plain thread until zk__waiter_wake(w). */
void zk__waiter_block(struct zk__waiter *w);

/*
 * Parking.
 *
 * zk__park(what, publish, arg, flags) suspends the calling fiber.  The rule
 * that makes it safe across threads: the fiber becomes visible to wakers
 * only after its registers are saved.  publish(self, arg) runs *after* the
 * switch, on the next context, with the fiber already in state PARKED; it
 * is where the fiber is put on a wait list or a lock is released.  If
 * publish returns non-zero the fiber did not really need to wait and is
 * made runnable again at once.
 *
 * zk__unpark(f, reason) may be called from any thread; it makes f runnable
 * if (and only if) it is PARKED, so racing wakers (a completion and a
 * timeout, say) are harmless: the first wins and its reason is what
 * zk__park returns.  Returns 1 if this call woke f.
 *
 * With ZK__PARK_CANCELLABLE, zk_cancel() wakes the fiber with -ECANCELED;
 * the caller must then take itself off whatever list publish put it on.
 */
typedef int (*zk__publish_fn)(zk_fiber_t *self, void *arg);
#define ZK__PARK_CANCELLABLE 1
/* ZK__PARK_PUBLISH_LAST: a promise about publish, which lets the scheduler
 * skip the PARKING state and the locked instruction that settles it.
 * publish must call zk__park_commit(self) after its last access to the
 * fiber's stack (arg) and before the release that makes the fiber visible
 * to wakers - or return 1 without making it visible.  Typically: copy what
 * it needs out of arg, commit, unlock. */
#define ZK__PARK_PUBLISH_LAST 4

/* In a publish: from here the fiber counts as PARKED (see above).  A no-op
 * when the park runs the PARKING protocol instead (the state is then
 * PARKING, not RUNNING), so one publish function serves both. */
static inline void zk__park_commit(zk_fiber_t *self)
{
	if (atomic_load_explicit(&self->state, memory_order_relaxed) == ZK__RUNNING)
		atomic_store_explicit(&self->state, ZK__PARKED, memory_order_release);
}
int zk__park(const char *what, zk__publish_fn publish, void *arg, int flags);
int zk__unpark(zk_fiber_t *f, int reason);

/* Cancellation's two halves (zk_cancel = mark, heavy barrier, kick), split
 * so that zk_runtime_shutdown pays for one barrier, not one per fiber. */
void zk__cancel_mark(zk_fiber_t *f);
void zk__cancel_kick(zk_fiber_t *f);
/* The heavy side of the asymmetric barrier that pairs a cancel with the
 * light (compiler-only) side in a fast park: see scheduler.c. */
void zk__heavy_barrier(void);

struct zk__worker;
/* w: the calling worker if it belongs to rt, else NULL. */
zk_fiber_t *zk__fiber_alloc(zk_runtime_t *rt, struct zk__worker *w);
/* zk__fiber_free: see the lifetime rule in fiber.c (declared above) */
void zk__fiber_run_tls_dtors(zk_fiber_t *f);

#endif
