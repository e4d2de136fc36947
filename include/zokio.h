/*
 * zokio.h - stackful fibers whose blocking-style calls suspend the fiber,
 * not the thread.
 *
 * The model in one paragraph: a runtime owns N worker threads.  zk_spawn()
 * creates a fiber - a small record that gets a pooled, guard-paged stack the
 * first time it runs.  A fiber runs until it calls something that would wait
 * (zk_yield, zk_join, a lock, I/O); then it *parks*: its registers are saved,
 * the worker switches straight to the next runnable fiber, and the parked
 * fiber is resumed - possibly on another worker - once its wait is over.
 *
 * Conventions used by every function below:
 *   - Return values are >= 0 on success and a negative errno value on
 *     failure (the kernel/liburing convention).  errno is never read or set.
 *   - "Fiber only" functions must be called from inside a fiber; "any thread"
 *     ones may also be called from a plain thread, where waiting blocks the
 *     thread instead of parking a fiber.
 *
 * Migration (read this before using thread-local storage): a parked fiber may
 * resume on a different worker thread.  The address of a thread-local
 * variable - errno is the classic example - taken before a call that may park
 * can therefore point into *another thread's* storage after it.  A compiler
 * may legally cache &errno across a function call, so `zk_yield(); if (errno)`
 * can read the wrong thread's errno.  That is why this API returns negative
 * errno values instead.  Fibers that need thread-local state must be pinned
 * (zk_spawn_opts_t.pinned) or the runtime started with no_migration = 1.
 *
 * Holding an OS mutex (pthread_mutex_t) across a call that parks is a bug:
 * the worker thread may deadlock running another fiber that wants the same
 * mutex, or the fiber may resume on another thread and unlock a mutex that
 * thread does not own.
 */
#ifndef ZOKIO_H
#define ZOKIO_H

#include <stddef.h>
#include <stdint.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ZK_API __attribute__((visibility("default")))

#define ZK_VERSION_MAJOR 0
#define ZK_VERSION_MINOR 1

typedef struct zk_runtime zk_runtime_t;
typedef struct zk_fiber zk_fiber_t;
typedef void *(*zk_fiber_fn)(void *arg);

/* ------------------------------------------------------------------------ */
/* Runtime                                                                   */
/* ------------------------------------------------------------------------ */

/* Default usable stack size: 64 KiB.  Large enough for ordinary C code with a
 * few KiB of locals and a libc call chain (printf needs ~8 KiB, getaddrinfo
 * ~20 KiB), small enough that 100,000 parked fibers fit in a few GiB of
 * address space, and since pages are only committed when touched a fiber
 * that uses 4 KiB costs 4 KiB of memory, not 64. */
#define ZK_DEFAULT_STACK_SIZE (64 * 1024)

enum zk_guard {
	ZK_GUARD_PAGE = 0,   /* PROT_NONE page below each stack (default) */
	ZK_GUARD_CANARY = 1, /* no guard mapping; canary checked at every switch */
};

typedef struct zk_runtime_opts {
	size_t stack_size;      /* usable bytes per stack, rounded up to pages; 0 = default */
	int guard;              /* enum zk_guard */
	int workers;            /* worker threads; 0 = $ZOKIO_WORKERS, else online CPUs */
	int no_migration;       /* 1: a started fiber always resumes on its first worker */
	unsigned stack_cache;   /* stacks kept per worker (hot); 0 = default (64) */
	unsigned stack_pool_hwm;/* global pool high-water mark: stacks returned past it
	                         * have their pages given back with madvise; 0 = 256 */
	int backend;            /* enum zk_backend: the I/O driver */
	int shared_poll;        /* enum zk_shared_poll: where sockets wait */
} zk_runtime_opts_t;

/* I/O backends.  AUTO (the default) takes $ZOKIO_BACKEND (io_uring, epoll
 * or auto) if set, else io_uring when a ring can be set up here, else epoll,
 * saying so in one line on stderr when io_uring was refused (seccomp,
 * kernel.io_uring_disabled, old kernel).  Asking for IO_URING explicitly
 * where it is refused makes zk_runtime_create fail with -ENOSYS. */
enum zk_backend {
	ZK_BACKEND_AUTO = 0,
	ZK_BACKEND_IO_URING = 1,
	ZK_BACKEND_EPOLL = 2,
};

/* Where a fiber's socket call waits for the socket to become ready.
 * SHARED: in one epoll set per runtime, harvested by whichever worker looks
 * first; the call itself is then made directly.  A worker that the kernel
 * preempts (other programs on its CPU) then does not hold up its
 * connections for long: another worker runs them (under epoll, a sleeping
 * worker wakes at once; under io_uring, where only one sleeper watches the
 * set so that readiness a busy worker will harvest wakes nobody, one
 * sleeper looks in on busy workers every millisecond and takes over from
 * one that has stopped, within a few milliseconds).  PER_WORKER: in the
 * calling worker's own driver (with io_uring, the kernel performs the
 * call), only ever completed by that worker: slightly less work per call,
 * but a preempted worker's connections wait until it runs again.  AUTO
 * (the default) takes $ZOKIO_SHARED_POLL (1 or 0) if set, else SHARED with
 * two or more workers and PER_WORKER with one.  Applies to recv, send,
 * recvmsg, sendmsg, recvfrom, sendto, accept, connect and the waits for
 * readability or writability; reads and writes of files always go through
 * the worker's own driver. */
enum zk_shared_poll {
	ZK_SHARED_POLL_AUTO = 0,
	ZK_SHARED_POLL_ON = 1,
	ZK_SHARED_POLL_OFF = 2,
};

/* Fill *opts with the defaults.  Any thread. */
ZK_API void zk_runtime_opts_init(zk_runtime_opts_t *opts);

/* Create a runtime (opts may be NULL for the defaults).  No thread starts
 * until zk_runtime_run().  Returns 0, -EINVAL for a bad option, -ENOMEM. */
ZK_API int zk_runtime_create(zk_runtime_t **out, const zk_runtime_opts_t *opts);

