/*
 * sync.c - mutex, condition variable, reader-writer lock, semaphore, wait
 * group, once and barrier.
 *
 * Each object is a spin lock, a few words of state and a FIFO queue of
 * waiter nodes (waitq.h).  Contended paths park the fiber (a plain thread
 * blocks on a futex instead); waking is a hand-off decided under the
 * lock: the waker gives the waiter what it waited for (a semaphore unit,
 * read access) before waking it, so a woken waiter never has to compete
 * again and FIFO order is kept.  The mutex is the exception (barging, with
 * hand-off only for starving waiters; see its section).  A waiter that times out or
 * is cancelled either leaves the queue or, if a waker got to it first,
 * keeps what it was given (success wins): the object is consistent either
 * way.
 *
 * The public types are opaque arrays of the right size; all-zero is the
 * initial state of a mutex, condition variable, rwlock and once.
 */
#include "config.h"
#include "scheduler.h"
#include "waitq.h"
#include "zokio.h"

#include <errno.h>
#include <string.h>

#define WAIT_FLAGS ZK__PARK_CANCELLABLE

/* ---- mutex ------------------------------------------------------------------
 *
 * Go's sync.Mutex design, on our wait queue.  Two modes:
 *
 * Normal mode (barging).  unlock releases the mutex and wakes the head
 * waiter to *compete* for it; a running fiber that calls lock meanwhile
 * may take it first.  Handing the mutex to a parked waiter would keep it
 * locked for the waiter's whole wake-up latency, during which every other
 * locker parks too (a convoy); letting the running fiber go on is several
 * times faster under contention.  At most one woken waiter competes at a
 * time (WOKEN): unlock does not wake another while one is on its way.  A
 * woken waiter that loses goes back to the *head* of the queue.
 *
 * Starvation mode (hand-off).  A woken waiter that loses after waiting
 * more than STARVE_NS sets STARVING.  Then unlock hands the mutex straight
 * to the head waiter (the state stays LOCKED, now for it), newcomers do
 * not spin or barge but queue at the tail, and the queue drains in FIFO
 * order.  The hand-off leaves starvation mode when it empties the queue or
 * reaches a waiter that waited less than STARVE_NS.
 *
 * state: LOCKED | WAITERS (queue may be non-empty) | WOKEN | STARVING.
 * The fast paths are one CAS each (0 -> LOCKED, LOCKED -> 0).  Invariants
 * (every change of WAITERS, WOKEN, STARVING is made under the spin lock,
 * or by the woken waiter's acquiring CAS):
 *   - STARVING implies LOCKED and WAITERS: in starvation mode the mutex
 *     is never free, it passes from owner to head waiter;
 *   - unlocked with WAITERS implies WOKEN: a free mutex with queued
 *     waiters always has one of them on its way, so no wake-up is lost. */

#define M_LOCKED 1u
#define M_WAITERS 2u
#define M_WOKEN 4u
#define M_STARVING 8u

#define STARVE_NS 1000000 /* 1 ms, as in Go */

/* Results a waker puts in a mutex waiter's node. */
enum { M_HANDOFF = 0, M_RETRY = 1 };

struct zk__mutex {
	_Atomic uint32_t state;
	struct zk__spin lock;
	struct zk__wq q;
};

_Static_assert(sizeof(struct zk__mutex) <= sizeof(zk_mutex_t), "zk_mutex_t too small");

/* A mutex waiter: the node and since when its lock call has waited. */
struct mwaiter {
	struct zk__wnode n;
	int64_t since;
};

static inline struct zk__mutex *MX(zk_mutex_t *m)
{
	return (struct zk__mutex *)m;
}

int zk_mutex_init(zk_mutex_t *m)
{
	if (!m)
		return -EINVAL;
	memset(m, 0, sizeof(*m));
	return 0;
}

int zk_mutex_destroy(zk_mutex_t *m)
{
	if (!m)
		return -EINVAL;
	return atomic_load(&MX(m)->state) ? -EBUSY : 0;
}

static int mutex_try(struct zk__mutex *m)
{
	uint32_t s = 0;
	return atomic_compare_exchange_strong_explicit(&m->state, &s, M_LOCKED, memory_order_acquire,
						       memory_order_relaxed);
}

/* Take the mutex if it is free and not being handed off (barging), from
 * state s.  woken: the caller is the woken waiter, whose WOKEN goes. */
