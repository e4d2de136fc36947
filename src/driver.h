/*
 * driver.h - the one internal interface between the I/O layer (io.c) and an
 * operating-system event backend.  One file per backend, same shape:
 * driver_uring.c (io_uring), driver_epoll.c (epoll); kqueue and IOCP fit the
 * same mould later.
 *
 * Two kinds of backend hide behind it:
 *   completion-based (io_uring, IOCP): submit() hands the whole operation to
 *     the kernel; its result arrives later;
 *   readiness-based (epoll, kqueue): the I/O layer first tries the system
 *     call itself; only on EAGAIN does it submit() a ZK__OP_POLL op, whose
 *     "result" is that the fd became ready, and then retries.
 * vt->completion tells io.c which of the two it talks to.
 *
 * Ownership.  Each worker owns one driver, and only that worker's thread
 * ever touches the backend state (ring / epoll set, fd table) and the list
 * of operations in flight.  An op record lives on the stack of the fiber
 * that waits for it; the fiber parks right after submitting it and is
 * resumed only by zk__op_complete(), on the owning worker, once the backend
 * is done with the op (for io_uring: once its completion has arrived - the
 * kernel may still write into the op's buffer until then).
 *
 * Cancellation and deadlines go through the owner too.  zk_cancel(), from
 * any thread, only raises d->cancel_pending and wakes the driver (the cancel
 * hook below); the owner then scans its ops and asks the backend to cancel
 * those whose fiber is cancelled or whose deadline has passed.  The backend
 * completes them (epoll at once, io_uring when the kernel says so), and
 * io.c turns the result into -ECANCELED or -ETIMEDOUT.  A deadline is a
 * timer armed on the owner's heap: it fires on the owner, which cancels the
 * op the same way.
 */
#ifndef ZK_DRIVER_H
#define ZK_DRIVER_H

#include "config.h"
#include "fiber.h"
#include "timer.h"

#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

struct zk__worker;
struct zk__driver;

enum zk__op_kind {
	ZK__OP_POLL,     /* wait for poll events (flags) on fd: readiness */
	ZK__OP_READ,     /* buf, len, off (-1: file position) */
	ZK__OP_WRITE,
	ZK__OP_READV,    /* iov, iovcnt, off */
	ZK__OP_WRITEV,
	ZK__OP_RECV,     /* buf, len, flags */
	ZK__OP_SEND,
	ZK__OP_RECVMSG,  /* msg, flags */
	ZK__OP_SENDMSG,
	ZK__OP_ACCEPT,   /* addr, addrlenp, flags (accept4) */
	ZK__OP_CONNECT,  /* addr, addrlen */
	ZK__OP_CLOSE,
	ZK__OP_FSYNC,    /* flags: 1 = fdatasync */
	ZK__OP_OPENAT,   /* fd = dirfd, path, flags, mode */
};

/* One operation in flight; lives on the waiting fiber's stack.  Kept
 * small, with the timer last: a completion, and the fiber's resume after
 * it, touch every line of it on a stack that is usually out of the cache
 * by then.  op_init (io.c) clears everything but the timer, which
 * zk__timer_init sets up when a deadline arms it (timer_armed). */
struct zk__op {
	zk_fiber_t *fiber;
	struct zk__driver *driver;     /* the driver it was submitted to */
	struct zk__op *next, *prev;    /* driver's in-flight list (owner only) */
	struct zk__op *link;           /* the backend's own list (owner only) */
	int64_t deadline;              /* zk__now() clock; ZK__NO_DEADLINE = none */
	int kind;
	int fd;
	int flags;
	int res;                       /* result, set before the fiber is woken */
	uint8_t cancelling;            /* backend was asked to cancel it */
	uint8_t timed_out;             /* ... because its deadline passed */
	uint8_t done;                  /* zk__op_complete ran (owner only) */
	uint8_t timer_armed;
	int64_t off;                   /* < 0: the file position */
	union {                        /* the arguments of its kind */
		struct {               /* read, write, recv, send */
			void *buf;
			size_t len;
		};
		struct {               /* readv, writev */
			const struct iovec *iov;
			int iovcnt;
		};
		struct msghdr *msg;    /* recvmsg, sendmsg */
		struct {               /* accept (addrlenp), connect (addrlen) */
			struct sockaddr *addr;
			socklen_t addrlen;
			socklen_t *addrlenp;
		};
		struct {               /* openat */
			const char *path;
			unsigned mode;
		};
	};
	struct zk__timer timer;        /* armed on the owner while deadline is set */
};