/* Run the runtime: the calling thread becomes worker 0, workers-1 more
 * threads start.  Returns 0 when every fiber spawned on it has finished
 * (fibers still running are waited for), then the extra threads have exited.
 * May be called again later to run fibers spawned since.  Plain thread only;
 * -EBUSY if the runtime is already running, -EDEADLK from inside a fiber. */
ZK_API int zk_runtime_run(zk_runtime_t *rt);

/* Ask every live fiber of a running runtime to stop: each one is cancelled
 * (see zk_cancel) so that its current or next suspension point returns
 * -ECANCELED and it can unwind.  zk_runtime_run() still returns only once
 * they have all ended.  Any thread; a zk_runtime_destroy() that follows the
 * run at once waits until a shutdown in progress on another thread has
 * returned. */
ZK_API void zk_runtime_shutdown(zk_runtime_t *rt);

/* Free a runtime that is not running.  Fibers that were spawned but never
 * started are discarded (their records freed, their functions never run).
 * Returns 0, or -EBUSY while zk_runtime_run() is in progress. */
ZK_API int zk_runtime_destroy(zk_runtime_t *rt);

/* The I/O backend rt uses: "io_uring" or "epoll".  Any thread. */
ZK_API const char *zk_runtime_backend(zk_runtime_t *rt);

/* 1 if rt's sockets wait in the shared poller (enum zk_shared_poll), else
 * 0; -EINVAL for NULL.  Any thread. */
ZK_API int zk_runtime_shared_poll(zk_runtime_t *rt);

/* The runtime of the calling fiber, or NULL on a plain thread. */
ZK_API zk_runtime_t *zk_runtime_current(void);

/* Convenience: create a default runtime, run fn(arg) as its first fiber,
 * run until all fibers end, destroy it.  *result (if not NULL) gets fn's
 * return value.  Returns 0 or a negative errno. */
ZK_API int zk_run(zk_fiber_fn fn, void *arg, void **result);

/* ------------------------------------------------------------------------ */
/* Fibers                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct zk_spawn_opts {
	const char *name; /* copied (up to 31 bytes); NULL = unnamed */
	int pinned;       /* 1: never migrates from the worker it first runs on */
} zk_spawn_opts_t;

/* Spawn fn(arg) as a new fiber of the current runtime.  Fiber only.
 * If out is NULL the fiber is detached; otherwise *out is a handle that must
 * be given to zk_join() or zk_detach() exactly once.  The fiber's stack is
 * bound when it first runs.  Returns 0, -EPERM outside a fiber, -ENOMEM, or
 * -EAGAIN when no stack can be mapped any more (vm.max_map_count or address
 * space exhausted). */
ZK_API int zk_spawn(zk_fiber_t **out, zk_fiber_fn fn, void *arg);

/* Spawn with options on runtime rt (NULL = the current one).  Any thread:
 * from a plain thread the fiber goes to the runtime's global injector. */
ZK_API int zk_spawn_ex(zk_runtime_t *rt, zk_fiber_t **out, zk_fiber_fn fn,
		       void *arg, const zk_spawn_opts_t *opts);

/* Like zk_spawn_ex, but the fiber starts on worker `worker` (0..workers-1)
 * and stays there (it is pinned).  Any thread.  -EINVAL for a worker index
 * out of range.  Useful to place fibers deliberately, e.g. to measure
 * cross-worker communication. */
ZK_API int zk_spawn_on(zk_runtime_t *rt, int worker, zk_fiber_t **out, zk_fiber_fn fn,
		       void *arg, const zk_spawn_opts_t *opts);

/* Wait for f to end and release the handle.  Parks a fiber, blocks a plain
 * thread.  *result (if not NULL) gets the fiber's return value (or the value
 * given to zk_exit).  Returns 0; -EDEADLK when a fiber joins itself; -EAGAIN
 * or -ENOMEM if f could never start because no stack could be mapped for it;
 * -ECANCELED if f was cancelled before it first ran (it never ran); -EINVAL
 * for NULL or a detached handle.  This wait ends only with f: neither the
 * caller's deadline nor its cancellation interrupt it (zk_join_timed does
 * both). */
ZK_API int zk_join(zk_fiber_t *f, void **result);

/* zk_join with a deadline: like zk_join when f ends in time; otherwise
 * returns -ETIMEDOUT (deadline_ns passed, or the fiber's own deadline) or
 * -ECANCELED (the caller was cancelled) and the handle stays valid, to be
 * joined, waited on or detached later.  If f ends as the wait fails, the
 * end wins: the join succeeds.  deadline_ns < 0 = none.  An f that has
 * already ended is joined even after the deadline.  Any thread. */
ZK_API int zk_join_timed(zk_fiber_t *f, void **result, int64_t deadline_ns);

/* Wait until the first of tasks[0..n) ends and return its index (the
 * lowest index if several have already ended).  No handle is consumed:
 * join or detach every task afterwards as usual.  With ZK_WAIT_CANCEL_REST,
 * every other task is then cancelled (zk_cancel), so a following join of
 * each one returns promptly if they honour cancellation.  Returns the
 * index, -ETIMEDOUT (deadline_ns passed, or the fiber's own deadline;
 * < 0 = none), -ECANCELED (the caller was cancelled), -EINVAL (n < 1,
 * n > ZK_WAIT_MAX, NULL or detached task, unknown flag), -EDEADLK (the
 * caller is one of the tasks), -ENOMEM.  A failed wait cancels nothing and
 * leaves every handle as it was; a task ending as the wait fails makes it
 * succeed.  The handles must stay valid during the call (not joined or
 * detached elsewhere).  Parks a fiber, blocks a plain thread; any thread. */
#define ZK_WAIT_CANCEL_REST 1
#define ZK_WAIT_MAX 1024
ZK_API int zk_wait_first(zk_fiber_t *const *tasks, int n, int64_t deadline_ns, int flags);

/* Release the handle without waiting; the fiber's record is freed when it
 * ends.  Any thread.  Returns 0; -EINVAL for NULL or a handle already
 * detached; -EBUSY (handle unchanged) while a zk_join, zk_join_timed or
 * zk_wait_first on f is in progress. */
ZK_API int zk_detach(zk_fiber_t *f);

/* Let other runnable fibers run; the caller goes behind them.  Fiber only
 * (a no-op elsewhere). */
ZK_API void zk_yield(void);