static int mutex_barge(struct zk__mutex *m, uint32_t s, int woken)
{
	while (!(s & (M_LOCKED | M_STARVING))) {
		uint32_t to = (s | M_LOCKED) & ~(woken ? M_WOKEN : 0u);
		if (atomic_compare_exchange_weak_explicit(&m->state, &s, to, memory_order_acquire,
							  memory_order_relaxed))
			return 1;
	}
	return 0;
}

/* A holder on another worker is likely to release within a few hundred
 * cycles: spin briefly before queueing, unless the mutex is in hand-off
 * mode (the queue comes first) or the runtime has one worker (the holder
 * cannot run while we spin). */
static int mutex_spin(struct zk__mutex *m, int woken)
{
	if (mutex_barge(m, atomic_load_explicit(&m->state, memory_order_relaxed), woken))
		return 1;
	zk_runtime_t *rt = zk_runtime_current();
	if (rt && rt->nworkers == 1)
		return 0;
	for (int i = 0; i < 40; i++) {
		uint32_t s = atomic_load_explicit(&m->state, memory_order_relaxed);
		if (s & M_STARVING)
			return 0;
		if (mutex_barge(m, s, woken))
			return 1;
		zk__spin_pause();
	}
	return 0;
}

/* Wake the head waiter to compete (normal mode), or hand it the mutex
 * (starvation mode).  Spin lock held; the queue is not empty. */
static void mutex_wake_head(struct zk__mutex *m, int handoff)
{
	struct zk__wnode *n = zk__wq_pop_claim(&m->q);
	if (!handoff) {
		if (zk__wq_empty(&m->q))
			atomic_fetch_and_explicit(&m->state, ~M_WAITERS, memory_order_relaxed);
		atomic_fetch_or_explicit(&m->state, M_WOKEN, memory_order_relaxed);
		zk__wnode_complete(n, M_RETRY);
		return;
	}
	/* Hand-off: LOCKED stays set, now for n's waiter. */
	struct mwaiter *mw = (struct mwaiter *)n;
	if (zk__wq_empty(&m->q))
		atomic_fetch_and_explicit(&m->state, ~(M_WAITERS | M_STARVING), memory_order_relaxed);
	else if (zk__now() - mw->since < STARVE_NS)
		atomic_fetch_and_explicit(&m->state, ~M_STARVING, memory_order_relaxed);
	zk__wnode_complete(n, M_HANDOFF);
}

static int mutex_lock_slow(struct zk__mutex *m, int flags, int64_t deadline)
{
	int woken = 0;     /* we hold WOKEN: woken to compete, not yet settled */
	int64_t since = 0; /* when this call first queued */
	for (;;) {
		if (mutex_spin(m, woken))
			return 0;
		zk__spin_lock(&m->lock);
		int starving = woken && zk__now() - since > STARVE_NS;
		uint32_t s = atomic_load_explicit(&m->state, memory_order_relaxed);
		for (;;) {
			if (mutex_barge(m, s, woken)) {
				zk__spin_unlock(&m->lock);
				return 0;
			}
			s = atomic_load_explicit(&m->state, memory_order_relaxed);
			if (!(s & M_LOCKED))
				continue; /* released meanwhile: try again */
			/* Queue; setting WAITERS makes the owner's fast unlock
			 * fail, so it comes here for the lock and finds us. */
			uint32_t to = (s | M_WAITERS | (starving ? M_STARVING : 0u)) &
				      ~(woken ? M_WOKEN : 0u);
			if (atomic_compare_exchange_weak_explicit(&m->state, &s, to, memory_order_relaxed,
								  memory_order_relaxed))
				break;
		}
		woken = 0;
		struct mwaiter mw;
		zk__wnode_init(&mw.n, NULL, 0);
		if (since) {
			mw.since = since;
			zk__wq_push_head(&m->q, &mw.n); /* back to the front */
		} else {
			mw.since = since = zk__now();
			zk__wq_push(&m->q, &mw.n);
		}
		int rc = zk__wq_wait_locked(&m->lock, &m->q, &mw.n, "mutex", flags, deadline);
		if (mw.n.done) {
			if (mw.n.result == M_HANDOFF)
				return 0; /* the unlocker handed it to us */
			woken = 1;        /* compete again, WOKEN is ours */
			continue;
		}
		/* Timed out or cancelled, and off the queue.  If it is empty
		 * now, let the owner unlock on the fast path again. */
		if (zk__wq_empty(&m->q))
			atomic_fetch_and_explicit(&m->state, ~(M_WAITERS | M_STARVING),
						  memory_order_relaxed);
		zk__spin_unlock(&m->lock);
		return rc;
	}
}

