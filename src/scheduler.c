/*
 * scheduler.c - the scheduler: workers, their run queues, stealing, sleeping,
 * and the switch from one fiber to the next.
 *
 * Where a runnable fiber waits, per worker:
 *   lifo   one slot for the fiber woken most recently by this worker: it runs
 *          next, while its data is still in cache (capped at 3 in a row so
 *          two fibers waking each other cannot starve the rest);
 *   dq     the Chase-Lev deque (deque.h): fresh fibers and fibers free to
 *          migrate; idle workers steal half of it from the other end;
 *   local  an owner-only FIFO, looked at last: yielded fibers (so they go
 *          behind everything else) and started fibers that may not migrate;
 *   inbox  non-migrating fibers of this worker woken by another thread.
 * and per runtime the global injector, for wakes and spawns from plain
 * threads and for deque overflow.  Every 61st pick looks at local and the
 * injector first, so neither can starve.
 *
 * Switching.  A fiber that stops running (yield, park, end) picks the next
 * fiber itself and jumps straight to it; only when nothing is runnable does
 * it jump to its worker's scheduler context (the thread's own stack), which
 * steals, or sleeps.  Each jump carries a struct zk__switch describing what
 * to do with the fiber just left; the resumed side runs after_switch() first
 * thing, once the left fiber's registers are saved.  That is the publish-
 * after-save rule: a parked fiber becomes visible to other threads (which
 * might resume it at once) only in after_switch, never before its context
 * is complete.
 *
 * Sleeping without lost wake-ups.  A worker that runs out of work spins a
 * while stealing (at most half the workers spin), then puts itself on the
 * idle list, issues a full fence and re-checks every queue before it
 * sleeps on its futex.  A thread that makes work available issues a full
 * fence after publishing it and then reads the spinner and idle counts; if
 * no one spins it wakes exactly one sleeper.  Either the sleeper sees the
 * work or the waker sees the sleeper (the store->fence->load pairs cannot
 * both miss).  A spinner that finds work and was the last spinner wakes one
 * more worker when work remains, so parallelism ramps up one at a time.
 */
#include "config.h"
#include "scheduler.h"
#include "sanitize.h"

#include <errno.h>
#include <sched.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ZK__FAIR_TICK 61
#define ZK__LIFO_MAX 3
#define ZK__SPIN_NS 50000 /* an idle worker spins this long before sleeping */
#define ZK__SPIN_CONTENDED_NS 0 /* ... or this long while its CPU is contended */
#define ZK__SPIN_MIN_NS 5000 /* a lone worker's shortest spin (io_spin) */
#define ZK__STEAL_MAX 32
#define ZK__FREE_MAX 1024
#define ZK__ID_BLOCK 1024

__thread struct zk__worker *zk__tls_worker __attribute__((tls_model("initial-exec")));
static _Atomic uint64_t next_fiber_id = 1;
#ifdef ZK_TSAN
_Atomic int zk__tsan_fence_word;
#endif

#ifndef ZK__WORKER_SELF_INLINE
#if defined(__clang__)
#define ZK__NOIPA __attribute__((noinline))
#else
#define ZK__NOIPA __attribute__((noinline, noipa))
#endif

ZK__NOIPA struct zk__worker *zk__worker_self(void)
{
	struct zk__worker *w = zk__tls_worker;
	__asm__ volatile("" : "+r"(w)::"memory");
	return w;
}
#endif

/* Owner-only counter (statistics, and the spawned/ended counts that
 * all_ended() reads): a plain increment, no locked instruction, published
 * with release so a reader that sees the count sees what preceded it. */
static inline void owner_inc(_Atomic uint64_t *c)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
			      memory_order_release);
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__)
	__asm__ volatile("pause");
#elif defined(__aarch64__)
	__asm__ volatile("yield");
#endif
}

/* ---- futex-based blocking for plain threads and sleeping workers -------- */