/* End the calling fiber with result (as if its function returned it).
 * Fiber only; outside a fiber it does nothing and returns. */
ZK_API void zk_exit(void *result);

/* The calling fiber, or NULL on a plain thread. */
ZK_API zk_fiber_t *zk_self(void);

/* A fiber's id: unique within the process, never 0.  Any thread. */
ZK_API uint64_t zk_fiber_id(const zk_fiber_t *f);

/* Set the name shown in diagnostics (copied, truncated to 31 bytes).
 * Returns 0 or -EINVAL. */
ZK_API int zk_fiber_set_name(zk_fiber_t *f, const char *name);

/* The fiber's name ("" when unnamed).  Valid while the handle is. */
ZK_API const char *zk_fiber_name(const zk_fiber_t *f);

/* Index of the worker running the caller (0..workers-1), or -1 on a plain
 * thread.  Only a hint for an unpinned fiber: it may change at any park. */
ZK_API int zk_worker_index(void);

/* Park and unpark: the lowest-level wait, one permit per fiber, no queue
 * and no lock (like Rust's thread::park or Java's LockSupport).  Build a
 * custom primitive on it when the ones below do not fit.
 *
 * zk_unpark(f) makes a permit available to f: if f is parked in zk_park it
 * wakes; otherwise f's next zk_park returns at once.  Permits do not add
 * up: several unparks before a park leave one.  Any thread.  f must be a
 * valid handle (not yet joined or released).  Returns 0, -EINVAL for NULL.
 *
 * zk_park() consumes the permit, parking the calling fiber until one is
 * available.  Returns 0 when it got the permit; -ECANCELED if the fiber is
 * cancelled, -ETIMEDOUT at its deadline (zk_deadline_set) or, for
 * zk_park_timed, at deadline_ns (absolute, zk_now_ns() clock, < 0 = none);
 * the permit is then left as it was.  If an unpark races with the timeout
 * or cancellation, the unpark wins (0).  Fiber only: -EPERM on a plain
 * thread.  As with any wait, recheck the condition you wait for: a permit
 * left over from an earlier unpark makes a park return at once. */
ZK_API int zk_park(void);
ZK_API int zk_park_timed(int64_t deadline_ns);
ZK_API int zk_unpark(zk_fiber_t *f);

/* ------------------------------------------------------------------------ */
/* Cancellation                                                              */
/* ------------------------------------------------------------------------ */

/* Request cancellation of f: if it is parked in a cancellable wait it wakes
 * and that call returns -ECANCELED; later cancellable calls in it return
 * -ECANCELED until it ends.  A fiber that never started will not start.
 * Any thread.  Returns 0 or -EINVAL.
 *
 * Cost: cancelling is the rare side of a handshake with every park, so it
 * carries the heavy half - one membarrier(2) system call (a few
 * microseconds; zk_runtime_shutdown issues one for all fibers) - and parks
 * stay free of a locked instruction.  Where membarrier is refused, or with
 * ZOKIO_NO_MEMBARRIER=1 in the environment (read at the first
 * zk_runtime_create), both sides use ordinary fences instead. */
ZK_API int zk_cancel(zk_fiber_t *f);

/* 1 if cancellation of the calling fiber was requested, else 0. */
ZK_API int zk_cancelled(void);

/* ------------------------------------------------------------------------ */
/* Time                                                                      */
/* ------------------------------------------------------------------------ */

/* Time is CLOCK_MONOTONIC in nanoseconds, the clock of zk_now_ns().  Every
 * deadline in this API is an absolute time on that clock; "timed" variants
 * of waiting calls take one, and a negative deadline means "none".  A wait
 * whose deadline passes returns -ETIMEDOUT; a deadline already past makes
 * the call fail at once (after trying the non-waiting path, where there is
 * one).  Each worker keeps its pending timers in a heap (O(log n) arm and
 * cancel; 1,000,000 pending timers are fine). */

/* Now, in nanoseconds of CLOCK_MONOTONIC.  Any thread. */
ZK_API int64_t zk_now_ns(void);

/* Sleep for ns nanoseconds / until deadline_ns.  A fiber parks (its worker
 * runs others); a plain thread sleeps in clock_nanosleep.  Returns 0 when
 * the time has come (at once for a time already past); in a fiber also
 * -ECANCELED if it is cancelled, or -ETIMEDOUT if the fiber's deadline
 * (zk_deadline_set) comes first.  Any thread. */
ZK_API int zk_sleep_ns(int64_t ns);
ZK_API int zk_sleep_until(int64_t deadline_ns);

/* Give the calling fiber a deadline: from now on every call of it that
 * waits (sleep, locks, channels, select, I/O, ...) fails with -ETIMEDOUT
 * once deadline_ns has passed, until zk_deadline_clear().  A call's own
 * deadline and the fiber's deadline combine: the earlier wins.  Non-waiting
 * paths (a lock that is free, a channel with room) still succeed after the
 * deadline.  A negative value clears it.  Fiber only: returns 0, or -EPERM
 * on a plain thread. */
ZK_API int zk_deadline_set(int64_t deadline_ns);
ZK_API int zk_deadline_clear(void);

/* The calling fiber's deadline, or -1 if it has none (or on a plain
 * thread). */
ZK_API int64_t zk_deadline_get(void);

/* ------------------------------------------------------------------------ */
/* Synchronisation                                                           */
/* ------------------------------------------------------------------------ */

/* Mutex, condition variable, reader-writer lock, semaphore, wait group,
 * once and barrier for fibers.  Common rules:
 *   - Contended waits park the fiber, never the worker thread.  The same
 *     objects work from plain threads, where waiting blocks the thread, so
 *     fibers and threads may share them.  Any thread, unless noted.
 *   - Waiting is first come, first served: a release hands the object to
 *     the longest waiter (no barging, no starvation).  The mutex is the
 *     exception: it lets a running locker barge in, and switches to
 *     hand-off only when a waiter starves (see below).
 *   - Every wait honours the fiber's deadline (-ETIMEDOUT) and cancellation
 *     (-ECANCELED); the *_timed variants add their own absolute deadline
 *     (zk_now_ns() clock, < 0 = none).  A failed wait leaves the object as
 *     if it had never been attempted.  If a release and a timeout race, the
 *     release wins: the call succeeds.
 *   - The types are plain structs of opaque words: embed them anywhere,
 *     never copy one in use.  An all-zero mutex, condition variable, rwlock
 *     or once (the ZK_*_INIT initialisers) is ready to use; semaphores, wait
 *     groups and barriers need their init call.  Destroy calls only check
 *     (-EBUSY while held or waited on): they free nothing.
 *   - Free an object (or destroy a channel) only once no call on it is in
 *     progress in any fiber or thread.  A call that was woken by another
 *     party's release never touches the object again, so e.g. the last
 *     sender may free a channel as soon as its send has returned.
 */