/* The fast path: one CAS when the mutex is free; when it is merely
 * marked (waiters queued, one woken) but not held, barge at once. */
static inline int mutex_lock_fast(struct zk__mutex *m)
{
	uint32_t s = 0;
	if (atomic_compare_exchange_strong_explicit(&m->state, &s, M_LOCKED, memory_order_acquire,
						    memory_order_relaxed))
		return 1;
	return mutex_barge(m, s, 0);
}

int zk_mutex_lock(zk_mutex_t *m)
{
	if (mutex_lock_fast(MX(m)))
		return 0;
	return mutex_lock_slow(MX(m), WAIT_FLAGS, -1);
}

int zk_mutex_lock_timed(zk_mutex_t *m, int64_t deadline_ns)
{
	if (mutex_lock_fast(MX(m)))
		return 0;
	return mutex_lock_slow(MX(m), WAIT_FLAGS, deadline_ns);
}

int zk_mutex_trylock(zk_mutex_t *m)
{
	struct zk__mutex *x = MX(m);
	if (mutex_try(x))
		return 0;
	return mutex_barge(x, atomic_load_explicit(&x->state, memory_order_relaxed), 0) ? 0 : -EBUSY;
}

int zk_mutex_unlock(zk_mutex_t *m)
{
	struct zk__mutex *x = MX(m);
	uint32_t s = M_LOCKED;
	if (atomic_compare_exchange_strong_explicit(&x->state, &s, 0, memory_order_release,
						    memory_order_relaxed))
		return 0;
	for (;;) {
		if (!(s & M_LOCKED))
			return -EPERM;
		if (s & M_STARVING)
			break;
		if ((s & M_WAITERS) && !(s & M_WOKEN))
			break; /* someone must be woken: under the spin lock */
		/* Nobody queued, or a woken waiter is on its way already. */
		if (atomic_compare_exchange_weak_explicit(&x->state, &s, s & ~M_LOCKED,
							  memory_order_release, memory_order_relaxed))
			return 0;
	}
	zk__spin_lock(&x->lock);
	/* Under the spin lock only we (the owner) change LOCKED, and the
	 * other bits change only under this lock: the state is stable. */
	s = atomic_load_explicit(&x->state, memory_order_relaxed);
	if (s & M_STARVING) {
		mutex_wake_head(x, 1);
	} else {
		atomic_fetch_and_explicit(&x->state, ~M_LOCKED, memory_order_release);
		if ((s & M_WAITERS) && !(s & M_WOKEN))
			mutex_wake_head(x, 0);
	}
	zk__spin_unlock(&x->lock);
	return 0;
}

/* ---- condition variable ------------------------------------------------- */

struct zk__cond {
	struct zk__spin lock;
	struct zk__wq q;
};

_Static_assert(sizeof(struct zk__cond) <= sizeof(zk_cond_t), "zk_cond_t too small");

static inline struct zk__cond *CV(zk_cond_t *c)
{
	return (struct zk__cond *)c;
}

int zk_cond_init(zk_cond_t *c)
{
	if (!c)
		return -EINVAL;
	memset(c, 0, sizeof(*c));
	return 0;
}

int zk_cond_destroy(zk_cond_t *c)
{
	if (!c)
		return -EINVAL;
	return zk__wq_empty(&CV(c)->q) ? 0 : -EBUSY;
}

int zk_cond_wait_timed(zk_cond_t *cond, zk_mutex_t *m, int64_t deadline_ns)
{
	struct zk__cond *c = CV(cond);
	struct zk__wnode n;
	zk__wnode_init(&n, NULL, 0);
	zk__spin_lock(&c->lock);
	zk__wq_push(&c->q, &n);
	/* Unlock under c->lock: a signal sent after this unlock finds us
	 * queued.  (Lock order: a condition's lock, then a mutex's.) */
	zk_mutex_unlock(m);
	int rc = zk__wq_wait_locked(&c->lock, &c->q, &n, "cond", WAIT_FLAGS, deadline_ns);
	if (!n.done)
		zk__spin_unlock(&c->lock);
	/* The mutex is held again on return, whatever happened: this wait
	 * neither times out nor is cancelled. */
	if (!mutex_try(MX(m)))
		mutex_lock_slow(MX(m), ZK__PARK_NO_FIBER_DEADLINE, -1);
	return rc;
}