static void futex_wait(_Atomic uint32_t *addr, uint32_t val)
{
	syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr, int n)
{
	syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

void zk__waiter_wake(struct zk__waiter *w)
{
	zk_fiber_t *f = w->fiber;
	if (f) {
		zk__unpark(f, 0);
		return;
	}
	/* After this store the waiter may return and its frame vanish; the
	 * futex wake on a stale address is harmless (at worst a spurious wake
	 * of an unrelated futex user, which must tolerate those anyway). */
	atomic_store_explicit(&w->futex, 1, memory_order_release);
	futex_wake(&w->futex, 1);
}

void zk__waiter_block(struct zk__waiter *w)
{
	while (atomic_load_explicit(&w->futex, memory_order_acquire) == 0)
		futex_wait(&w->futex, 0);
}

/* ---- queues ----------------------------------------------------------- */

static inline void fifo_push(struct zk__fifo *q, zk_fiber_t *f)
{
	f->next = NULL;
	if (q->tail)
		q->tail->next = f;
	else
		q->head = f;
	q->tail = f;
}

static inline zk_fiber_t *fifo_pop(struct zk__fifo *q)
{
	zk_fiber_t *f = q->head;
	if (f) {
		q->head = f->next;
		if (!q->head)
			q->tail = NULL;
	}
	return f;
}

/* A started fiber that must stay on its first worker. */
static inline int is_sticky(const zk_fiber_t *f)
{
	return f->home >= 0 && (f->pinned || f->rt->opts.no_migration);
}

static void injector_push(zk_runtime_t *rt, zk_fiber_t *f)
{
	pthread_mutex_lock(&rt->inj_lock);
	fifo_push(&rt->inj, f);
	atomic_fetch_add_explicit(&rt->inj_len, 1, memory_order_seq_cst);
	pthread_mutex_unlock(&rt->inj_lock);
}

static void wake_one(zk_runtime_t *rt);

/* Lazy spreading.  With a shared poller on a completion backend, the
 * fibers a worker makes runnable stay with it until it has been busy for
 * ZK__BUSY_NS without once running out of work; only then is another
 * worker woken to share them.  A worker that keeps up needs no help, and
 * waking one costs more than it saves: on two CPUs shared with a load
 * generator, 1000-connection echo took ~20% more server CPU per round
 * trip with the second worker woken for every batch than with one worker
 * serving all of it, at the same throughput and tail.  What bounds how
 * long a stalled worker's fibers wait is then the busy workers' rescue
 * (rescue_steal) and a sleeping lookout's (worker_sleep). */
#define ZK__BUSY_NS 1000000
static inline int lazy_spread(const zk_runtime_t *rt)
{
	return rt->netpoll && rt->driver_vt->completion;
}

/* Become the worker that watches the shared poller, unless another one's
 * watch is still armed (io.c lets go when it fires); returns whether w
 * watches.  The holder's watch must be in its ring: np_settle() lets go
 * of the role when arming did not happen (the wait did not block, or the
 * ring was full), so that the next sleeper can take it. */
static int np_claim(struct zk__worker *w)
{
	return zk__token_claim(&w->rt->np_holder, w);
}

static void np_settle(struct zk__worker *w)
{
	w->driver.np_watch = 0;
	if (!w->driver.np_armed)
		zk__token_release(&w->rt->np_holder, w);
}

static inline int needs_help(struct zk__worker *w)
{
	return !lazy_spread(w->rt) || zk__now() - w->dry_at >= ZK__BUSY_NS;
}

/* Put a runnable fiber where this worker (or a thief) will find it. */
static void push_runnable(struct zk__worker *w, zk_fiber_t *f)
{
	if (is_sticky(f)) {
		fifo_push(&w->local, f);
		return;
	}
	int before = zk__deque_push(&w->dq, f);
	if (before < 0) {
		/* Full: move half of the deque to the injector, oldest first. */
		zk_runtime_t *rt = w->rt;
		pthread_mutex_lock(&rt->inj_lock);
		for (int i = 0; i < ZK__DEQUE_SIZE / 2; i++) {
			zk_fiber_t *g = zk__deque_steal(&w->dq);
			if (g == ZK__STEAL_RETRY) {
				i--;
				continue;
			}
			if (!g)
				break;
			fifo_push(&rt->inj, g);
			atomic_fetch_add_explicit(&rt->inj_len, 1, memory_order_seq_cst);
		}
		pthread_mutex_unlock(&rt->inj_lock);
		if (zk__deque_push(&w->dq, f) < 0)
			injector_push(rt, f);
		before = 0;
	}
	/* Only the first fiber in an empty deque wakes a sleeper (if nobody
	 * spins), and under lazy spreading only if this worker needs help
	 * (pick() asks again while it stays busy).  Later pushes need not:
	 * that worker, once up, steals half, and re-checks every deque before
	 * it sleeps again.  And this owner is awake and takes from its own
	 * deque anyway, so nothing is stranded. */
	if (before == 0 && w->rt->nworkers > 1 && needs_help(w))
		wake_one(w->rt);
}

/* Take a batch from the injector: the first to run, the rest to the deque. */
static zk_fiber_t *injector_pop(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	if (atomic_load_explicit(&rt->inj_len, memory_order_relaxed) == 0)
		return NULL;
	pthread_mutex_lock(&rt->inj_lock);
	long n = atomic_load_explicit(&rt->inj_len, memory_order_relaxed);
	long take = n / rt->nworkers + 1;
	if (take > ZK__STEAL_MAX)
		take = ZK__STEAL_MAX;
	if (take > n)
		take = n;
	zk_fiber_t *first = NULL;
	for (long i = 0; i < take; i++) {
		zk_fiber_t *f = fifo_pop(&rt->inj);
		if (!first)
			first = f;
		else if (zk__deque_push(&w->dq, f) < 0) {
			/* no room: leave the rest where it was */
			f->next = rt->inj.head;
			rt->inj.head = f;
			if (!rt->inj.tail)
				rt->inj.tail = f;
			take = i;
			break;
		}
	}
	atomic_fetch_sub_explicit(&rt->inj_len, take, memory_order_seq_cst);
	pthread_mutex_unlock(&rt->inj_lock);
	if (first)
		owner_inc(&w->st_injector);
	return first;
}

/* Move the fibers other threads pushed into this worker's inbox (a
 * lock-free stack, newest first) to the local FIFO, oldest first. */
static void drain_inbox(struct zk__worker *w)
{
	zk_fiber_t *f = atomic_exchange_explicit(&w->inbox, NULL, memory_order_acquire);
	zk_fiber_t *rev = NULL;
	while (f) {
		zk_fiber_t *next = f->next;
		f->next = rev;
		rev = f;
		f = next;
	}
	while (rev) {
		zk_fiber_t *next = rev->next;
		fifo_push(&w->local, rev);
		rev = next;
	}
}

static inline int inbox_nonempty(struct zk__worker *w, memory_order mo)
{
	return atomic_load_explicit(&w->inbox, mo) != NULL;
}

/* Give w a wake-up token; only the first token since w last took one
 * costs a write to its driver's eventfd. */
static void unpark_worker(struct zk__worker *w)
{
	if (atomic_exchange_explicit(&w->parker, 1, memory_order_acq_rel) == 0)
		zk__driver_wake(&w->driver);
}

/* Take w off the idle list if it is still on it; returns whether it was. */
static int idle_remove(zk_runtime_t *rt, struct zk__worker *w)
{
	int was_idle = 0;
	pthread_mutex_lock(&rt->idle_lock);
	if (atomic_load_explicit(&w->idle, memory_order_relaxed)) {
		struct zk__worker **pp = &rt->idle;
		while (*pp != w)
			pp = &(*pp)->next_idle;
		*pp = w->next_idle;
		atomic_store_explicit(&w->idle, 0, memory_order_relaxed);
		atomic_fetch_sub_explicit(&rt->nidle, 1, memory_order_seq_cst);
		was_idle = 1;
	}
	pthread_mutex_unlock(&rt->idle_lock);
	return was_idle;
}

/* Push a fiber that may only run on `home` into its inbox and wake home if
 * it sleeps.  The push and home's "idle" flag form the usual Dekker pair
 * with worker_sleep (flag, fence, look at the inbox): no lost wake-up, and
 * no lock at all when home is awake. */
static void inbox_push(struct zk__worker *home, zk_fiber_t *f)
{
	zk_fiber_t *head = atomic_load_explicit(&home->inbox, memory_order_relaxed);
	do
		f->next = head;
	while (!atomic_compare_exchange_weak_explicit(&home->inbox, &head, f, memory_order_seq_cst,
						      memory_order_relaxed));
	zk__fence_seq_cst();
	if (atomic_load_explicit(&home->idle, memory_order_seq_cst) && idle_remove(home->rt, home))
		unpark_worker(home);
}

static void wake_one(zk_runtime_t *rt)
{
	zk__fence_seq_cst();
	if (atomic_load_explicit(&rt->nspinning, memory_order_seq_cst) > 0 ||
	    atomic_load_explicit(&rt->nidle, memory_order_seq_cst) == 0)
		return;
	pthread_mutex_lock(&rt->idle_lock);
	struct zk__worker *w = rt->idle;
	if (w) {
		rt->idle = w->next_idle;
		atomic_store_explicit(&w->idle, 0, memory_order_relaxed);
		atomic_fetch_sub_explicit(&rt->nidle, 1, memory_order_seq_cst);
	}
	pthread_mutex_unlock(&rt->idle_lock);
	if (w)
		unpark_worker(w);
}

static void wake_all(zk_runtime_t *rt)
{
	/* Unpark under the lock: once off the list a worker may wake for
	 * another reason and re-register, overwriting its next_idle link. */
	pthread_mutex_lock(&rt->idle_lock);
	struct zk__worker *w = rt->idle;
	rt->idle = NULL;
	while (w) {
		struct zk__worker *next = w->next_idle;
		atomic_store_explicit(&w->idle, 0, memory_order_relaxed);
		atomic_fetch_sub_explicit(&rt->nidle, 1, memory_order_seq_cst);
		unpark_worker(w);
		w = next;
	}
	pthread_mutex_unlock(&rt->idle_lock);
}

void zk__schedule(zk_fiber_t *f)
{
	zk_runtime_t *rt = f->rt;
	struct zk__worker *w = zk__worker_self();
	int sticky = is_sticky(f);
	if (w && w->rt == rt && (!sticky || f->home == w->index)) {
		zk_fiber_t *old = w->lifo;
		w->lifo = f;
		if (old)
			push_runnable(w, old);
		return;
	}
	/* From outside the runtime: once f is queued it may run, end, and the
	 * runtime be destroyed while we still wake a worker; foreign_wakers
	 * keeps zk_runtime_destroy() waiting until we are done with it. */
	atomic_fetch_add_explicit(&rt->foreign_wakers, 1, memory_order_acquire);
	if (sticky) {
		inbox_push(&rt->workers[f->home], f);
	} else {
		injector_push(rt, f);
		wake_one(rt);
	}
	atomic_fetch_sub_explicit(&rt->foreign_wakers, 1, memory_order_release);
}

void zk__schedule_new(zk_runtime_t *rt, struct zk__worker *w, zk_fiber_t *f)
{
	if (w) {
		push_runnable(w, f);
		return;
	}
	atomic_fetch_add_explicit(&rt->foreign_wakers, 1, memory_order_acquire);
	injector_push(rt, f);
	if (atomic_load_explicit(&rt->running, memory_order_acquire))
		wake_one(rt);
	atomic_fetch_sub_explicit(&rt->foreign_wakers, 1, memory_order_release);
}

void zk__sched_quiesce(zk_runtime_t *rt)
{
	while (atomic_load_explicit(&rt->foreign_wakers, memory_order_acquire))
		sched_yield();
}

/* ---- fiber records ------------------------------------------------------ */

#if !defined(ZK_ASAN) && !defined(ZK_TSAN) && UINTPTR_MAX == UINT64_MAX
/* The cost of a queued fiber (perf: mem_queued); see the layout in fiber.h. */
_Static_assert(sizeof(zk_fiber_t) == 128, "the fiber record grew past 128 bytes");
_Static_assert(offsetof(zk_fiber_t, next) == 64, "the fiber record's first line is not full");
#endif

#define ZK__SLAB_RECS 256

/* Refill a worker's (or, w == NULL, take one from the global) free list. */
static zk_fiber_t *rec_take_global(zk_runtime_t *rt, struct zk__worker *w)
{
	pthread_mutex_lock(&rt->rec_lock);
	if (!rt->rec_free) {
		size_t bytes = sizeof(struct zk__slab) + ZK__SLAB_RECS * sizeof(zk_fiber_t);
		struct zk__slab *s = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
		if (!s) {
			pthread_mutex_unlock(&rt->rec_lock);
			return NULL;
		}
		memset(s, 0, bytes);
		s->n = ZK__SLAB_RECS;
		s->next = rt->slabs;
		rt->slabs = s;
		for (size_t i = s->n; i-- > 0;) {
			s->recs[i].next = rt->rec_free;
			rt->rec_free = &s->recs[i];
		}
	}
	zk_fiber_t *f = rt->rec_free;
	rt->rec_free = f->next;
	if (w) {
		/* move a batch to the worker */
		for (int i = 0; i < 64 && rt->rec_free; i++) {
			zk_fiber_t *g = rt->rec_free;
			rt->rec_free = g->next;
			g->next = w->free_fibers;
			w->free_fibers = g;
			w->nfree++;
		}
	}
	pthread_mutex_unlock(&rt->rec_lock);
	return f;
}

static uint64_t new_fiber_id(struct zk__worker *w)
{
	if (!w)
		return atomic_fetch_add_explicit(&next_fiber_id, 1, memory_order_relaxed);
	if (w->next_id == w->id_end) {
		w->next_id = atomic_fetch_add_explicit(&next_fiber_id, ZK__ID_BLOCK, memory_order_relaxed);
		w->id_end = w->next_id + ZK__ID_BLOCK;
	}
	return w->next_id++;
}

zk_fiber_t *zk__fiber_alloc(zk_runtime_t *rt, struct zk__worker *w)
{
	zk_fiber_t *f;
	if (w && w->free_fibers) {
		f = w->free_fibers;
		w->free_fibers = f->next;
		w->nfree--;
	} else {
		f = rec_take_global(rt, w);
		if (!f)
			return NULL;
	}
	f->ctx = NULL;
	f->stack = NULL;
	f->next = NULL;
	f->rt = rt;
	f->result = NULL;
	f->id = new_fiber_id(w);
	atomic_init(&f->joiner, 0);
	atomic_init(&f->cancel, 0);
	f->wake_reason = 0;
	f->deadline = ZK__NO_DEADLINE;
	f->home = -1;
	f->pinned = 0;
	atomic_init(&f->cancellable_park, 0);
	atomic_init(&f->park_permit, 0);
	f->has_tls = 0;
	atomic_init(&f->cancel_hook, NULL);
	f->err = 0;
	f->waiting_on = NULL;
	f->tls = NULL;
	f->name = NULL;
	atomic_store_explicit(&f->state, ZK__NEW, memory_order_relaxed);
	return f;
}

static void rec_free(zk_fiber_t *f)
{
	free(f->name);
	f->name = NULL;
	zk_runtime_t *rt = f->rt;
	atomic_store_explicit(&f->state, ZK__FREE, memory_order_relaxed);
	struct zk__worker *w = zk__worker_self();
	if (w && w->rt == rt && w->nfree < ZK__FREE_MAX) {
		f->next = w->free_fibers;
		w->free_fibers = f;
		w->nfree++;
		return;
	}
	pthread_mutex_lock(&rt->rec_lock);
	f->next = rt->rec_free;
	rt->rec_free = f;
	pthread_mutex_unlock(&rt->rec_lock);
}

void zk__fiber_free(zk_fiber_t *f)
{
	rec_free(f);
}

/* ---- the switch ---------------------------------------------------------- */

#ifdef ZK_ASAN
#define FIBER_ASAN_SLOT(f) (&(f)->asan_fake)
#else
#define FIBER_ASAN_SLOT(f) ((void **)NULL)
#endif
#ifdef ZK_TSAN
#define FIBER_TSAN(f) ((f)->tsan)
#else
#define FIBER_TSAN(f) NULL
#endif

/* SW_PARK_LAST: SW_PARK whose publish promised ZK__PARK_PUBLISH_LAST */
enum { SW_RUN, SW_YIELD, SW_PARK, SW_PARK_LAST, SW_EXIT };

struct zk__switch {
	zk_fiber_t *prev; /* the fiber just left; NULL when leaving the scheduler */
	int how;
	zk__publish_fn publish;
	void *arg;
};

static void fiber_entry(zk_transfer_t t);

/* Has every fiber of rt ended?  Each worker counts the fibers it spawned
 * and the fibers that ended on it (owner-written, never decreasing), and
 * spawns from outside the runtime are counted in rt->spawned_foreign.
 * Ends are read before spawns: a fiber's spawn happens before its end
 * (release/acquire through the run queues), so any end we count has its
 * spawn counted too, and equal sums mean that at the moment between the
 * two passes nothing was alive - and nothing alive can spawn any more.
 * No shared counter is written per spawn or end. */
static int all_ended(zk_runtime_t *rt)
{
	uint64_t ended = 0, spawned = 0;
	zk__fence_seq_cst(); /* our own last owner_inc before the others' loads */
	for (int i = 0; i < rt->nworkers; i++)
		ended += atomic_load_explicit(&rt->workers[i].n_ended, memory_order_acquire);
	zk__fence_seq_cst();
	spawned = atomic_load_explicit(&rt->spawned_foreign, memory_order_acquire);
	for (int i = 0; i < rt->nworkers; i++)
		spawned += atomic_load_explicit(&rt->workers[i].n_spawned, memory_order_acquire);
	return spawned == ended;
}

/* Called by an idle worker: if everything ended, tell all workers to leave.
 * Only a worker that ended fibers since its last look needs to look: the
 * last fiber to end ends on some worker, and two workers whose last ends
 * race both look (count, fence, read the others), so one sees both. */
static void check_all_ended(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	uint64_t e = atomic_load_explicit(&w->n_ended, memory_order_relaxed);
	if (e == w->ended_checked)
		return;
	w->ended_checked = e;
	if (atomic_load_explicit(&rt->done, memory_order_relaxed) || !all_ended(rt))
		return;
	atomic_store_explicit(&rt->done, 1, memory_order_seq_cst);
	zk__fence_seq_cst();
	wake_all(rt);
}

void zk__count_spawn(zk_runtime_t *rt, struct zk__worker *w)
{
	if (w)
		owner_inc(&w->n_spawned);
	else
		atomic_fetch_add_explicit(&rt->spawned_foreign, 1, memory_order_acq_rel);
}

/* Record the end of f (ran to the end, or could never start) and wake its
 * joiner, or free it if it was detached (lifetime rule in fiber.c).
 * Called by a worker, on some other context than f's own. */
static void fiber_ended(struct zk__worker *w, zk_fiber_t *f)
{
	atomic_store_explicit(&f->state, ZK__DONE, memory_order_release);
	zk__fiber_end_notify(f); /* fiber.c */
	owner_inc(&w->n_ended); /* see all_ended() */
}

/* Bind a stack to a fiber about to run for the first time.  Returns 0 if
 * it cannot run (cancelled first, or no stack to be had: it ends with that
 * error, which zk_join reports). */
static int fiber_prepare(struct zk__worker *w, zk_fiber_t *f)
{
	if (f->stack)
		return 1;
	int rc = atomic_load_explicit(&f->cancel, memory_order_relaxed) ? -ECANCELED : 0;
	if (rc == 0)
		rc = zk__stack_get(&w->rt->pool, &w->stacks, &f->stack);
	if (rc != 0) {
		f->err = rc;
		f->result = NULL;
		fiber_ended(w, f);
		return 0;
	}
	f->ctx = zk_make_fcontext(zk__stack_top(f->stack), zk__stack_usable(f->stack), fiber_entry);
	f->fresh = 1;
#ifdef ZK_TSAN
	f->tsan = zk__tsan_create();
#endif
	f->home = (int16_t)w->index;
	return 1;
}

/* Fire this worker's due timers.  Reads the clock only when a timer is
 * pending.  Returns how many fired (their fibers are now runnable). */
static int fire_timers(struct zk__worker *w)
{
	if (zk__timers_next(&w->timers) == ZK__NO_DEADLINE)
		return 0;
	return zk__timers_fire(&w->timers, zk__now());
}

static zk_fiber_t *steal_from(struct zk__worker *w, struct zk__worker *v);

/* A busy worker steals only from a worker that has stopped running fibers
 * with some queued: one the kernel has preempted (other threads share its
 * CPU) or that runs one long fiber.  Idle workers steal anyway; this is
 * for when every other worker is busy, which is exactly when the queued
 * fibers would otherwise wait for the stalled one's next time slice (a
 * whole scheduler tick: 4 ms at HZ=250).  Called every 16th pick; watches
 * one other worker at a time, in turn, and reads the clock only while the
 * one it watches looks stalled. */
#define ZK__RESCUE_NS 50000
static zk_fiber_t *rescue_steal(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	struct zk__worker *v = &rt->workers[w->rescue_victim];
	uint64_t runs = atomic_load_explicit(&v->st_run, memory_order_relaxed);
	if (v == w || runs != w->rescue_seen || zk__deque_size(&v->dq) == 0) {
		/* moving (or nothing to take): watch the next one */
		int next = (w->rescue_victim + 1) % rt->nworkers;
		if (next == w->index)
			next = (next + 1) % rt->nworkers;
		w->rescue_victim = next;
		w->rescue_seen = atomic_load_explicit(&rt->workers[next].st_run, memory_order_relaxed);
		w->rescue_since = 0;
		return NULL;
	}
	int64_t now = zk__now();
	if (w->rescue_since == 0) { /* first look that finds it stalled */
		w->rescue_since = now;
		return NULL;
	}
	if (now - w->rescue_since < ZK__RESCUE_NS)
		return NULL;
	w->rescue_since = now; /* still stalled: the next steal in as long */
	return steal_from(w, v);
}

static zk_fiber_t *pick(struct zk__worker *w)
{
	zk_fiber_t *f;
	if (inbox_nonempty(w, memory_order_relaxed))
		drain_inbox(w);
	/* A busy worker looks at its timers every 16th pick; an idle one
	 * always does before it steals or sleeps (find_work). */
	if ((w->tick & 15) == 15) {
		fire_timers(w);
		if (w->rt->nworkers > 1) {
			if ((f = rescue_steal(w))) {
				w->tick++;
				return f;
			}
			/* busy for a while with fibers queued: share them */
			if (lazy_spread(w->rt) && zk__deque_size(&w->dq) > 0 &&
			    atomic_load_explicit(&w->rt->nidle, memory_order_relaxed) > 0 &&
			    needs_help(w))
				wake_one(w->rt);
		}
	}
	if (++w->tick % ZK__FAIR_TICK == 0) {
		/* A busy worker flushes its batched submissions once per
		 * fairness round too (and now and then reaps: driver.h). */
		zk__driver_tick(&w->driver);
		/* alternate which of the two starvable queues goes first */
		if ((w->tick / ZK__FAIR_TICK) & 1) {
			if ((f = fifo_pop(&w->local)) || (f = injector_pop(w)))
				return f;
		} else if ((f = injector_pop(w)) || (f = fifo_pop(&w->local))) {
			return f;
		}
	}
	if (w->lifo && w->lifo_streak < ZK__LIFO_MAX) {
		f = w->lifo;
		w->lifo = NULL;
		w->lifo_streak++;
		return f;
	}
	w->lifo_streak = 0;
	if ((f = zk__deque_take(&w->dq)))
		return f;
	if (w->lifo) {
		f = w->lifo;
		w->lifo = NULL;
		return f;
	}
	/* yielded fibers go behind everything else runnable */
	if ((f = injector_pop(w)))
		return f;
	return fifo_pop(&w->local);
}

/* The next fiber this worker can run without stealing, with a stack. */
static zk_fiber_t *next_runnable(struct zk__worker *w)
{
	for (;;) {
		zk_fiber_t *f = pick(w);
		if (!f || fiber_prepare(w, f))
			return f;
	}
}

static void after_switch(struct zk__worker *w, zk_transfer_t t)
{
	struct zk__switch *sw = t.data;
	zk_fiber_t *p = sw->prev;
	if (!p) {
		w->sched_ctx = t.fctx;
		return;
	}
	/* Copy out before p becomes visible: sw lives on p's stack, which
	 * another worker may start running on as soon as p is published. */
	int how = sw->how;
	zk__publish_fn publish = sw->publish;
	void *arg = sw->arg;
	p->ctx = t.fctx;
	switch (how) {
	case SW_YIELD:
		atomic_store_explicit(&p->state, ZK__RUNNABLE, memory_order_relaxed);
		fifo_push(&w->local, p);
		break;
	case SW_PARK_LAST: {
		/* publish marks p PARKED itself (zk__park_commit) just before
		 * the release that makes it visible, its last access to p's
		 * stack: no PARKING state and no locked instruction to settle
		 * it.  The cancel check pairs with zk_cancel (store cancel,
		 * heavy barrier, load state): the barrier orders our PARKED
		 * store before the load below, so either zk_cancel sees PARKED
		 * and kicks p, or we see the flag and kick it ourselves.  (p
		 * may be running elsewhere by now, or parked again: only its
		 * record is touched, and a kick acts on whatever p waits for
		 * then, which the flag ends as well.) */
		if (publish(p, arg)) {
			/* not made visible: runnable again - unless it was
			 * committed and a canceller has woken it meanwhile */
			int expected = ZK__PARKED;
			if (atomic_load_explicit(&p->state, memory_order_relaxed) == ZK__RUNNING) {
				atomic_store_explicit(&p->state, ZK__RUNNABLE, memory_order_relaxed);
				zk__schedule(p);
			} else if (atomic_compare_exchange_strong_explicit(&p->state, &expected,
									   ZK__RUNNABLE,
									   memory_order_acq_rel,
									   memory_order_acquire)) {
				zk__schedule(p);
			}
			break;
		}
		atomic_signal_fence(memory_order_seq_cst);
		if (atomic_load_explicit(&p->cancel, memory_order_relaxed))
			zk__cancel_kick(p);
		break;
	}
	case SW_PARK: {
		/* PARKING while publish runs: a waker that finds p meanwhile
		 * (publish may release a lock before it returns, and zk_cancel
		 * needs no lock) only marks it WOKEN; p is scheduled here, once
		 * publish is done with arg, which lives on p's stack. */
		atomic_store_explicit(&p->state, ZK__PARKING, memory_order_release);
		int settle = publish(p, arg) ? ZK__RUNNABLE : ZK__PARKED;
		int expected = ZK__PARKING;
		if (!atomic_compare_exchange_strong_explicit(&p->state, &expected, settle,
							     memory_order_seq_cst, memory_order_acquire)) {
			/* Woken during publish: the waker finishes its WAKING ->
			 * WOKEN step (storing its reason) in a few instructions. */
			while (atomic_load_explicit(&p->state, memory_order_acquire) != ZK__WOKEN)
				cpu_relax();
			settle = ZK__RUNNABLE;
			atomic_store_explicit(&p->state, ZK__RUNNABLE, memory_order_relaxed);
		}
		if (settle == ZK__RUNNABLE) { /* no wait after all, or woken */
			zk__schedule(p);
			break;
		}
		/* Pairs with zk_cancel, which stores cancel then reads state:
		 * the CAS that made p PARKED and this load are both seq_cst, so
		 * either it sees PARKED (and kicks p) or we see cancel and kick
		 * p ourselves - also when it saw PARKING, which it leaves to
		 * us unless the park is cancellable (no fence needed: the
		 * seq_cst CAS is the one locked instruction either way). */
		if (atomic_load_explicit(&p->cancel, memory_order_seq_cst))
			zk__cancel_kick(p);
		break;
	}
	case SW_EXIT:
		zk__tsan_destroy(FIBER_TSAN(p));
		zk__stack_put(&w->rt->pool, &w->stacks, p->stack);
		p->stack = NULL;
		fiber_ended(w, p);
		break;
	}
}

/* Switch to context to (whose stack is lo..lo+size, TSan fiber to_tsan),
 * resuming it by ret or by an indirect jump (fcontext.h). */
static inline zk_transfer_t jump(zk_fcontext_t to, void *to_tsan, const void *lo, size_t size,
				 void **asan_save, struct zk__switch *sw, int by_ret)
{
	zk__asan_start(asan_save, lo, size);
	zk__tsan_switch(to_tsan);
	zk_transfer_t t = by_ret ? zk_jump_fcontext_ret(to, sw) : zk_jump_fcontext(to, sw);
	zk__asan_finish(asan_save ? *asan_save : NULL);
	return t;
}

/* Switch to fiber f.  Fibers suspend in switch_away, at its call of this:
 * resuming one by ret keeps the CPU's return predictions right.  A fresh
 * fiber starts in the trampoline instead, which the indirect jump
 * predicts. */
static inline zk_transfer_t jump_fiber(zk_fiber_t *f, void **asan_save, struct zk__switch *sw)
{
	int by_ret = !f->fresh;
	f->fresh = 0;
	return jump(f->ctx, FIBER_TSAN(f), f->stack->lo, zk__stack_usable(f->stack), asan_save, sw,
		    by_ret);
}

/* Leave the running fiber self: straight to the next runnable fiber, or to
 * the scheduler loop.  Returns when self is resumed (never for SW_EXIT). */
static void switch_away(struct zk__worker *w, zk_fiber_t *self, struct zk__switch *sw)
{
	if (w->rt->pool.guard == ZK__GUARD_CANARY && !zk__stack_canary_ok(self->stack))
		zk__stack_report_overflow(self->id, self->name, zk__stack_usable(self->stack),
					  "canary overwritten");
	void **save = sw->how == SW_EXIT ? NULL : FIBER_ASAN_SLOT(self);
	zk_fiber_t *next = next_runnable(w);
	zk_transfer_t t;
	if (next) {
		w->current = next;
		atomic_store_explicit(&next->state, ZK__RUNNING, memory_order_relaxed);
		owner_inc(&w->st_run);
		t = jump_fiber(next, save, sw);
	} else if (sw->how == SW_YIELD) {
		return; /* nothing else to run: keep going */
	} else {
		w->current = NULL;
		/* the worker's loop waits at a call of its own: jump */
		t = jump(w->sched_ctx, w->sched_tsan, w->thread_stack_lo, w->thread_stack_size, save, sw,
			 0);
	}
	/* Resumed, perhaps by another worker: ask again who we run on. */
	after_switch(zk__worker_self(), t);
}

static void fiber_entry(zk_transfer_t t)
{
	zk__asan_finish(NULL);
	struct zk__worker *w = zk__worker_self();
	after_switch(w, t);
	zk_fiber_t *self = w->current;
	self->result = self->fn(self->arg);
	zk__fiber_finish(self);
}

void zk__fiber_finish(zk_fiber_t *self)
{
	zk__fiber_run_tls_dtors(self);
	struct zk__switch sw = { self, SW_EXIT, NULL, NULL };
	switch_away(zk__worker_self(), self, &sw);
	abort(); /* an ended fiber was resumed: broken invariant */
}

void zk__yield(zk_fiber_t *self)
{
	struct zk__switch sw = { self, SW_YIELD, NULL, NULL };
	switch_away(zk__worker_self(), self, &sw);
	atomic_store_explicit(&self->state, ZK__RUNNING, memory_order_relaxed);
}

/* ---- the asymmetric barrier between parking and cancelling -------------
 *
 * A park with ZK__PARK_PUBLISH_LAST stores PARKED and later loads the
 * cancel flag with only a compiler barrier between; zk_cancel stores the
 * flag and later loads the state.  Without a full barrier on both sides
 * each could miss the other (a store-load reordering), and a cancelled
 * fiber would sleep on.  Parks are frequent and cancels rare, so the cost
 * goes to the canceller: membarrier(PRIVATE_EXPEDITED) makes every running
 * thread of the process execute a full barrier before it returns.  Where
 * it is not available (old kernel, seccomp, valgrind) parks keep the
 * locked-instruction protocol (SW_PARK) and the canceller a plain fence.
 * ThreadSanitizer cannot see membarrier: TSan builds use the fallback. */
static int asym_barrier;
static long online_cpus = 1;    /* for spin_budget */
static pthread_once_t probe_once = PTHREAD_ONCE_INIT;

/* Facts about the machine, looked up once per process before any worker
 * of any runtime starts (they never change while one runs). */
static void probe_machine(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	if (n > 0)
		online_cpus = n;
#if !defined(ZK_TSAN) && defined(SYS_membarrier)
	if (!getenv("ZOKIO_NO_MEMBARRIER") &&
	    syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0)
		asym_barrier = 1;
#endif
}

void zk__heavy_barrier(void)
{
#if !defined(ZK_TSAN) && defined(SYS_membarrier)
	if (asym_barrier && syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0)
		return;
#endif
	zk__fence_seq_cst();
}

int zk__park(const char *what, zk__publish_fn publish, void *arg, int flags)
{
	struct zk__worker *w = zk__worker_self();
	zk_fiber_t *self = w ? w->current : NULL;
	if (!self)
		return -EPERM;
	int cancellable = (flags & ZK__PARK_CANCELLABLE) != 0;
	if (cancellable && atomic_load_explicit(&self->cancel, memory_order_relaxed))
		return -ECANCELED;
	self->waiting_on = what;
	atomic_store_explicit(&self->cancellable_park, (uint8_t)cancellable, memory_order_relaxed);
	self->wake_reason = 0;
	int how = (flags & ZK__PARK_PUBLISH_LAST) && asym_barrier ? SW_PARK_LAST : SW_PARK;
	struct zk__switch sw = { self, how, publish, arg };
	switch_away(w, self, &sw);
	self->waiting_on = NULL;
	atomic_store_explicit(&self->cancellable_park, 0, memory_order_relaxed);
	return self->wake_reason;
}

int zk__unpark(zk_fiber_t *f, int reason)
{
	int s = atomic_load_explicit(&f->state, memory_order_acquire);
	for (;;) {
		if (s == ZK__PARKED) {
			if (atomic_compare_exchange_weak_explicit(&f->state, &s, ZK__RUNNABLE,
								  memory_order_acq_rel,
								  memory_order_acquire)) {
				f->wake_reason = reason;
				zk__schedule(f);
				return 1;
			}
		} else if (s == ZK__PARKING) {
			/* publish still runs: leave the scheduling to after_switch */
			if (atomic_compare_exchange_weak_explicit(&f->state, &s, ZK__WAKING,
								  memory_order_acq_rel,
								  memory_order_acquire)) {
				f->wake_reason = reason;
				atomic_store_explicit(&f->state, ZK__WOKEN, memory_order_release);
				return 1;
			}
		} else {
			return 0;
		}
	}
}

/* ---- the worker loop ---------------------------------------------------- */

/* Steal about half of one victim's deque: the first fiber is returned, the
 * rest go to our own deque. */
static zk_fiber_t *steal_from(struct zk__worker *w, struct zk__worker *v)
{
	int64_t n = zk__deque_size(&v->dq);
	if (n == 0)
		return NULL;
	n = (n + 1) / 2;
	if (n > ZK__STEAL_MAX)
		n = ZK__STEAL_MAX;
	zk_fiber_t *first = NULL;
	int retries = 0;
	while (n > 0) {
		zk_fiber_t *f = zk__deque_steal(&v->dq);
		if (f == ZK__STEAL_RETRY) {
			if (++retries > 4)
				break;
			continue;
		}
		if (!f)
			break;
		owner_inc(&w->st_steals);
		if (!first)
			first = f;
		else if (zk__deque_push(&w->dq, f) < 0)
			injector_push(w->rt, f);
		n--;
	}
	return first;
}

static zk_fiber_t *steal_round(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	w->rng = w->rng * 1103515245u + 12345u;
	int start = (int)((w->rng >> 16) % (uint32_t)rt->nworkers);
	for (int i = 0; i < rt->nworkers; i++) {
		struct zk__worker *v = &rt->workers[(start + i) % rt->nworkers];
		if (v == w)
			continue;
		zk_fiber_t *f = steal_from(w, v);
		if (f)
			return f;
	}
	return NULL;
}

static int work_visible(zk_runtime_t *rt, struct zk__worker *w)
{
	if (atomic_load_explicit(&rt->inj_len, memory_order_seq_cst) ||
	    inbox_nonempty(w, memory_order_seq_cst))
		return 1;
	for (int i = 0; i < rt->nworkers; i++)
		if (zk__deque_size(&rt->workers[i].dq))
			return 1;
	return 0;
}

static zk_fiber_t *next_prepared_or_stolen(struct zk__worker *w, zk_fiber_t *f)
{
	while (f && !fiber_prepare(w, f))
		f = next_runnable(w);
	return f;
}

/* Become one of the spinning workers if fewer than half of them spin.
 * When the slots are taken, wait a moment before giving up: a spinner that
 * just found work leaves its slot within a few hundred nanoseconds, and
 * going to sleep instead turns the next wake-up of this worker into a
 * system call (this is what makes cross-worker ping-pong fast). */
static int spin_slot_claim(zk_runtime_t *rt)
{
	int limit = rt->nworkers / 2 > 0 ? rt->nworkers / 2 : 1;
	for (int i = 0; i < 256; i++) {
		int s = atomic_load_explicit(&rt->nspinning, memory_order_relaxed);
		if (s < limit) {
			if (atomic_compare_exchange_weak_explicit(&rt->nspinning, &s, s + 1,
								  memory_order_seq_cst,
								  memory_order_relaxed))
				return 1;
		} else {
			cpu_relax();
		}
	}
	return 0;
}

/* How long an idle worker may spin before it sleeps.  Spinning pays only
 * while a CPU is free for it: it saves a sleep and a wake-up (~20 us of
 * CPU on a virtual machine) and answers a wake within a microsecond.  When
 * more threads are runnable than there are CPUs (a client on the same
 * machine, other processes, more threads than cores), a spin only delays
 * whoever waits for this CPU: the worker then does not spin at all
 * (ZK__SPIN_CONTENDED_NS), it makes one steal round and sleeps.  Every
 * 10 ms at most, a worker looks at two signs of that:
 *   - the time this thread itself waited for a CPU (the second field of
 *     /proc/thread-self/schedstat): over 1/10 of the time since the last
 *     look means it shares its CPU with someone who wants it;
 *   - the kernel's count of runnable threads (/proc/loadavg, fourth
 *     field) above the number of CPUs.
 * The count alone missed the two-worker HTTP rows, where the load
 * generator shares a CPU with one worker: a snapshot often finds a worker
 * asleep, the 50 us budget stayed, and the spinner kept the generator off
 * its CPU (wrk at 100 connections, budgets forced: 98k requests/s at
 * 10 us of CPU each with 50 us, 166k at 6.2 us with 5 us, 163k at 5.3 us
 * with none; even 5 us spins took a fifth of the server's CPU samples, and
 * echo at 1 and 100 connections did no worse without).  Unreadable means
 * "not busy".  A snapshot now and then counts a short-lived thread of
 * another process: the budget shrinks only after two busy looks in a row
 * (a client that keeps running stays seen), and grows back at the first
 * quiet one. */
/* Read a small /proc file into buf as a string; 0, or -1 if unreadable. */
static int read_proc(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, size - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	return 0;
}

static int cpus_oversubscribed(void)
{
	char buf[128];
	long running;
	if (read_proc("/proc/loadavg", buf, sizeof(buf)) ||
	    sscanf(buf, "%*f %*f %*f %ld/", &running) != 1)
		return 0;
	return running > online_cpus;
}

/* Nanoseconds this thread has waited on a run queue, or -1. */
static int64_t thread_run_delay(void)
{
	char buf[96];
	long long run, delay;
	if (read_proc("/proc/thread-self/schedstat", buf, sizeof(buf)) ||
	    sscanf(buf, "%lld %lld", &run, &delay) != 2)
		return -1;
	return delay;
}

static int64_t spin_budget(struct zk__worker *w, int64_t now)
{
	int64_t window = now - w->spin_checked;
	if (window >= 10000000) {
		int64_t delay = thread_run_delay();
		int waited = delay >= 0 && w->run_delay >= 0 && (delay - w->run_delay) * 10 > window;
		w->run_delay = delay;
		if (!waited && !cpus_oversubscribed())
			w->oversub_seen = 0;
		else if (w->oversub_seen < 2)
			w->oversub_seen++;
		w->spin_ns = w->oversub_seen >= 2 ? ZK__SPIN_CONTENDED_NS : ZK__SPIN_NS;
		w->spin_checked = now;
	}
	return w->spin_ns;
}

/* Spin a while looking for work to steal.  At most half of the workers spin
 * at once; a worker over that limit, or one whose CPUs are contended
 * (spin_budget 0), still makes one steal round. */
static zk_fiber_t *steal_phase(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	if (rt->nworkers == 1)
		return NULL;
	int64_t now = zk__now(), budget = spin_budget(w, now);
	if (budget == 0 || !spin_slot_claim(rt))
		return next_prepared_or_stolen(w, steal_round(w));
	zk_fiber_t *f = NULL;
	/* A spinner sees readiness through its own ring (below) if it can
	 * watch the shared poller. */
	if (lazy_spread(rt) && np_claim(w)) {
		w->driver.np_watch = 1;
		zk__driver_flush(&w->driver);
		np_settle(w);
	}
	/* Time-bounded: each pass looks at this worker's inbox (where a fiber
	 * pinned here is woken), every 8th also steals and polls the
	 * injector; the clock is read every 64th pass. */
	int64_t until = now + budget;
	for (unsigned pass = 0; !f; pass++) {
		if (inbox_nonempty(w, memory_order_relaxed))
			f = next_runnable(w);
		if (!f && (pass & 7) == 0) {
			f = steal_round(w);
			if (!f)
				f = injector_pop(w);
		}
		if (f)
			break;
		/* Our own I/O completed: reap it (find_work) rather than let it
		 * wait out the spin. */
		if (atomic_load_explicit(&rt->done, memory_order_relaxed) ||
		    zk__driver_ready(&w->driver))
			break;
		cpu_relax();
		if ((pass & 63) == 63 && zk__now() > until)
			break;
	}
	int last = atomic_fetch_sub_explicit(&rt->nspinning, 1, memory_order_seq_cst) == 1;
	/* The last spinner found work: if there is more, someone else should
	 * come looking for it. */
	if (f && last && work_visible(rt, w))
		wake_one(rt);
	return next_prepared_or_stolen(w, f);
}

/* The blocking wait of an idle worker: returns once another thread called
 * unpark_worker(w) (the token in w->parker is consumed) or, when
 * timeout_ns >= 0, once that many nanoseconds have passed (the worker's
 * next timer is due; the token is then left alone).  This is the one place
 * a worker blocks; the I/O layer turns it into its driver's wait
 * (io_uring / epoll with an eventfd as the wake-up), bounded the same way.
 * Returns 0 if nothing came: no token, no fiber made runnable. */
static int worker_wait(struct zk__worker *w, int64_t timeout_ns)
{
	/* A token already here: a waker came after the last look at the
	 * queues; its eventfd write (if any) only makes a later wait short. */
	if (atomic_exchange_explicit(&w->parker, 0, memory_order_acquire))
		return 1;
	/* The driver's wait also returns for I/O completions, which it has
	 * made runnable by then (the caller takes itself off the idle list). */
	int woken = zk__driver_poll(&w->driver, timeout_ns);
	return atomic_exchange_explicit(&w->parker, 0, memory_order_acquire) || woken;
}

/* Take w off the idle list if a waker has not already done so. */
static void idle_leave(struct zk__worker *w)
{
	idle_remove(w->rt, w);
}

/* Every way out of worker_sleep: give up the roles it took for the sleep
 * (the poller's watch unless it is armed, the lookout's), then leave the
 * idle list. */
static void sleep_end(struct zk__worker *w)
{
	np_settle(w);
	zk__token_release(&w->rt->lookout, w);
	idle_leave(w);
}

/* Under lazy spreading, the last worker to go to sleep watches the shared
 * poller (unless another sleeper's watch is still armed) and sleeps until
 * woken.  Of the other sleepers one, the lookout, sleeps lightly: while
 * some worker is awake it looks every ZK__WATCH_NS whether that worker
 * still runs fibers (find_work), and takes over its harvest and its deque
 * only if it does not (the kernel preempted it, or one fiber holds it);
 * while every worker sleeps it looks every ZK__LOOKOUT_NS, so that a
 * watcher woken by readiness and then held up is found within a few
 * looks.  The rest sleep until woken; a worker that goes back to work
 * while the role is vacant wakes one of them to take it.  None of them
 * is woken for readiness an awake worker will harvest anyway (io.c), and
 * an idle runtime wakes only the lookout, ~100 times a second.
 * Returns 1 if the lookout's sleep ran its time out with nothing to do. */
#define ZK__WATCH_NS 1000000
#define ZK__LOOKOUT_NS 10000000
static int worker_sleep(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	pthread_mutex_lock(&rt->idle_lock);
	atomic_store_explicit(&w->idle, 1, memory_order_seq_cst);
	w->next_idle = rt->idle;
	rt->idle = w;
	int last = atomic_fetch_add_explicit(&rt->nidle, 1, memory_order_seq_cst) + 1 ==
		   rt->nworkers;
	pthread_mutex_unlock(&rt->idle_lock);
	int64_t look = 0; /* 0: sleep until woken */
	if (lazy_spread(rt)) {
		if (last)
			w->driver.np_watch = (uint8_t)np_claim(w);
		if (!w->driver.np_watch && zk__token_claim(&rt->lookout, w))
			look = last ? ZK__LOOKOUT_NS : ZK__WATCH_NS;
	}
	int light = look != 0;

	zk__fence_seq_cst();
	/* While others are awake, their deques are theirs to run. */
	int visible = lazy_spread(rt) && !last
			      ? atomic_load_explicit(&rt->inj_len, memory_order_seq_cst) ||
					inbox_nonempty(w, memory_order_seq_cst)
			      : work_visible(rt, w);
	if (visible || atomic_load_explicit(&rt->done, memory_order_seq_cst)) {
		sleep_end(w);
		return 0;
	}
	/* Sleep no longer than until this worker's next timer.  Only this
	 * worker arms its timers, so the deadline cannot move earlier while
	 * it sleeps (another thread's disarm only makes it later). */
	int64_t timeout = -1, next = zk__timers_next(&w->timers);
	if (next != ZK__NO_DEADLINE) {
		timeout = next - zk__now();
		if (timeout <= 0) {
			sleep_end(w);
			return 0;
		}
	}
	if (!light || (timeout >= 0 && timeout <= look))
		light = 0; /* a timer ends this sleep anyway */
	else
		timeout = look;
	owner_inc(&w->st_parks);
	int got = worker_wait(w, timeout);
	/* woke for a timer or I/O: nobody took us off the list */
	sleep_end(w);
	owner_inc(&w->st_wakeups);
	return light && !got;
}

/* After the lookout's sleep: has the awake worker it watches run no fiber
 * since its last look?  Watches one other worker at a time, in turn; an
 * idle one is not stalled. */
static int watched_stalled(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	struct zk__worker *v = &rt->workers[w->watch_victim];
	if (v == w || atomic_load_explicit(&v->idle, memory_order_relaxed)) {
		/* ours, or idle: watch the next one from now */
		w->watch_victim = (w->watch_victim + 1) % rt->nworkers;
		v = &rt->workers[w->watch_victim];
	} else if (atomic_load_explicit(&v->st_run, memory_order_relaxed) == w->watch_seen) {
		return 1;
	}
	w->watch_seen = atomic_load_explicit(&v->st_run, memory_order_relaxed);
	return 0;
}

/* A single worker with I/O in flight spins a while (spin_budget, not past
 * its next timer) before it sleeps, watching its own driver from user
 * space (several workers do the same inside steal_phase).  On a virtual
 * machine a sleep and a wake-up cost ~20 us of CPU, a good part of what
 * the spin costs at most, and a reply that comes within the spin is served
 * at once: 1-connection echo 3x the round trips, less CPU per round trip.
 *
 * With more than two operations in flight the budget is 2/n of that, but
 * no less than ZK__SPIN_MIN_NS.  Many connections keep the worker busy;
 * when it runs dry all the same, the peer is the slower side and a long
 * spin only burns CPU: HTTP at 100 connections (wrk) spent 1.3 us of ~5
 * per request spinning, most of it in spins of 10-50 us.  The short spins
 * still catch the replies that are about to come, which keeps the tail
 * of 100-connection echo where it was.
 *
 * The batched submissions go out first, or nothing could complete.
 * Returns 1 if the driver has completions to reap. */
static int io_spin(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	struct zk__driver *d = &w->driver;
	if (!d->impl || d->nops == 0)
		return 0;
	int64_t now = zk__now(), budget = spin_budget(w, now);
	if (d->nops > 2 && budget > ZK__SPIN_MIN_NS) {
		budget = budget * 2 / d->nops;
		if (budget < ZK__SPIN_MIN_NS)
			budget = ZK__SPIN_MIN_NS;
	}
	int64_t until = now + budget;
	int64_t next = zk__timers_next(&w->timers);
	if (next != ZK__NO_DEADLINE && next < until)
		until = next;
	if (until <= now)
		return 0;
	zk__driver_flush(d);
	for (unsigned pass = 0;; pass++) {
		if (zk__driver_ready(d))
			return 1;
		if (inbox_nonempty(w, memory_order_relaxed) ||
		    atomic_load_explicit(&rt->inj_len, memory_order_relaxed) ||
		    atomic_load_explicit(&rt->done, memory_order_relaxed))
			return 0;
		cpu_relax();
		if ((pass & 63) == 63 && zk__now() > until)
			return 0;
	}
}

static zk_fiber_t *find_work(struct zk__worker *w)
{
	zk_runtime_t *rt = w->rt;
	for (;;) {
		zk_fiber_t *f = next_runnable(w);
		if (f)
			return f;
		if (lazy_spread(rt))
			w->dry_at = zk__now();
		check_all_ended(w);
		if (atomic_load_explicit(&rt->done, memory_order_acquire))
			return NULL;
		if (fire_timers(w))
			continue;
		/* Our own completions first, before taking others' work. */
		if (rt->nworkers > 1 && zk__driver_poll(&w->driver, 0))
			continue;
		f = steal_phase(w);
		if (f)
			return f;
		if (rt->nworkers == 1 && io_spin(w) && zk__driver_poll(&w->driver, 0))
			continue;
		if (zk__driver_ready(&w->driver) && zk__driver_poll(&w->driver, 0))
			continue;
		while (worker_sleep(w) && !watched_stalled(w) &&
		       !atomic_load_explicit(&rt->done, memory_order_acquire))
			;
		/* Back to work (woken, a timer, a stall to take over) while the
		 * others sleep with nobody looking in (the lookout was this
		 * worker, or is awake): one of them takes the role, or nobody
		 * would notice if this worker is then held up. */
		if (lazy_spread(rt) && atomic_load_explicit(&rt->lookout, memory_order_acquire) < 0 &&
		    atomic_load_explicit(&rt->nidle, memory_order_acquire) > 0)
			wake_one(rt);
	}
}

static void worker_loop(struct zk__worker *w)
{
	zk_fiber_t *f;
	while ((f = find_work(w))) {
		struct zk__switch sw = { NULL, SW_RUN, NULL, NULL };
		w->current = f;
		atomic_store_explicit(&f->state, ZK__RUNNING, memory_order_relaxed);
		owner_inc(&w->st_run);
		zk_transfer_t t = jump_fiber(f, &w->sched_asan_fake, &sw);
		after_switch(w, t);
	}
}

/* Signal-handler lookup for stack.c: the fiber on this thread. */
static int overflow_lookup(struct zk__stack **s, uint64_t *id, const char **name)
{
	struct zk__worker *w = zk__tls_worker;
	if (!w || !w->current || !w->current->stack)
		return -1;
	*s = w->current->stack;
	*id = w->current->id;
	*name = w->current->name;
	return 0;
}

static void *worker_main(void *arg)
{
	struct zk__worker *w = arg;
	zk__tls_worker = w;
	void *alt = zk__altstack_enter();
	pthread_attr_t attr;
	if (pthread_getattr_np(pthread_self(), &attr) == 0) {
		void *lo;
		size_t size;
		if (pthread_attr_getstack(&attr, &lo, &size) == 0) {
			w->thread_stack_lo = lo;
			w->thread_stack_size = size;
		}
		pthread_attr_destroy(&attr);
	}
	w->sched_tsan = zk__tsan_current();
	zk__driver_start(&w->driver);
	worker_loop(w);
	zk__driver_stop(&w->driver);
	zk__tls_worker = NULL;
	zk__altstack_leave(alt);
	return NULL;
}

int zk__sched_init(zk_runtime_t *rt)
{
	pthread_once(&probe_once, probe_machine);
	int n = rt->nworkers;
	rt->workers = aligned_alloc(64, sizeof(struct zk__worker) * (size_t)n);
	if (!rt->workers)
		return -ENOMEM;
	memset(rt->workers, 0, sizeof(struct zk__worker) * (size_t)n);
	for (int i = 0; i < n; i++) {
		struct zk__worker *w = &rt->workers[i];
		zk__deque_init(&w->dq);
		w->rt = rt;
		w->index = i;
		w->rng = 0x9e3779b9u * (uint32_t)(i + 1);
		w->spin_ns = ZK__SPIN_NS;
		w->run_delay = -1; /* no look yet */
		zk__timers_init(&w->timers);
		int rc = zk__driver_init(&w->driver, w, rt->driver_vt);
		if (rc) {
			while (i-- > 0)
				zk__driver_fini(&rt->workers[i].driver);
			free(rt->workers);
			return rc;
		}
	}
	atomic_init(&rt->np_holder, -1);
	atomic_init(&rt->lookout, -1);
	pthread_mutex_init(&rt->inj_lock, NULL);
	pthread_mutex_init(&rt->idle_lock, NULL);
	pthread_mutex_init(&rt->rec_lock, NULL);
	zk__overflow_lookup = overflow_lookup;
	zk__overflow_handler_install();
	return 0;
}

int zk__sched_run(zk_runtime_t *rt)
{
	if (zk__worker_self())
		return -EDEADLK;
	int expected = 0;
	if (!atomic_compare_exchange_strong(&rt->running, &expected, 1))
		return -EBUSY;
	atomic_store(&rt->done, all_ended(rt));
	int started = 1, rc = 0;
	for (; started < rt->nworkers; started++) {
		rc = -pthread_create(&rt->workers[started].thread, NULL, worker_main, &rt->workers[started]);
		if (rc)
			break;
	}
	if (rc == 0) {
		worker_main(&rt->workers[0]);
	} else {
		/* A thread could not start: stop the ones that did and report;
		 * the fibers stay queued for a later run. */
		atomic_store(&rt->done, 1);
		wake_all(rt);
	}
	for (int i = 1; i < started; i++)
		pthread_join(rt->workers[i].thread, NULL);
	atomic_store(&rt->running, 0);
	return rc;
}

/* Free everything a runtime that is not running still holds: queued fibers
 * that never started, cached stacks and the record slabs. */
void zk__sched_fini(zk_runtime_t *rt)
{
	for (int i = 0; i < rt->nworkers; i++) {
		struct zk__worker *w = &rt->workers[i];
		zk__stack_cache_flush(&rt->pool, &w->stacks);
		zk__timers_fini(&w->timers);
		zk__driver_fini(&w->driver);
	}
	struct zk__slab *s = rt->slabs;
	while (s) {
		struct zk__slab *next = s->next;
		for (size_t i = 0; i < s->n; i++) {
			zk_fiber_t *f = &s->recs[i];
			if (f->stack)
				zk__stack_put(&rt->pool, NULL, f->stack);
			free(f->tls);
			free(f->name);
		}
		free(s);
		s = next;
	}
	free(rt->workers);
	pthread_mutex_destroy(&rt->inj_lock);
	pthread_mutex_destroy(&rt->idle_lock);
	pthread_mutex_destroy(&rt->rec_lock);
}

/* ---- observability ------------------------------------------------------ */

int zk_runtime_stats(zk_runtime_t *rt, zk_worker_stats_t *stats, int n)
{
	if (!rt)
		return -EINVAL;
	for (int i = 0; i < n && i < rt->nworkers; i++) {
		struct zk__worker *w = &rt->workers[i];
		stats[i].fibers_run = atomic_load_explicit(&w->st_run, memory_order_relaxed);
		stats[i].steals = atomic_load_explicit(&w->st_steals, memory_order_relaxed);
		stats[i].injector_pops = atomic_load_explicit(&w->st_injector, memory_order_relaxed);
		stats[i].parks = atomic_load_explicit(&w->st_parks, memory_order_relaxed);
		stats[i].wakeups = atomic_load_explicit(&w->st_wakeups, memory_order_relaxed);
	}
	return rt->nworkers;
}

static const char *state_name(int s)
{
	switch (s) {
	case ZK__NEW: return "new";
	case ZK__RUNNABLE: return "runnable";
	case ZK__RUNNING: return "running";
	case ZK__PARKED: return "parked";
	case ZK__PARKING: return "parking";
	case ZK__WAKING:
	case ZK__WOKEN: return "waking";
	case ZK__DONE: return "done";
	default: return "?";
	}
}

int zk__each_live_fiber(zk_runtime_t *rt, int (*fn)(zk_fiber_t *f, int state, void *arg),
			void *arg)
{
	for (struct zk__slab *s = rt->slabs; s; s = s->next) {
		for (size_t i = 0; i < s->n; i++) {
			zk_fiber_t *f = &s->recs[i];
			int st = atomic_load_explicit(&f->state, memory_order_acquire);
			if (st == ZK__FREE || st == ZK__DONE)
				continue;
			int rc = fn(f, st, arg);
			if (rc)
				return rc;
		}
	}
	return 0;
}

struct dump {
	int fd, count;
};

/* Best effort while the runtime runs: records are read without stopping
 * their owners (the fields may be mid-update, never unmapped). */
#ifdef ZK_TSAN
__attribute__((no_sanitize("thread")))
#endif
static int dump_one(zk_fiber_t *f, int st, void *arg)
{
	struct dump *d = arg;
	char line[256];
	char name[ZK__NAME_MAX] = "";
	if (f->name)
		memcpy(name, f->name, sizeof(name));
	name[sizeof(name) - 1] = 0;
	const char *what = f->waiting_on;
	int len = snprintf(line, sizeof(line), "fiber %llu%s%s%s %s%s%s worker %d\n",
			   (unsigned long long)f->id, name[0] ? " \"" : "", name,
			   name[0] ? "\"" : "", state_name(st),
			   st == ZK__PARKED && what ? " on " : "",
			   st == ZK__PARKED && what ? what : "", f->home);
	if (len > 0 && write(d->fd, line, (size_t)len) < 0)
		return -errno;
	d->count++;
	return 0;
}

int zk_runtime_dump(zk_runtime_t *rt, int fd)
{
	if (!rt || fd < 0)
		return -EINVAL;
	struct dump d = { fd, 0 };
	pthread_mutex_lock(&rt->rec_lock);
	int rc = zk__each_live_fiber(rt, dump_one, &d);
	pthread_mutex_unlock(&rt->rec_lock);
	return rc ? rc : d.count;
}