typedef struct zk_mutex { uint64_t opaque_[4]; } zk_mutex_t;
typedef struct zk_cond { uint64_t opaque_[4]; } zk_cond_t;
typedef struct zk_rwlock { uint64_t opaque_[4]; } zk_rwlock_t;
typedef struct zk_sem { uint64_t opaque_[4]; } zk_sem_t;
typedef struct zk_waitgroup { uint64_t opaque_[4]; } zk_waitgroup_t;
typedef struct zk_once { uint64_t opaque_[4]; } zk_once_t;
typedef struct zk_barrier { uint64_t opaque_[4]; } zk_barrier_t;

#define ZK_MUTEX_INIT { { 0 } }
#define ZK_COND_INIT { { 0 } }
#define ZK_RWLOCK_INIT { { 0 } }
#define ZK_ONCE_INIT { { 0 } }

/* Mutex.  lock: 0, -ETIMEDOUT, -ECANCELED.  trylock: 0 or -EBUSY.  unlock:
 * 0, or -EPERM if it was not locked (ownership is not checked: any fiber
 * or thread may unlock, as with a binary semaphore).  Uncontended lock and
 * unlock are one atomic compare-and-swap each.
 *
 * Fairness works as in Go's sync.Mutex.  Normally unlock frees the mutex
 * and wakes the longest waiter to compete for it, and a fiber or thread
 * that is running (no wake-up to wait for) may take it first: under
 * contention this keeps the mutex busy instead of idle while each waiter
 * wakes up, several times the throughput of strict hand-off.  A woken
 * waiter that loses goes back to the front of the queue.  Once a waiter
 * has waited more than 1 ms, the mutex switches to hand-off (starvation)
 * mode: unlock gives it directly to the longest waiter, newcomers queue
 * behind, and trylock fails, until the queue empties or the waiter
 * served has waited less than 1 ms.  So no waiter starves: once it has
 * waited 1 ms it is served in arrival order, behind only the waiters
 * queued before it.
 *
 * The common rules above hold; "the release wins" a race with a timeout
 * in the sense that a waiter woken to compete still gets one last try:
 * it succeeds if the mutex is free, else fails with -ETIMEDOUT or
 * -ECANCELED.  A locker on a multi-worker runtime spins briefly before
 * it queues (not in hand-off mode). */
ZK_API int zk_mutex_init(zk_mutex_t *m);
ZK_API int zk_mutex_destroy(zk_mutex_t *m);
ZK_API int zk_mutex_lock(zk_mutex_t *m);
ZK_API int zk_mutex_lock_timed(zk_mutex_t *m, int64_t deadline_ns);
ZK_API int zk_mutex_trylock(zk_mutex_t *m);
ZK_API int zk_mutex_unlock(zk_mutex_t *m);

/* Condition variable, used with a zk_mutex_t held by the caller.  wait
 * releases m, parks until signalled, and re-acquires m before returning -
 * always, also when it returns -ETIMEDOUT or -ECANCELED (re-acquiring is
 * neither timed nor cancellable).  Returns 0 when signalled; like every
 * condition variable it may also return 0 without a matching change of
 * state, so wait in a loop.  signal wakes the longest waiter, broadcast
 * all; both return 0. */
ZK_API int zk_cond_init(zk_cond_t *c);
ZK_API int zk_cond_destroy(zk_cond_t *c);
ZK_API int zk_cond_wait(zk_cond_t *c, zk_mutex_t *m);
ZK_API int zk_cond_wait_timed(zk_cond_t *c, zk_mutex_t *m, int64_t deadline_ns);
ZK_API int zk_cond_signal(zk_cond_t *c);
ZK_API int zk_cond_broadcast(zk_cond_t *c);

/* Reader-writer lock: many readers or one writer, admitted in arrival
 * order (a reader queues behind a waiting writer, so writers do not
 * starve).  try*: 0 or -EBUSY.  unlock releases whichever side the caller
 * holds: 0, or -EPERM if the lock is not held. */
ZK_API int zk_rwlock_init(zk_rwlock_t *l);
ZK_API int zk_rwlock_destroy(zk_rwlock_t *l);
ZK_API int zk_rwlock_rdlock(zk_rwlock_t *l);
ZK_API int zk_rwlock_rdlock_timed(zk_rwlock_t *l, int64_t deadline_ns);
ZK_API int zk_rwlock_tryrdlock(zk_rwlock_t *l);
ZK_API int zk_rwlock_wrlock(zk_rwlock_t *l);
ZK_API int zk_rwlock_wrlock_timed(zk_rwlock_t *l, int64_t deadline_ns);
ZK_API int zk_rwlock_trywrlock(zk_rwlock_t *l);
ZK_API int zk_rwlock_unlock(zk_rwlock_t *l);

/* Counting semaphore (value <= INT32_MAX).  wait takes one unit, parking
 * while there is none; trywait: 0 or -EAGAIN.  post gives one unit (to the
 * longest waiter if any): 0, or -EOVERFLOW.  value is a snapshot. */
ZK_API int zk_sem_init(zk_sem_t *s, unsigned value);
ZK_API int zk_sem_destroy(zk_sem_t *s);
ZK_API int zk_sem_wait(zk_sem_t *s);
ZK_API int zk_sem_wait_timed(zk_sem_t *s, int64_t deadline_ns);
ZK_API int zk_sem_trywait(zk_sem_t *s);
ZK_API int zk_sem_post(zk_sem_t *s);
ZK_API int zk_sem_value(zk_sem_t *s);

