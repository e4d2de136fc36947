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
} zk_runtime_opts_t;

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
 * they have all ended.  Any thread. */
ZK_API void zk_runtime_shutdown(zk_runtime_t *rt);

/* Free a runtime that is not running.  Fibers that were spawned but never
 * started are discarded (their records freed, their functions never run).
 * Returns 0, or -EBUSY while zk_runtime_run() is in progress. */
ZK_API int zk_runtime_destroy(zk_runtime_t *rt);

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

/* Wait for f to end and release the handle.  Parks a fiber, blocks a plain
 * thread.  *result (if not NULL) gets the fiber's return value (or the value
 * given to zk_exit).  Returns 0; -EDEADLK when a fiber joins itself; -EAGAIN
 * or -ENOMEM if f could never start because no stack could be mapped for it;
 * -ECANCELED if f was cancelled before it first ran (it never ran). */
ZK_API int zk_join(zk_fiber_t *f, void **result);

/* Release the handle without waiting; the fiber's record is freed when it
 * ends.  Any thread.  Returns 0 or -EINVAL for NULL. */
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

/* ------------------------------------------------------------------------ */
/* Cancellation                                                              */
/* ------------------------------------------------------------------------ */

/* Request cancellation of f: if it is parked in a cancellable wait it wakes
 * and that call returns -ECANCELED; later cancellable calls in it return
 * -ECANCELED until it ends.  A fiber that never started will not start.
 * Any thread.  Returns 0 or -EINVAL. */
ZK_API int zk_cancel(zk_fiber_t *f);

/* 1 if cancellation of the calling fiber was requested, else 0. */
ZK_API int zk_cancelled(void);

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