int zk_cond_wait(zk_cond_t *c, zk_mutex_t *m)
{
	return zk_cond_wait_timed(c, m, -1);
}

int zk_cond_signal(zk_cond_t *cond)
{
	struct zk__cond *c = CV(cond);
	zk__spin_lock(&c->lock);
	struct zk__wnode *n = zk__wq_pop_claim(&c->q);
	if (n)
		zk__wnode_complete(n, 0);
	zk__spin_unlock(&c->lock);
	return 0;
}

int zk_cond_broadcast(zk_cond_t *cond)
{
	struct zk__cond *c = CV(cond);
	zk__spin_lock(&c->lock);
	struct zk__wnode *n;
	while ((n = zk__wq_pop_claim(&c->q)))
		zk__wnode_complete(n, 0);
	zk__spin_unlock(&c->lock);
	return 0;
}

/* ---- reader-writer lock --------------------------------------------------
 *
 * Fair (phase-fair by arrival): a reader gets in at once only if no writer
 * holds the lock and nobody queues; otherwise everyone queues in arrival
 * order and grant() admits from the head: one writer, or every reader up
 * to the next queued writer. */

enum { RW_READ = 0, RW_WRITE = 1 };

struct zk__rwlock {
	struct zk__spin lock;
	int32_t readers;
	int32_t writer;
	struct zk__wq q;
};

_Static_assert(sizeof(struct zk__rwlock) <= sizeof(zk_rwlock_t), "zk_rwlock_t too small");

static inline struct zk__rwlock *RW(zk_rwlock_t *l)
{
	return (struct zk__rwlock *)l;
}

int zk_rwlock_init(zk_rwlock_t *l)
{
	if (!l)
		return -EINVAL;
	memset(l, 0, sizeof(*l));
	return 0;
}

int zk_rwlock_destroy(zk_rwlock_t *l)
{
	if (!l)
		return -EINVAL;
	struct zk__rwlock *x = RW(l);
	return x->readers || x->writer || !zk__wq_empty(&x->q) ? -EBUSY : 0;
}

static void rw_grant(struct zk__rwlock *x)
{
	struct zk__wnode *n;
	while ((n = x->q.head)) {
		if (n->kind == RW_WRITE) {
			if (x->writer || x->readers)
				return;
			zk__wq_remove(&x->q, n);
			x->writer = 1;
			zk__wnode_complete(n, 0);
			return;
		}
		if (x->writer)
			return;
		zk__wq_remove(&x->q, n);
		x->readers++;
		zk__wnode_complete(n, 0);
	}
}

static int rw_lock(zk_rwlock_t *l, int mode, int64_t deadline, int try_only)
{
	struct zk__rwlock *x = RW(l);
	zk__spin_lock(&x->lock);
	int free_now = !x->writer && zk__wq_empty(&x->q) && (mode == RW_READ || x->readers == 0);
	if (free_now) {
		if (mode == RW_READ)
			x->readers++;
		else
			x->writer = 1;
		zk__spin_unlock(&x->lock);
		return 0;
	}
	if (try_only) {
		zk__spin_unlock(&x->lock);
		return -EBUSY;
	}
	struct zk__wnode n;
	zk__wnode_init(&n, NULL, mode);
	zk__wq_push(&x->q, &n);
	int rc = zk__wq_wait_locked(&x->lock, &x->q, &n, mode == RW_READ ? "rwlock read" : "rwlock write",
				    WAIT_FLAGS, deadline);
	if (!n.done) {
		rw_grant(x); /* we may have been what blocked those behind us */
		zk__spin_unlock(&x->lock);
	}
	return rc;
}

int zk_rwlock_rdlock(zk_rwlock_t *l) { return rw_lock(l, RW_READ, -1, 0); }
int zk_rwlock_rdlock_timed(zk_rwlock_t *l, int64_t d) { return rw_lock(l, RW_READ, d, 0); }
int zk_rwlock_tryrdlock(zk_rwlock_t *l) { return rw_lock(l, RW_READ, -1, 1); }
int zk_rwlock_wrlock(zk_rwlock_t *l) { return rw_lock(l, RW_WRITE, -1, 0); }
int zk_rwlock_wrlock_timed(zk_rwlock_t *l, int64_t d) { return rw_lock(l, RW_WRITE, d, 0); }
int zk_rwlock_trywrlock(zk_rwlock_t *l) { return rw_lock(l, RW_WRITE, -1, 1); }