/* Wait group (Go's sync.WaitGroup): add(n) before starting n jobs, done()
 * as each ends, wait() until the count is 0.  add: 0, or -EINVAL if the
 * count would go negative (unchanged then). */
ZK_API int zk_waitgroup_init(zk_waitgroup_t *g);
ZK_API int zk_waitgroup_add(zk_waitgroup_t *g, int delta);
ZK_API int zk_waitgroup_done(zk_waitgroup_t *g);
ZK_API int zk_waitgroup_wait(zk_waitgroup_t *g);
ZK_API int zk_waitgroup_wait_timed(zk_waitgroup_t *g, int64_t deadline_ns);

/* Run fn(arg) exactly once per zk_once_t.  Callers arriving while it runs
 * wait for it to finish.  Returns 0 once fn has run (by this call or
 * another); a waiting caller may instead get -ECANCELED or -ETIMEDOUT (fn
 * then still runs to completion in the first caller). */
ZK_API int zk_once(zk_once_t *once, void (*fn)(void *), void *arg);

/* Barrier for count parties: each wait blocks until count callers have
 * arrived, then all proceed and the barrier is ready for the next round.
 * Returns ZK_BARRIER_SERIAL in exactly one caller of each round (the last
 * to arrive), 0 in the others; a waiter that times out or is cancelled
 * withdraws its arrival. */
#define ZK_BARRIER_SERIAL 1
ZK_API int zk_barrier_init(zk_barrier_t *b, unsigned count);
ZK_API int zk_barrier_destroy(zk_barrier_t *b);
ZK_API int zk_barrier_wait(zk_barrier_t *b);
ZK_API int zk_barrier_wait_timed(zk_barrier_t *b, int64_t deadline_ns);

/* ------------------------------------------------------------------------ */
/* Channels and select                                                       */
/* ------------------------------------------------------------------------ */

/* A channel carries elements of a fixed size (copied in and out) between
 * any number of senders and receivers (fibers or plain threads), in FIFO
 * order per sender.  Capacity 0 is a rendezvous (send waits for a
 * receiver), N buffers N elements (send waits while full: backpressure),
 * ZK_CHAN_UNBOUNDED never makes send wait (the buffer grows).
 *
 * Results, the same for every send/recv variant and for select cases:
 *   0           the element was sent / received
 *   -EPIPE      the channel is closed: a send fails (the element is not
 *               sent; senders parked at close fail too); a receive fails
 *               only once every buffered element has been received
 *   -EAGAIN     try_* only: it would have to wait
 *   -ETIMEDOUT  the deadline (the call's or the fiber's) passed
 *   -ECANCELED  the fiber was cancelled
 *   -ENOMEM     an unbounded channel could not grow
 * A failed call has no effect on the channel. */

typedef struct zk_chan zk_chan_t;

#define ZK_CHAN_UNBOUNDED ((size_t)-1)

/* Create a channel for elements of elem_size bytes (1 .. 1 MiB).  Returns
 * 0, -EINVAL, -ENOMEM. */
ZK_API int zk_chan_create(zk_chan_t **out, size_t elem_size, size_t capacity);

/* Free a channel nobody waits on (buffered elements are dropped).  Returns
 * 0, or -EBUSY while a sender or receiver is parked on it. */
ZK_API int zk_chan_destroy(zk_chan_t *ch);

ZK_API int zk_chan_send(zk_chan_t *ch, const void *elem);
ZK_API int zk_chan_send_timed(zk_chan_t *ch, const void *elem, int64_t deadline_ns);
ZK_API int zk_chan_try_send(zk_chan_t *ch, const void *elem);
ZK_API int zk_chan_recv(zk_chan_t *ch, void *out);
ZK_API int zk_chan_recv_timed(zk_chan_t *ch, void *out, int64_t deadline_ns);
ZK_API int zk_chan_try_recv(zk_chan_t *ch, void *out);

/* Close: wakes every parked receiver (-EPIPE, nothing is buffered when
 * receivers wait) and sender (-EPIPE).  Returns 0, or -EPIPE if it was
 * already closed. */
ZK_API int zk_chan_close(zk_chan_t *ch);

/* Elements buffered now (a snapshot), and the capacity given at create. */
ZK_API size_t zk_chan_len(zk_chan_t *ch);
ZK_API size_t zk_chan_cap(const zk_chan_t *ch);

/* Select: wait until one of several sends/receives can proceed, do exactly
 * that one, and return its index.  Among cases ready at the same time the
 * choice is uniformly random.  A case with chan == NULL is ignored.  *result
 * (if result is not NULL) gets the case's outcome: 0, or -EPIPE if its
 * channel is closed (a receive from a closed, drained channel or a send to a
 * closed channel is "ready" and completes with -EPIPE).  Returns the case
 * index, or -ETIMEDOUT, -ECANCELED, -EINVAL (bad case, n > ZK_SELECT_MAX),
 * -ENOMEM; zk_select_try returns -EAGAIN instead of waiting (Go's
 * "default").  With no usable case at all, zk_select waits only for the
 * deadline or cancellation. */
#define ZK_SELECT_SEND 1
#define ZK_SELECT_RECV 2
#define ZK_SELECT_MAX 1024

typedef struct zk_select_case {
	zk_chan_t *chan;
	int op;      /* ZK_SELECT_SEND or ZK_SELECT_RECV */
	void *buf;   /* element to send / where to receive */
} zk_select_case_t;

ZK_API int zk_select(zk_select_case_t *cases, int n, int *result);
ZK_API int zk_select_timed(zk_select_case_t *cases, int n, int *result, int64_t deadline_ns);
ZK_API int zk_select_try(zk_select_case_t *cases, int n, int *result);

/* ------------------------------------------------------------------------ */
/* Structured concurrency: scopes                                            */
/* ------------------------------------------------------------------------ */

