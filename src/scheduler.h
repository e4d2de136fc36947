/*
 * scheduler.h - workers, run queues, stealing, parking, and the switch itself.
 */
#ifndef ZK_SCHEDULER_H
#define ZK_SCHEDULER_H

#include "config.h"
#include "deque.h"
#include "driver.h"
#include "fiber.h"
#include "stack.h"
#include "timer.h"

#include <pthread.h>
#include <stdatomic.h>

/* Owner-only FIFO of fibers linked through zk_fiber.next. */
struct zk__fifo {
	zk_fiber_t *head, *tail;
};

/* Fiber records come from slabs that live as long as the runtime, so the
 * dump and shutdown can walk every record without a registry on the
 * spawn path. */
struct zk__slab {
	struct zk__slab *next;
	size_t n;
	_Alignas(64) zk_fiber_t recs[]; /* each record on its own lines */
};

struct zk__worker {
	struct zk__deque dq;            /* stealable: fresh and migratable fibers */
	zk_runtime_t *rt;
	int index;
	pthread_t thread;
	zk_fcontext_t sched_ctx;        /* the scheduler loop on the thread's own stack */
	void *sched_asan_fake;
	const void *thread_stack_lo;    /* for ASan's switch annotations */
	size_t thread_stack_size;
	void *sched_tsan;
	zk_fiber_t *current;
	zk_fiber_t *lifo;               /* most recently woken fiber, runs next */
	unsigned lifo_streak;
	struct zk__fifo local;          /* yielded fibers and fibers that may not migrate */
	uint64_t tick;
	uint32_t rng;
	struct zk__stack_cache stacks;
	struct zk__timers timers;       /* armed by this worker's parks (timer.c) */
	struct zk__driver driver;       /* its I/O backend and wake-up (driver.h) */
	zk_fiber_t *free_fibers;        /* record free list */
	unsigned nfree;
	uint64_t next_id, id_end;       /* block of fiber ids */
	int spinning;
	int64_t spin_ns;                /* current spin budget (spin_budget) */
	int64_t spin_checked;           /* when spin_budget last looked */
	int oversub_seen;               /* spin_budget: busy looks in a row */
	int64_t run_delay;              /* spin_budget: ns spent waiting for a CPU */
	/* Fibers spawned by / ended on this worker: owner-written, read by
	 * idle workers to see whether everything ended (all_ended). */
	_Atomic uint64_t n_spawned, n_ended;
	uint64_t ended_checked;         /* n_ended at our last all_ended() look */
	/* rescue_steal: the worker being watched, its st_run when we started
	 * watching, and when we first found it unchanged (0: not yet). */
	int rescue_victim;
	uint64_t rescue_seen;
	int64_t rescue_since;
	/* Lazy spreading (scheduler.c, worker_sleep): when this worker last
	 * ran out of fibers; the awake worker a light sleeper watches for a
	 * stall, and its st_run at the last look. */
	int64_t dry_at;
	int watch_victim;
	uint64_t watch_seen;

	/* Fibers that may not migrate, woken by another thread: a lock-free
	 * stack pushed by anyone, emptied by the owner. */
	_Atomic(zk_fiber_t *) inbox;

	/* Sleeping: a token word for the wake-up. */
	_Atomic uint32_t parker;
	_Atomic int idle;               /* on the runtime's idle list (written under idle_lock) */
	struct zk__worker *next_idle;

	/* Statistics: written by the owner only, read by anyone. */
	_Atomic uint64_t st_run, st_steals, st_injector, st_parks, st_wakeups;
} __attribute__((aligned(64)));

/* Fields are grouped by who writes them, one cache line per group, so that
 * e.g. a spinning worker's counter does not slow every spawn's update of
 * live (false sharing).  Allocated 64-byte aligned (runtime.c). */
struct zk_runtime {
	/* read-mostly */
	zk_runtime_opts_t opts;
	const struct zk__driver_vt *driver_vt; /* backend chosen at create */
	struct zk__netpoll *netpoll;    /* shared readiness poller, or NULL */
	int nworkers;
	struct zk__worker *workers;
	_Atomic int running;
	_Atomic int done;               /* every fiber ended: workers leave */
	struct zk_runtime *next_rt;     /* registry for signal-triggered dumps */

	_Alignas(64) _Atomic uint64_t spawned_foreign; /* spawns from outside the runtime */

	_Alignas(64) _Atomic int nspinning;

	_Alignas(64) pthread_mutex_t inj_lock; /* global injector */
	struct zk__fifo inj;
	_Atomic long inj_len;