int zk_rwlock_unlock(zk_rwlock_t *l)
{
	struct zk__rwlock *x = RW(l);
	int rc = 0;
	zk__spin_lock(&x->lock);
	if (x->writer)
		x->writer = 0;
	else if (x->readers > 0)
		x->readers--;
	else
		rc = -EPERM;
	if (rc == 0)
		rw_grant(x);
	zk__spin_unlock(&x->lock);
	return rc;
}

/* ---- semaphore ------------------------------------------------------------ */

#define SEM_MAX 0x7fffffff

struct zk__sem {
	struct zk__spin lock;
	uint32_t pad;
	int64_t count;
	struct zk__wq q;
};

_Static_assert(sizeof(struct zk__sem) <= sizeof(zk_sem_t), "zk_sem_t too small");

static inline struct zk__sem *SEM(zk_sem_t *s)
{
	return (struct zk__sem *)s;
}

int zk_sem_init(zk_sem_t *s, unsigned value)
{
	if (!s || value > SEM_MAX)
		return -EINVAL;
	memset(s, 0, sizeof(*s));
	SEM(s)->count = value;
	return 0;
}

int zk_sem_destroy(zk_sem_t *s)
{
	if (!s)
		return -EINVAL;
	return zk__wq_empty(&SEM(s)->q) ? 0 : -EBUSY;
}

static int sem_wait(zk_sem_t *sem, int64_t deadline, int try_only)
{
	struct zk__sem *s = SEM(sem);
	zk__spin_lock(&s->lock);
	if (s->count > 0) {
		s->count--;
		zk__spin_unlock(&s->lock);
		return 0;
	}
	if (try_only) {
		zk__spin_unlock(&s->lock);
		return -EAGAIN;
	}
	struct zk__wnode n;
	zk__wnode_init(&n, NULL, 0);
	zk__wq_push(&s->q, &n);
	int rc = zk__wq_wait_locked(&s->lock, &s->q, &n, "semaphore", WAIT_FLAGS, deadline);
	if (!n.done)
		zk__spin_unlock(&s->lock);
	return rc;
}

int zk_sem_wait(zk_sem_t *s) { return sem_wait(s, -1, 0); }
int zk_sem_wait_timed(zk_sem_t *s, int64_t d) { return sem_wait(s, d, 0); }
int zk_sem_trywait(zk_sem_t *s) { return sem_wait(s, -1, 1); }

int zk_sem_post(zk_sem_t *sem)
{
	struct zk__sem *s = SEM(sem);
	int rc = 0;
	zk__spin_lock(&s->lock);
	struct zk__wnode *n = zk__wq_pop_claim(&s->q);
	if (n)
		zk__wnode_complete(n, 0); /* the unit goes straight to the waiter */
	else if (s->count < SEM_MAX)
		s->count++;
	else
		rc = -EOVERFLOW;
	zk__spin_unlock(&s->lock);
	return rc;
}

int zk_sem_value(zk_sem_t *sem)
{
	struct zk__sem *s = SEM(sem);
	zk__spin_lock(&s->lock);
	int v = (int)s->count;
	zk__spin_unlock(&s->lock);
	return v;
}

/* ---- wait group ----------------------------------------------------------- */

struct zk__wg {
	struct zk__spin lock;
	uint32_t pad;
	int64_t count;
	struct zk__wq q;
};

_Static_assert(sizeof(struct zk__wg) <= sizeof(zk_waitgroup_t), "zk_waitgroup_t too small");

static inline struct zk__wg *WG(zk_waitgroup_t *g)
{
	return (struct zk__wg *)g;
}

int zk_waitgroup_init(zk_waitgroup_t *g)
{
	if (!g)
		return -EINVAL;
	memset(g, 0, sizeof(*g));
	return 0;
}

int zk_waitgroup_add(zk_waitgroup_t *wg, int delta)
{
	struct zk__wg *g = WG(wg);
	zk__spin_lock(&g->lock);
	if (g->count + delta < 0) {
		zk__spin_unlock(&g->lock);
		return -EINVAL;
	}
	g->count += delta;
	if (g->count == 0) {
		struct zk__wnode *n;
		while ((n = zk__wq_pop_claim(&g->q)))
			zk__wnode_complete(n, 0);
	}
	zk__spin_unlock(&g->lock);
	return 0;
}

int zk_waitgroup_done(zk_waitgroup_t *g)
{
	return zk_waitgroup_add(g, -1);
}