/* A scope (nursery) owns the fibers spawned in it: they cannot outlive it.
 *
 *     zk_scope_t *s;
 *     zk_scope_begin(&s);
 *     zk_scope_spawn(s, fetch, &a);
 *     zk_scope_spawn(s, fetch, &b);
 *     int rc = zk_scope_end(s);   // waits for both; first failure or 0
 *
 * A member task returns 0 for success or a negative errno for failure.  The
 * first failure cancels every other member (their waits return -ECANCELED,
 * so they unwind) and is what zk_scope_end returns.
 *
 * Cancellation of the owner: if the fiber waiting in zk_scope_end is
 * cancelled (or its deadline passes), the scope cancels all members and
 * keeps waiting - without deadline, uncancellably - until every one has
 * ended; then zk_scope_end returns -ECANCELED (or -ETIMEDOUT), unless a
 * member had already failed, whose error it returns instead.  Cancelling a
 * fiber therefore cancels the whole tree of scopes below it, and never
 * leaves an orphan running. */

typedef struct zk_scope zk_scope_t;
typedef int (*zk_task_fn)(void *arg);

/* Open a scope.  Returns 0, -EINVAL, -ENOMEM.  Any thread (the members
 * are fibers, so spawning needs a fiber, see zk_scope_spawn). */
ZK_API int zk_scope_begin(zk_scope_t **out);

/* Spawn fn(arg) as a member.  Fiber only.  Returns 0, -ECANCELED if the
 * scope is already cancelled (a member failed, or zk_scope_cancel), or
 * zk_spawn's errors. */
ZK_API int zk_scope_spawn(zk_scope_t *s, zk_task_fn fn, void *arg);

/* Cancel every member (a failure is not recorded).  Any thread. */
ZK_API int zk_scope_cancel(zk_scope_t *s);

/* Wait for all members, free the scope, and return the first failure or
 * 0 (see above for the owner's cancellation).  Call it exactly once, from
 * the owner - never from a member (that would wait for itself).  Parks a
 * fiber, blocks a plain thread. */
ZK_API int zk_scope_end(zk_scope_t *s);

/* ------------------------------------------------------------------------ */
/* Generators                                                                */
/* ------------------------------------------------------------------------ */

/* A generator is a function running on its own fiber that produces values
 * one by one for a single consumer:
 *
 *     static void count(zk_gen_t *g, void *arg) {
 *         for (int i = 0; ; i++)
 *             if (zk_gen_yield(g, &i) != 0)
 *                 return;              // abandoned: clean up and return
 *     }
 *     zk_gen_create(&g, sizeof(int), count, NULL);
 *     while (zk_gen_next(g, &v) == 0) ...
 *     zk_gen_destroy(g);
 *
 * It is lazy: the function runs only while the consumer waits in
 * zk_gen_next, and stops in zk_gen_yield until the next call. */

typedef struct zk_gen zk_gen_t;
typedef void (*zk_gen_fn)(zk_gen_t *g, void *arg);

/* Create a generator of elem_size-byte values; fn(g, arg) starts at the
 * first zk_gen_next.  Fiber only.  Returns 0, -EINVAL, -EPERM on a plain
 * thread, -ENOMEM, or zk_spawn's errors. */
ZK_API int zk_gen_create(zk_gen_t **out, size_t elem_size, zk_gen_fn fn, void *arg);

/* In the generator: hand *value to the consumer and wait for the next
 * request.  Returns 0, or -EPIPE / -ECANCELED when the generator was
 * abandoned (zk_gen_destroy) or its fiber cancelled: then return from fn. */
ZK_API int zk_gen_yield(zk_gen_t *g, const void *value);

/* In the consumer: the next value into *out.  Returns 0, -EPIPE once the
 * generator function has returned, or -ETIMEDOUT / -ECANCELED (the
 * consumer's deadline or cancellation; the generator may then have one
 * value computed ahead, which the next call gets). */
ZK_API int zk_gen_next(zk_gen_t *g, void *out);

/* Abandon or release a generator at any point: the generator's pending or
 * next zk_gen_yield fails, its function returns, its fiber is joined, and
 * everything is freed.  Returns 0 or -EINVAL. */
ZK_API int zk_gen_destroy(zk_gen_t *g);

/* ------------------------------------------------------------------------ */
/* Fiber-local storage                                                       */
/* ------------------------------------------------------------------------ */

#define ZK_KEYS_MAX 64

typedef unsigned zk_key_t;

/* Create a key; dtor (may be NULL) is called with the non-NULL value when a
 * fiber that set one ends.  Returns 0, or -EAGAIN when ZK_KEYS_MAX keys
 * exist. */
ZK_API int zk_key_create(zk_key_t *key, void (*dtor)(void *));

/* Delete a key (values are not destroyed).  Returns 0 or -EINVAL. */
ZK_API int zk_key_delete(zk_key_t key);

/* The calling fiber's value for key (NULL if unset or outside a fiber). */
ZK_API void *zk_key_get(zk_key_t key);

/* Set the calling fiber's value.  Fiber only.  Returns 0, -EPERM outside a
 * fiber, -EINVAL for a bad key, -ENOMEM. */
ZK_API int zk_key_set(zk_key_t key, void *value);

/* ------------------------------------------------------------------------ */
/* I/O                                                                       */
/* ------------------------------------------------------------------------ */

/* Blocking-style I/O that parks the calling fiber, not its worker.
 *
 * Each call takes the arguments of the system call it is named after and
 * returns what it returns - or a negative errno value instead of -1.  In a
 * fiber it parks until the operation is done: under io_uring the kernel does
 * the operation (submissions are batched per scheduler round); under epoll
 * the call is tried at once and the fiber waits for readiness only on
 * EAGAIN.  On a plain thread (outside any runtime) each call is the plain
 * blocking system call.
 *
 * Every call that waits honours the fiber's deadline (zk_deadline_set):
 * -ETIMEDOUT once it has passed, and cancellation (zk_cancel): -ECANCELED,
 * also for every later call of a cancelled fiber.  Under io_uring a
 * cancelled or timed-out operation is cancelled in the kernel and the fiber
 * resumes only once the kernel has let go of its buffer; if the operation
 * completed anyway, its real result is returned (data is never lost).
 *
 * fds under the epoll backend or the shared poller (enum zk_shared_poll):
 * calls switch an fd to O_NONBLOCK the first time they meet it (remembered
 * per fd number until zk_close), and fds that zk_accept / zk_socket / the
 * helpers below create are non-blocking there.  Close such fds with
 * zk_close, not close(), so a reused fd number is not mistaken for the old
 * one (the shared poller registers each socket once: a number reused
 * behind its back by an fd that did not come from zk_accept or zk_socket
 * would wait for readiness that is never reported; and a blocking fd that
 * reuses the number of one already made non-blocking is taken to be
 * non-blocking too, so a call on it other than the recv and send family
 * (which pass MSG_DONTWAIT) - a zk_read on a pipe, say - can block the
 * worker thread itself).  A fiber parked on an
 * fd that another fiber closes is not woken: shut the socket down
 * (zk_shutdown) or cancel the fiber first.
 *
 * SIGPIPE: zk_send, zk_sendto and zk_sendmsg add MSG_NOSIGNAL, so a peer
 * that went away gives -EPIPE.  zk_write/zk_writev on a socket cannot do
 * that: use zk_send on sockets, or ignore SIGPIPE in the process. */