	_Alignas(64) pthread_mutex_t idle_lock; /* sleeping workers */
	struct zk__worker *idle;
	_Atomic int nidle;
	/* The worker whose driver watches the shared poller while it sleeps
	 * (its one-shot poll is armed), or -1 (driver.h, np_watch); and the
	 * one sleeper that looks in on the others now and then while every
	 * worker sleeps, or -1 (worker_sleep). */
	_Atomic int np_holder, lookout;

	_Alignas(64) _Atomic int foreign_wakers; /* plain threads inside zk__schedule */

	_Alignas(64) pthread_mutex_t rec_lock; /* fiber records */
	struct zk__slab *slabs;
	zk_fiber_t *rec_free;

	_Alignas(64) struct zk__stack_pool pool;
};

/* The worker running on the calling thread, or NULL.  A fiber may resume
 * on another thread, so the thread-local read must happen anew after every
 * switch (see the migration rule in zokio.h): the compiler may not reuse
 * the thread pointer or the variable's address across a call.  On x86-64
 * the read is one asm statement (the thread pointer is %fs, read inside
 * it, and "memory" keeps it from being merged with an earlier read);
 * elsewhere it is a call that is never inlined. */
extern __thread struct zk__worker *zk__tls_worker
	__attribute__((tls_model("initial-exec"), visibility("hidden")));
#if defined(__x86_64__) && defined(__ELF__)
#define ZK__WORKER_SELF_INLINE 1
static inline struct zk__worker *zk__worker_self(void)
{
	struct zk__worker *w;
	__asm__ volatile("movq zk__tls_worker@gottpoff(%%rip), %0\n\t"
			 "movq %%fs:(%0), %0"
			 : "=r"(w)
			 :
			 : "memory");
	return w;
}
#else
struct zk__worker *zk__worker_self(void);
#endif

/* The running fiber, or NULL on a plain thread: zk_self() for the
 * runtime's own hot paths, without a second call. */
static inline zk_fiber_t *zk__self(void)
{
	struct zk__worker *w = zk__worker_self();
	return w ? w->current : NULL;
}

/* Owner only: other fibers are queued on w (LIFO slot, local queue or
 * deque), so its scheduler round goes on after the running fiber parks. */
static inline int zk__worker_has_queued(struct zk__worker *w)
{
	return w->lifo || w->local.head || zk__deque_size(&w->dq) > 0;
}

/* A role one worker at a time holds (rt->np_holder, rt->lookout): a
 * worker index, or -1.  Claiming a role w already holds succeeds;
 * releasing one w does not hold does nothing. */
static inline int zk__token_claim(_Atomic int *token, struct zk__worker *w)
{
	int holder = -1;
	return atomic_compare_exchange_strong_explicit(token, &holder, w->index,
						       memory_order_acq_rel, memory_order_relaxed) ||
	       holder == w->index;
}

static inline void zk__token_release(_Atomic int *token, struct zk__worker *w)
{
	int me = w->index;
	atomic_compare_exchange_strong_explicit(token, &me, -1, memory_order_acq_rel,
						memory_order_relaxed);
}

/* Make a RUNNABLE fiber run soon: the LIFO slot of the current worker, its
 * home worker's inbox if it may not migrate, or the global injector. */
void zk__schedule(zk_fiber_t *f);
/* Queue a freshly spawned fiber. */
void zk__schedule_new(zk_runtime_t *rt, struct zk__worker *w, zk_fiber_t *f);
/* Count a spawn (w: the spawning worker of rt, or NULL from outside). */
void zk__count_spawn(zk_runtime_t *rt, struct zk__worker *w);

int zk__sched_init(zk_runtime_t *rt);
void zk__sched_fini(zk_runtime_t *rt);
int zk__sched_run(zk_runtime_t *rt);
/* Wait until no thread outside the runtime is still waking one of its
 * fibers (called before the runtime's memory goes away). */
void zk__sched_quiesce(zk_runtime_t *rt);
/* Call fn(f, state, arg) for every fiber record that is neither free nor
 * ended, until fn returns non-zero, which is then returned.  The caller
 * holds rt->rec_lock (records are never freed while it is). */
int zk__each_live_fiber(zk_runtime_t *rt, int (*fn)(zk_fiber_t *f, int state, void *arg),
			void *arg);
/* Suspend the current fiber for good (it ended). */
void zk__fiber_finish(zk_fiber_t *self) __attribute__((noreturn));
void zk__yield(zk_fiber_t *self);

void zk__runtime_registry_add(zk_runtime_t *rt);
void zk__runtime_registry_remove(zk_runtime_t *rt);

#endif