int zk_waitgroup_wait_timed(zk_waitgroup_t *wg, int64_t deadline_ns)
{
	struct zk__wg *g = WG(wg);
	zk__spin_lock(&g->lock);
	if (g->count == 0) {
		zk__spin_unlock(&g->lock);
		return 0;
	}
	struct zk__wnode n;
	zk__wnode_init(&n, NULL, 0);
	zk__wq_push(&g->q, &n);
	int rc = zk__wq_wait_locked(&g->lock, &g->q, &n, "waitgroup", WAIT_FLAGS, deadline_ns);
	if (!n.done)
		zk__spin_unlock(&g->lock);
	return rc;
}

int zk_waitgroup_wait(zk_waitgroup_t *g)
{
	return zk_waitgroup_wait_timed(g, -1);
}

/* ---- once ------------------------------------------------------------------- */

enum { ONCE_NEW = 0, ONCE_RUNNING = 1, ONCE_DONE = 2 };

struct zk__once {
	_Atomic uint32_t state;
	struct zk__spin lock;
	struct zk__wq q;
};

_Static_assert(sizeof(struct zk__once) <= sizeof(zk_once_t), "zk_once_t too small");

int zk_once(zk_once_t *once, void (*fn)(void *), void *arg)
{
	struct zk__once *o = (struct zk__once *)once;
	if (atomic_load_explicit(&o->state, memory_order_acquire) == ONCE_DONE)
		return 0;
	zk__spin_lock(&o->lock);
	uint32_t s = atomic_load_explicit(&o->state, memory_order_relaxed);
	if (s == ONCE_DONE) {
		zk__spin_unlock(&o->lock);
		return 0;
	}
	if (s == ONCE_NEW) {
		atomic_store_explicit(&o->state, ONCE_RUNNING, memory_order_relaxed);
		zk__spin_unlock(&o->lock);
		fn(arg);
		zk__spin_lock(&o->lock);
		atomic_store_explicit(&o->state, ONCE_DONE, memory_order_release);
		struct zk__wnode *n;
		while ((n = zk__wq_pop_claim(&o->q)))
			zk__wnode_complete(n, 0);
		zk__spin_unlock(&o->lock);
		return 0;
	}
	struct zk__wnode n;
	zk__wnode_init(&n, NULL, 0);
	zk__wq_push(&o->q, &n);
	int rc = zk__wq_wait_locked(&o->lock, &o->q, &n, "once", WAIT_FLAGS, -1);
	if (!n.done)
		zk__spin_unlock(&o->lock);
	return rc;
}

/* ---- barrier ----------------------------------------------------------------- */

struct zk__barrier {
	struct zk__spin lock;
	uint32_t n;
	uint32_t arrived;
	uint32_t pad;
	struct zk__wq q;
};

_Static_assert(sizeof(struct zk__barrier) <= sizeof(zk_barrier_t), "zk_barrier_t too small");

static inline struct zk__barrier *BAR(zk_barrier_t *b)
{
	return (struct zk__barrier *)b;
}

int zk_barrier_init(zk_barrier_t *b, unsigned count)
{
	if (!b || count == 0)
		return -EINVAL;
	memset(b, 0, sizeof(*b));
	BAR(b)->n = count;
	return 0;
}

int zk_barrier_destroy(zk_barrier_t *b)
{
	if (!b)
		return -EINVAL;
	return zk__wq_empty(&BAR(b)->q) ? 0 : -EBUSY;
}

int zk_barrier_wait_timed(zk_barrier_t *bar, int64_t deadline_ns)
{
	struct zk__barrier *b = BAR(bar);
	zk__spin_lock(&b->lock);
	if (++b->arrived == b->n) {
		b->arrived = 0;
		struct zk__wnode *n;
		while ((n = zk__wq_pop_claim(&b->q)))
			zk__wnode_complete(n, 0);
		zk__spin_unlock(&b->lock);
		return ZK_BARRIER_SERIAL;
	}
	struct zk__wnode n;
	zk__wnode_init(&n, NULL, 0);
	zk__wq_push(&b->q, &n);
	int rc = zk__wq_wait_locked(&b->lock, &b->q, &n, "barrier", WAIT_FLAGS, deadline_ns);
	if (!n.done) {
		b->arrived--; /* withdrawn: the round waits for someone else */
		zk__spin_unlock(&b->lock);
	}
	return rc;
}

int zk_barrier_wait(zk_barrier_t *b)
{
	return zk_barrier_wait_timed(b, -1);
}