/* The backend's half.  Every function but wake() runs on the owner thread. */
struct zk__driver_vt {
	const char *name;
	int completion;  /* 1: completion-based; 0: readiness-based */
	/* Create the backend state; called on the worker thread that will own
	 * it, when the worker starts (io_uring's SINGLE_ISSUER ties a ring to
	 * the thread that creates it). */
	int (*start)(struct zk__driver *d);
	void (*stop)(struct zk__driver *d);
	/* Start op (readiness backends accept only ZK__OP_POLL).  Returns 0 or
	 * a negative errno (the op was not started). */
	int (*submit)(struct zk__driver *d, struct zk__op *op);
	/* Ask for op to end early; it still completes through
	 * zk__op_complete, now or later. */
	void (*cancel)(struct zk__driver *d, struct zk__op *op);
	/* Push out batched submissions, then complete whatever is ready;
	 * block up to timeout_ns first when timeout_ns != 0 (< 0: no limit)
	 * unless something is ready or wake() was called.  Returns the number
	 * of ops completed. */
	int (*poll)(struct zk__driver *d, int64_t timeout_ns);
	/* Push out batched submissions without looking for completions.
	 * NULL: nothing is batched (epoll). */
	void (*flush)(struct zk__driver *d);
	/* Make a blocked poll() return.  Any thread. */
	void (*wake)(struct zk__driver *d);
	/* Nonzero when poll(d, 0) would complete an op, known without a
	 * system call (0 when the backend cannot tell that cheaply).  Lets a
	 * spinning worker notice its own completions.  NULL: never known. */
	int (*ready)(struct zk__driver *d);
};

/* What zk_cancel() calls for a fiber parked in I/O (see fiber.h). */
struct zk__cancel_hook {
	void (*fn)(struct zk__cancel_hook *h);
};

struct zk__driver {
	const struct zk__driver_vt *vt;
	struct zk__worker *w;
	void *impl;                    /* backend state, between start and stop */
	int wake_fd;                   /* eventfd; lives as long as the runtime */
	struct zk__cancel_hook hook;
	_Atomic int cancel_pending;    /* some fiber parked here was cancelled */
	struct zk__op *ops;            /* in flight (owner only) */
	long nops;
	int np_fd;                     /* the shared poller's fd to watch, or -1 */
	uint8_t np_fired;              /* the backend saw np_fd readable */
	/* Completion backends watch np_fd only when the scheduler asks, in a
	 * wait or a flush (np_watch: the worker holds rt->np_holder), and
	 * harvest the set directly in every poll that does not wait;
	 * np_armed: the one-shot watch is in the ring, until it completes.
	 * Readiness backends keep np_fd in their set and ignore both. */
	uint8_t np_watch, np_armed;
	unsigned ticks;                /* zk__driver_tick calls since the last poll */
	int64_t polled_at;             /* zk__now() of the first tick since then */
};

extern const struct zk__driver_vt zk__driver_epoll;
/* Add fd to the epoll set epfd, or modify it if registered, with *ev;
 * recovers when the caller's idea of "registered" is stale (the fd was
 * closed and its number reused).  0 or -errno.  For the two epoll-based
 * files, driver_epoll.c and driver_netpoll.c. */
struct epoll_event;
int zk__epoll_set(int epfd, int fd, struct epoll_event *ev, int registered);
#ifdef HAVE_LIBURING
extern const struct zk__driver_vt zk__driver_uring;
/* 0 if an io_uring can be set up here, else the negative errno. */
int zk__uring_probe(void);
#endif

/* ---- the shared readiness poller (driver_netpoll.c) --------------------- */