ZK_API ssize_t zk_read(int fd, void *buf, size_t len);
ZK_API ssize_t zk_write(int fd, const void *buf, size_t len);
ZK_API ssize_t zk_readv(int fd, const struct iovec *iov, int iovcnt);
ZK_API ssize_t zk_writev(int fd, const struct iovec *iov, int iovcnt);
/* Files: under epoll these run on the blocking pool (zk_blocking). */
ZK_API ssize_t zk_pread(int fd, void *buf, size_t len, off_t off);
ZK_API ssize_t zk_pwrite(int fd, const void *buf, size_t len, off_t off);

ZK_API ssize_t zk_recv(int fd, void *buf, size_t len, int flags);
ZK_API ssize_t zk_send(int fd, const void *buf, size_t len, int flags);
ZK_API ssize_t zk_recvmsg(int fd, struct msghdr *msg, int flags);
ZK_API ssize_t zk_sendmsg(int fd, const struct msghdr *msg, int flags);
ZK_API ssize_t zk_recvfrom(int fd, void *buf, size_t len, int flags,
			   struct sockaddr *addr, socklen_t *addrlen);
ZK_API ssize_t zk_sendto(int fd, const void *buf, size_t len, int flags,
			 const struct sockaddr *addr, socklen_t addrlen);

/* accept4(): flags are SOCK_NONBLOCK / SOCK_CLOEXEC.  Returns the new fd. */
ZK_API int zk_accept(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags);
/* Connect; parks until the connection is made or refused (-ECONNREFUSED). */
ZK_API int zk_connect(int fd, const struct sockaddr *addr, socklen_t addrlen);
/* Never parks. */
ZK_API int zk_shutdown(int fd, int how);
ZK_API int zk_close(int fd);
/* socket() with SOCK_CLOEXEC, and SOCK_NONBLOCK under the epoll backend. */
ZK_API int zk_socket(int domain, int type, int protocol);

ZK_API int zk_fsync(int fd);
ZK_API int zk_fdatasync(int fd);
ZK_API int zk_open(const char *path, int flags, mode_t mode);
ZK_API int zk_openat(int dirfd, const char *path, int flags, mode_t mode);

/* Wait until fd (any pollable fd, also one Zokio did not create) is
 * readable / writable, or until deadline_ns (zk_now_ns clock, < 0 for
 * none; the fiber's deadline also applies).  Returns 0, -ETIMEDOUT,
 * -ECANCELED.  On a plain thread this is poll(). */
ZK_API int zk_wait_readable(int fd, int64_t deadline_ns);
ZK_API int zk_wait_writable(int fd, int64_t deadline_ns);

/* ---- per-call timeouts ---- */

/* Each call above that waits for a peer has a _timed twin that takes one
 * more argument: an absolute deadline, deadline_ns (zk_now_ns() clock,
 * < 0 = none), as the *_timed calls of the sync layer do.
 *
 *     int64_t give_up = zk_now_ns() + 2000000000;        // 2 s from now
 *     n = zk_recv_timed(fd, buf, sizeof(buf), 0, give_up);
 *     if (n == -ETIMEDOUT) ...                            // nothing arrived
 *
 * An absolute deadline, not a duration, so that one budget covers a whole
 * exchange: a loop that sends a buffer in pieces or reads a message in
 * parts passes the same give_up to every call.
 *
 *   - The call's deadline and the fiber's (zk_deadline_set) combine: the
 *     earlier wins; either gives -ETIMEDOUT.  Cancellation still gives
 *     -ECANCELED.  Nothing of the deadline outlives the call: no timer
 *     stays armed, and the fiber's own deadline is left as it was.
 *   - The deadline bounds the call as a whole, including the readiness
 *     waits and retries inside it (a connect's wait for the handshake).
 *     A deadline already past still lets the call do what needs no wait
 *     (data that has arrived, room in the send buffer).
 *   - A call that returns -ETIMEDOUT transferred nothing.  Under io_uring
 *     the operation is cancelled in the kernel and the fiber resumes only
 *     once the kernel has let go of the buffer; if the operation completed
 *     anyway, its real result is returned instead, so no data is lost.
 *     After a timed-out zk_connect_timed the socket's state is
 *     unspecified: close it.
 *   - On a plain thread the wait happens in poll(), bounded by the
 *     deadline; the call is then made once the fd is ready.  Socket calls
 *     add MSG_DONTWAIT and zk_connect_timed starts the attempt
 *     non-blocking, so those never wait past the deadline; a plain read,
 *     write or accept on a *blocking* fd that another thread drains
 *     between the poll and the call can still block (use O_NONBLOCK fds
 *     for a hard bound).
 *   - Files (zk_pread, zk_pwrite, zk_fsync, zk_open) have no timed
 *     variants: disk I/O does not wait for a peer, and an operation the
 *     kernel has started on a file is not abandoned half way.
 *   - Helpers that make several calls (zk_tcp_connect: name resolution,
 *     then one connect per address) take no deadline of their own: set the
 *     fiber's (zk_deadline_set) around them, which bounds their connects;
 *     name resolution runs on the blocking pool, which is not interrupted
 *     (see zk_blocking).
 * Fiber or plain thread, like the calls they extend. */