/* With two or more workers (zk_runtime_opts.shared_poll), sockets wait for
 * readiness in one epoll set per runtime that any worker may harvest, so a
 * worker the kernel has preempted does not hold up its connections.  Each
 * worker's backend watches the set's fd (d->np_fd) and sets d->np_fired
 * when it is readable; zk__driver_poll then harvests. */
struct zk__netpoll;
int zk__netpoll_create(struct zk__netpoll **out);
void zk__netpoll_destroy(struct zk__netpoll *np);
int zk__netpoll_fd(const struct zk__netpoll *np);
/* In a fiber: park until fd is ready for events (POLLIN or POLLOUT), the
 * deadline (and the fiber's own) passes, or zk_cancel.  0, -ETIMEDOUT,
 * -ECANCELED, -ERANGE (fd too large for the table: use the worker's own
 * driver) or the -errno of the registration (-EPERM: a regular file). */
int zk__netpoll_wait(struct zk__netpoll *np, int fd, int events, int64_t deadline);
/* Any worker: wake the fibers of every fd that is ready now.  Returns how
 * many were woken (onto the calling worker). */
int zk__netpoll_harvest(struct zk__netpoll *np);
/* fd was just created through Zokio (flags ZK__NP_OURS: it is closed with
 * zk_close, so it may be registered once; ZK__NP_STREAM: a stream socket,
 * whose short read proves it drained), or is about to be closed (flags 0):
 * what every poller remembers of the number is for its old life.  Any
 * thread. */
#define ZK__NP_OURS 1
#define ZK__NP_STREAM 2
#define ZK__NP_FLAGS 3
void zk__netpoll_reborn(int fd, int flags);
/* The ZK__NP_* flags of fd's current life. */
int zk__netpoll_flags(int fd);

/* ---- the common half (io.c) ------------------------------------------- */

/* Per worker, for the runtime's life: the eventfd and the cancel hook. */
int zk__driver_init(struct zk__driver *d, struct zk__worker *w, const struct zk__driver_vt *vt);
void zk__driver_fini(struct zk__driver *d);
/* On the worker thread, around its loop. */
int zk__driver_start(struct zk__driver *d);
void zk__driver_stop(struct zk__driver *d);
/* Handle pending cancellations, then vt->poll() (timeout_ns as there).
 * Op deadlines are timers on the owner's heap (timer.h) whose expiry asks
 * the backend to cancel.  Returns the number of fibers woken. */
int zk__driver_poll(struct zk__driver *d, int64_t timeout_ns);
void zk__driver_wake(struct zk__driver *d);
/* For a busy worker, once per fairness round: push out batched
 * submissions; poll for completions only every ZK__DRIVER_REAP_TICKS-th
 * time or once ZK__DRIVER_REAP_NS have passed.  A worker reaps when it runs
 * out of runnable fibers, so completions run in the order they arrived,
 * batch after batch; reaping on every round would put the newest batch on
 * top of the LIFO deque, ahead of fibers woken earlier, and a steady stream
 * of new completions would starve those (a 1000-connection echo showed a
 * 5x worse p99).  The periodic poll only guarantees that I/O is not
 * starved by fibers that never stop running. */
#define ZK__DRIVER_REAP_TICKS 16
#define ZK__DRIVER_REAP_NS 5000000
void zk__driver_tick(struct zk__driver *d);
/* vt->flush() if the backend batches submissions (owner only). */
static inline void zk__driver_flush(struct zk__driver *d)
{
	if (d->impl && d->vt->flush)
		d->vt->flush(d);
}
/* vt->ready(), for the owner: completions are waiting to be reaped. */
static inline int zk__driver_ready(struct zk__driver *d)
{
	return d->impl && d->vt->ready && d->vt->ready(d);
}

/* Called by backends: op is finished with result res; wakes its fiber. */
void zk__op_complete(struct zk__driver *d, struct zk__op *op, int res);

/* The runtime's backend choice: vt for opts->backend / $ZOKIO_BACKEND, or a
 * negative errno (-EINVAL for an unknown name, -ENOSYS for io_uring asked
 * for explicitly but refused). */
int zk__driver_select(int backend, const struct zk__driver_vt **vt);

#endif