ZK_API ssize_t zk_read_timed(int fd, void *buf, size_t len, int64_t deadline_ns);
ZK_API ssize_t zk_write_timed(int fd, const void *buf, size_t len, int64_t deadline_ns);
ZK_API ssize_t zk_readv_timed(int fd, const struct iovec *iov, int iovcnt, int64_t deadline_ns);
ZK_API ssize_t zk_writev_timed(int fd, const struct iovec *iov, int iovcnt, int64_t deadline_ns);
ZK_API ssize_t zk_recv_timed(int fd, void *buf, size_t len, int flags, int64_t deadline_ns);
ZK_API ssize_t zk_send_timed(int fd, const void *buf, size_t len, int flags, int64_t deadline_ns);
ZK_API ssize_t zk_recvmsg_timed(int fd, struct msghdr *msg, int flags, int64_t deadline_ns);
ZK_API ssize_t zk_sendmsg_timed(int fd, const struct msghdr *msg, int flags, int64_t deadline_ns);
ZK_API ssize_t zk_recvfrom_timed(int fd, void *buf, size_t len, int flags,
				 struct sockaddr *addr, socklen_t *addrlen, int64_t deadline_ns);
ZK_API ssize_t zk_sendto_timed(int fd, const void *buf, size_t len, int flags,
			       const struct sockaddr *addr, socklen_t addrlen, int64_t deadline_ns);
ZK_API int zk_accept_timed(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags,
			   int64_t deadline_ns);
ZK_API int zk_connect_timed(int fd, const struct sockaddr *addr, socklen_t addrlen,
			    int64_t deadline_ns);

/* ---- blocking pool ---- */

/* Run fn(arg) on the runtime's blocking pool, a set of plain threads for
 * work no backend makes asynchronous (name resolution, files under epoll,
 * CPU-heavy or blocking library calls).  The calling fiber parks until fn
 * returns; *result (if not NULL) gets its return value.  fn always runs to
 * the end: cancelling the fiber does not interrupt it (the call then still
 * returns 0).  The pool has at most $ZOKIO_BLOCKING_THREADS threads
 * (default 64); a thread idle for 10 s exits.  On a plain thread fn runs
 * right there.  Returns 0, -ENOMEM or -EAGAIN (no thread could start). */
ZK_API int zk_blocking(void *(*fn)(void *), void *arg, void **result);

/* ---- addresses and sockets ---- */

/* An IPv4, IPv6 or Unix-domain socket address. */
typedef struct zk_addr {
	union {
		struct sockaddr sa;
		struct sockaddr_in in;
		struct sockaddr_in6 in6;
		struct sockaddr_un un;
		struct sockaddr_storage ss;
	} u;
	socklen_t len;
} zk_addr_t;

/* Longest text zk_addr_format writes, with its NUL. */
#define ZK_ADDR_STRLEN 128

/* Parse "1.2.3.4:80", "[::1]:80", "[fe80::1%eth0]:80" or "unix:/path"
 * (numeric only; see zk_addr_resolve for names).  Returns 0 or -EINVAL. */
ZK_API int zk_addr_parse(zk_addr_t *out, const char *text);
/* Format a as zk_addr_parse reads it.  Returns the length, -ENOSPC if
 * size is too small, -EAFNOSUPPORT for another family. */
ZK_API int zk_addr_format(const zk_addr_t *a, char *buf, size_t size);
/* Resolve host (a name or numeric address; NULL = any) and port with
 * getaddrinfo on the blocking pool; the first result is kept.  socktype is
 * SOCK_STREAM or SOCK_DGRAM.  Returns 0, -ENOENT (no such name), -EINVAL. */
ZK_API int zk_addr_resolve(zk_addr_t *out, const char *host, int port, int socktype);

#define ZK_NET_REUSEPORT 1   /* set SO_REUSEPORT (several listeners, one port) */
#define ZK_NET_V6ONLY 2      /* an IPv6 listener that does not take IPv4 */

/* A listening TCP socket on host:port (SO_REUSEADDR always; flags from
 * ZK_NET_*; backlog <= 0 means SOMAXCONN).  host NULL or "" = all IPv4
 * addresses; "::" = all addresses.  Returns the fd or a negative errno. */
ZK_API int zk_tcp_listen(const char *host, int port, int backlog, int flags);
/* Resolve host (blocking pool) and connect to each of its addresses in
 * turn.  Returns the connected fd or the last error. */
ZK_API int zk_tcp_connect(const char *host, int port);
/* UDP socket bound to host:port / connected to host:port. */
ZK_API int zk_udp_bind(const char *host, int port, int flags);
ZK_API int zk_udp_connect(const char *host, int port);
/* Unix-domain stream sockets (an existing socket file is replaced). */
ZK_API int zk_unix_listen(const char *path, int backlog);
ZK_API int zk_unix_connect(const char *path);
/* The same from a parsed address; type is SOCK_STREAM or SOCK_DGRAM. */
ZK_API int zk_listen_addr(const zk_addr_t *a, int type, int backlog, int flags);
ZK_API int zk_connect_addr(const zk_addr_t *a, int type);

/* ------------------------------------------------------------------------ */
/* Observability                                                             */
/* ------------------------------------------------------------------------ */

typedef struct zk_worker_stats {
	uint64_t fibers_run;    /* fibers switched to */
	uint64_t steals;        /* fibers this worker stole from others */
	uint64_t injector_pops; /* fibers taken from the global injector */
	uint64_t parks;         /* times this worker went to sleep */
	uint64_t wakeups;       /* times another thread woke this worker */
} zk_worker_stats_t;

/* Copy up to n workers' counters into stats; returns the number of workers.
 * Any thread; the counters are read without stopping the workers. */
ZK_API int zk_runtime_stats(zk_runtime_t *rt, zk_worker_stats_t *stats, int n);

/* Write one line per live fiber (id, name, state, what it waits on, worker)
 * to fd.  Any thread, best effort while the runtime runs.  Returns the
 * number of fibers listed or a negative errno. */
ZK_API int zk_runtime_dump(zk_runtime_t *rt, int fd);

/* Dump every runtime's fibers to stderr whenever signo (e.g. SIGQUIT) is
 * delivered.  Returns 0 or a negative errno from sigaction. */
ZK_API int zk_dump_on_signal(int signo);

#ifdef __cplusplus
}
#endif
#endif /* ZOKIO_H */
