/*
 * io.c - the blocking-style I/O API and the common half of the drivers.
 *
 * One call, e.g. zk_recv() in a fiber on worker W (DESIGN.md, "The path of
 * one call"):
 *   io_uring: an op record on the fiber's stack describes the call; the
 *     fiber parks, and the publish step (run on W after the fiber's
 *     registers are saved) queues the op on W's ring.  W flushes its ring
 *     once per round; the completion stores the result and unparks the
 *     fiber (op_complete), which returns it.
 *   epoll: the call is made at once on the non-blocking fd; on EAGAIN a
 *     readiness op is parked on instead, and the call is retried.
 * On a plain thread each call is the blocking system call itself.
 *
 * Cancellation and deadlines never wake an I/O-parked fiber directly:
 * zk_cancel() goes through the driver's cancel hook and a deadline is a
 * timer fired by the owning worker; both make the owner ask the backend to
 * cancel, and the fiber resumes through op_complete like any other time.
 */
#include "config.h"
#include "driver.h"
#include "msghdr.h"
#include "scheduler.h"
#include "sanitize.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- the common half of the drivers ------------------------------------ */

static void cancel_hook_fn(struct zk__cancel_hook *h)
{
	struct zk__driver *d = (struct zk__driver *)((char *)h - offsetof(struct zk__driver, hook));
	atomic_store_explicit(&d->cancel_pending, 1, memory_order_seq_cst);
	zk__driver_wake(d);
}

int zk__driver_init(struct zk__driver *d, struct zk__worker *w, const struct zk__driver_vt *vt)
{
	memset(d, 0, sizeof(*d));
	d->vt = vt;
	d->w = w;
	d->hook.fn = cancel_hook_fn;
	d->np_fd = w->rt->netpoll ? zk__netpoll_fd(w->rt->netpoll) : -1;
	d->wake_fd = eventfd(0, EFD_CLOEXEC);
	return d->wake_fd < 0 ? -errno : 0;
}

void zk__driver_fini(struct zk__driver *d)
{
	if (d->wake_fd >= 0)
		close(d->wake_fd);
	d->wake_fd = -1;
}

int zk__driver_start(struct zk__driver *d)
{
	int rc = d->vt->start(d);
	if (rc && d->vt != &zk__driver_epoll) {
		fprintf(stderr, "zokio: worker %d: %s setup failed (%s); using epoll\n", d->w->index,
			d->vt->name, strerror(-rc));
		d->vt = &zk__driver_epoll;
		rc = d->vt->start(d);
	}
	/* Without a backend the worker still sleeps and wakes on its eventfd
	 * (zk__driver_poll), and I/O calls block the thread. */
	return rc;
}

void zk__driver_stop(struct zk__driver *d)
{
	if (d->impl)
		d->vt->stop(d);
	d->vt = d->w->rt->driver_vt;
}

void zk__driver_wake(struct zk__driver *d)
{
	uint64_t one = 1;
	ssize_t r = write(d->wake_fd, &one, sizeof(one));
	(void)r;
}

/* Ask the backend to cancel every op of a cancelled fiber, and every op
 * whose deadline passed but whose cancel the backend could not start then
 * (see ur_cancel).  Returns the number of ops that completed at once
 * (readiness backends). */
static int cancel_scan(struct zk__driver *d)
{
	long before = d->nops;
	struct zk__op *op = d->ops;
	while (op) {
		struct zk__op *next = op->next; /* epoll completes (unlinks) at once */
		if (!op->cancelling &&
		    (op->timed_out || atomic_load_explicit(&op->fiber->cancel, memory_order_relaxed))) {
			op->cancelling = 1;
			d->vt->cancel(d, op);
		}
		op = next;
	}
	return (int)(before - d->nops);
}

/* Sleep on the eventfd alone: a worker whose backend could not start. */
static int bare_wait(struct zk__driver *d, int64_t timeout_ns)
{
	struct pollfd p = { .fd = d->wake_fd, .events = POLLIN };
	int ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
	if (poll(&p, 1, ms) == 1) {
		uint64_t v;
		ssize_t r = read(d->wake_fd, &v, sizeof(v));
		(void)r;
	}
	return 0;
}

int zk__driver_poll(struct zk__driver *d, int64_t timeout_ns)
{
	if (!d->impl)
		return timeout_ns ? bare_wait(d, timeout_ns) : 0;
	d->ticks = 0;
	int woken = 0;
	if (atomic_load_explicit(&d->cancel_pending, memory_order_relaxed) &&
	    atomic_exchange_explicit(&d->cancel_pending, 0, memory_order_seq_cst))
		woken = cancel_scan(d);
	/* Fibers just made runnable must not wait behind a blocking wait, nor
	 * a cancel the scan could not start yet (the poll makes room). */
	int retry = atomic_load_explicit(&d->cancel_pending, memory_order_relaxed);
	woken += d->vt->poll(d, woken || retry ? 0 : timeout_ns);
	/* The shared poller (driver.h): a completion backend's watch fired
	 * (its holder lets go), or it has none in the ring and this poll does
	 * not wait, i.e. the worker is busy or about to look for work: look
	 * at the set directly. */
	int harvest = d->np_fired;
	if (d->np_fired) {
		d->np_fired = 0;
		if (d->vt->completion)
			zk__token_release(&d->w->rt->np_holder, d->w);
	} else if (timeout_ns == 0 && d->np_fd >= 0 && d->vt->completion && !d->np_armed) {
		harvest = 1;
	}
	if (harvest)
		woken += zk__netpoll_harvest(d->w->rt->netpoll);
	return woken;
}

void zk__driver_tick(struct zk__driver *d)
{
	if (!d->impl)
		return;
	/* the clock is read once per tick, i.e. every ~60 picks */
	int64_t now = zk__now();
	if (d->ticks++ == 0)
		d->polled_at = now;
	if (d->ticks >= ZK__DRIVER_REAP_TICKS || now - d->polled_at >= ZK__DRIVER_REAP_NS ||
	    atomic_load_explicit(&d->cancel_pending, memory_order_relaxed))
		zk__driver_poll(d, 0);
	else if (d->vt->flush)
		d->vt->flush(d);
}

#define ZK__RESUME_PREFETCH 1024 /* bytes of stack, at most */

void zk__op_complete(struct zk__driver *d, struct zk__op *op, int res)
{
	if (op->prev)
		op->prev->next = op->next;
	else
		d->ops = op->next;
	if (op->next)
		op->next->prev = op->prev;
	d->nops--;
	op->res = res;
	op->done = 1;
	/* The fiber will resume through the frames between its saved
	 * context and just past op, its caller's return address (a few
	 * hundred bytes of its stack): start loading them now, while other
	 * fibers run first. */
	uintptr_t sp = (uintptr_t)op->fiber->ctx, top = (uintptr_t)(op + 1) + 16;
	if (top > sp + ZK__RESUME_PREFETCH) /* not the stack we think it is */
		top = sp + ZK__RESUME_PREFETCH;
	for (uintptr_t p = sp; p < top; p += 64)
		__builtin_prefetch((const void *)p);
	/* op lives on the fiber's stack: after this it may be gone. */
	zk__unpark(op->fiber, 0);
}

static const char *backend_env(void)
{
	const char *e = getenv("ZOKIO_BACKEND");
	return e && *e ? e : NULL;
}

int zk__driver_select(int backend, const struct zk__driver_vt **vt)
{
	if (backend == ZK_BACKEND_AUTO) {
		const char *e = backend_env();
		if (!e || !strcmp(e, "auto"))
			backend = ZK_BACKEND_AUTO;
		else if (!strcmp(e, "io_uring") || !strcmp(e, "uring"))
			backend = ZK_BACKEND_IO_URING;
		else if (!strcmp(e, "epoll"))
			backend = ZK_BACKEND_EPOLL;
		else
			return -EINVAL;
	}
	switch (backend) {
	case ZK_BACKEND_EPOLL:
		*vt = &zk__driver_epoll;
		return 0;
	case ZK_BACKEND_IO_URING:
#ifdef HAVE_LIBURING
		if (zk__uring_probe() == 0) {
			*vt = &zk__driver_uring;
			return 0;
		}
#endif
		return -ENOSYS;
	case ZK_BACKEND_AUTO: {
#ifdef HAVE_LIBURING
		/* Probe once per process with a real ring: seccomp, sysctl and
		 * memlock limits only show when a ring is actually set up. */
		static _Atomic int probed; /* 0 unknown, 1 yes, -errno no */
		int p = atomic_load(&probed);
		if (p == 0) {
			int rc = zk__uring_probe();
			p = rc == 0 ? 1 : rc;
			int expected = 0;
			if (atomic_compare_exchange_strong(&probed, &expected, p) && p < 0)
				fprintf(stderr, "zokio: io_uring unavailable (io_uring_setup: %s); "
						"using epoll\n", strerror(-p));
		}
		*vt = p == 1 ? &zk__driver_uring : &zk__driver_epoll;
#else
		*vt = &zk__driver_epoll;
#endif
		return 0;
	}
	default:
		return -EINVAL;
	}
}

/* ---- parking on an op ---------------------------------------------------- */

static void op_timer_fn(struct zk__timer *t)
{
	struct zk__op *op = t->arg;
	/* Runs on the owner, like completions: no race with op_complete. */
	if (op->done || op->cancelling)
		return;
	op->timed_out = 1;
	op->cancelling = 1;
	op->driver->vt->cancel(op->driver, op);
}

/* Runs on the owner right after the fiber's registers are saved. */
static int op_publish(zk_fiber_t *self, void *arg)
{
	struct zk__op *op = arg;
	struct zk__driver *d = op->driver;
	op->prev = NULL;
	op->next = d->ops;
	if (d->ops)
		d->ops->prev = op;
	d->ops = op;
	d->nops++;
	int rc = d->vt->submit(d, op);
	if (rc < 0) {
		op->done = 1;
		if (op->next)
			op->next->prev = NULL;
		d->ops = op->next;
		d->nops--;
		op->res = rc;
		return 1; /* resume at once */
	}
	if (op->deadline != ZK__NO_DEADLINE) {
		zk__timer_init(&op->timer, op_timer_fn, NULL, op);
		op->timer_armed = zk__timer_arm(&d->w->timers, &op->timer, op->deadline) == 0;
	}
	/* Only this thread touches op from here on: the completion, the
	 * timer and the cancel scan all run on the owner, and a zk_cancel
	 * from elsewhere only calls the driver's hook.  A zk_cancel that
	 * found the fiber not yet PARKED is answered by after_switch, which
	 * reads the flag once the fiber counts as PARKED. */
	zk__park_commit(self);
	return 0;
}

static const char *op_name(int kind)
{
	switch (kind) {
	case ZK__OP_POLL: return "io: poll";
	case ZK__OP_READ: return "io: read";
	case ZK__OP_WRITE: return "io: write";
	case ZK__OP_READV: return "io: readv";
	case ZK__OP_WRITEV: return "io: writev";
	case ZK__OP_RECV: return "io: recv";
	case ZK__OP_SEND: return "io: send";
	case ZK__OP_RECVMSG: return "io: recvmsg";
	case ZK__OP_SENDMSG: return "io: sendmsg";
	case ZK__OP_ACCEPT: return "io: accept";
	case ZK__OP_CONNECT: return "io: connect";
	case ZK__OP_CLOSE: return "io: close";
	case ZK__OP_FSYNC: return "io: fsync";
	case ZK__OP_OPENAT: return "io: openat";
	default: return "io";
	}
}

/* Submit op to the calling worker's driver and park until it completes. */
static int op_wait(struct zk__worker *w, struct zk__op *op)
{
	zk_fiber_t *self = w->current;
	op->fiber = self;
	op->driver = &w->driver;
	op->res = 0;
	op->cancelling = op->timed_out = op->done = op->timer_armed = 0;
	atomic_store_explicit(&self->cancel_hook, &w->driver.hook, memory_order_relaxed);
	zk__park(op_name(op->kind), op_publish, op, ZK__PARK_PUBLISH_LAST);
	atomic_store_explicit(&self->cancel_hook, NULL, memory_order_relaxed);
	if (op->timer_armed)
		zk__timer_disarm(&op->timer);
	int res = op->res;
	if (op->cancelling && (res == -ECANCELED || res == -EINTR))
		res = op->timed_out ? -ETIMEDOUT : -ECANCELED;
	return res;
}

/* The fiber's worker, if I/O should go through a driver; NULL on a plain
 * thread (or a worker whose backend could not start). */
static struct zk__worker *io_worker(void)
{
	struct zk__worker *w = zk__worker_self();
	if (!w || !w->current || !w->driver.impl)
		return NULL;
	return w;
}

/* ---- non-blocking fds under epoll ---------------------------------------- */

#define NB_FDS 65536
static _Atomic uint64_t nb_known[NB_FDS / 64];

static void nb_remember(int fd)
{
	if (fd >= 0 && fd < NB_FDS)
		atomic_fetch_or_explicit(&nb_known[fd / 64], 1ull << (fd % 64), memory_order_relaxed);
}

/* Readiness path: fds whose last read came back short, so were drained
 * then; the next read waits for readiness before it tries (a hint: wrong,
 * it costs one wait that fires at once). */
static _Atomic uint8_t rd_drained[NB_FDS];

static void nb_forget(int fd)
{
	if (fd >= 0 && fd < NB_FDS) {
		atomic_fetch_and_explicit(&nb_known[fd / 64], ~(1ull << (fd % 64)), memory_order_relaxed);
		atomic_store_explicit(&rd_drained[fd], 0, memory_order_relaxed);
	}
}

static int nb_ensure(int fd)
{
	if (fd >= 0 && fd < NB_FDS &&
	    (atomic_load_explicit(&nb_known[fd / 64], memory_order_relaxed) >> (fd % 64)) & 1)
		return 0;
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		return -errno;
	if (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	nb_remember(fd);
	return 0;
}

/* ---- the system calls themselves ----------------------------------------- */

static int poll_dir(int kind)
{
	switch (kind) {
	case ZK__OP_WRITE:
	case ZK__OP_WRITEV:
	case ZK__OP_SEND:
	case ZK__OP_SENDMSG:
	case ZK__OP_CONNECT:
		return POLLOUT;
	default:
		return POLLIN;
	}
}

/* recv and send without libc's wrappers: those are thread-cancellation
 * points, and switching asynchronous cancellation on and off around each
 * call cost ~3% of an echo server's CPU.  Fibers are never cancelled that
 * way.  ThreadSanitizer builds keep the wrappers: its interceptors are
 * what order a send on one thread before the receive on another. */
static inline ssize_t sys_recv(int fd, void *buf, size_t len, int flags)
{
#ifdef ZK_TSAN
	return recv(fd, buf, len, flags);
#else
	return syscall(SYS_recvfrom, fd, buf, len, flags, NULL, NULL);
#endif
}

static inline ssize_t sys_send(int fd, const void *buf, size_t len, int flags)
{
#ifdef ZK_TSAN
	return send(fd, buf, len, flags);
#else
	return syscall(SYS_sendto, fd, buf, len, flags, NULL, 0);
#endif
}

/* Make the call described by op right now; extra_flags go to the msg
 * flags of socket calls (MSG_DONTWAIT under epoll).  Returns the result or
 * -errno, read right after the call on the same thread. */
static ssize_t op_syscall(struct zk__op *op, int extra_flags)
{
	ssize_t r;
	switch (op->kind) {
	case ZK__OP_READ:
		r = op->off < 0 ? read(op->fd, op->buf, op->len) : pread(op->fd, op->buf, op->len, op->off);
		break;
	case ZK__OP_WRITE:
		r = op->off < 0 ? write(op->fd, op->buf, op->len) : pwrite(op->fd, op->buf, op->len, op->off);
		break;
	case ZK__OP_READV:
		r = op->off < 0 ? readv(op->fd, op->iov, op->iovcnt) : preadv(op->fd, op->iov, op->iovcnt, op->off);
		break;
	case ZK__OP_WRITEV:
		r = op->off < 0 ? writev(op->fd, op->iov, op->iovcnt)
				: pwritev(op->fd, op->iov, op->iovcnt, op->off);
		break;
	case ZK__OP_RECV:
		r = sys_recv(op->fd, op->buf, op->len, op->flags | extra_flags);
		break;
	case ZK__OP_SEND:
		r = sys_send(op->fd, op->buf, op->len, op->flags | extra_flags);
		break;
	case ZK__OP_RECVMSG:
		r = recvmsg(op->fd, op->msg, op->flags | extra_flags);
		break;
	case ZK__OP_SENDMSG:
		r = sendmsg(op->fd, op->msg, op->flags | extra_flags);
		break;
	case ZK__OP_ACCEPT:
		r = accept4(op->fd, op->addr, op->addrlenp, op->flags);
		break;
	case ZK__OP_CONNECT:
		r = connect(op->fd, op->addr, op->addrlen);
		break;
	case ZK__OP_CLOSE:
		r = close(op->fd);
		break;
	case ZK__OP_FSYNC:
		r = op->flags ? fdatasync(op->fd) : fsync(op->fd);
		break;
	case ZK__OP_OPENAT:
		r = openat(op->fd, op->path, op->flags, (mode_t)op->mode);
		break;
	default:
		return -EINVAL;
	}
	return r < 0 ? -errno : r;
}

static int64_t ms_until(int64_t deadline)
{
	if (deadline == ZK__NO_DEADLINE)
		return -1;
	int64_t left = deadline - zk__now();
	return left <= 0 ? 0 : (left + 999999) / 1000000;
}

/* poll() for a plain thread.  0, -ETIMEDOUT or -errno. */
static int poll_thread(int fd, int events, int64_t deadline)
{
	for (;;) {
		int64_t ms = ms_until(deadline);
		struct pollfd p = { .fd = fd, .events = (short)events };
		int n = poll(&p, 1, ms > INT32_MAX ? INT32_MAX : (int)ms);
		if (n > 0)
			return 0;
		if (n == 0 && ms >= 0 && ms_until(deadline) == 0)
			return -ETIMEDOUT;
		if (n < 0 && errno != EINTR)
			return -errno;
	}
}

/* The outcome of a non-blocking connect that has become writable. */
static int connect_outcome(int fd)
{
	int err = 0;
	socklen_t len = sizeof(err);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		return -errno;
	return -err;
}

/* A plain thread: the blocking call (waiting in poll if the fd happens to
 * be non-blocking). */
static ssize_t op_thread(struct zk__op *op)
{
	for (;;) {
		ssize_t r = op_syscall(op, 0);
		if (r == -EINTR)
			continue;
		if (op->kind == ZK__OP_CONNECT && r == -EINPROGRESS) {
			int rc = poll_thread(op->fd, POLLOUT, ZK__NO_DEADLINE);
			return rc ? rc : connect_outcome(op->fd);
		}
		if (r != -EAGAIN && r != -EWOULDBLOCK)
			return r;
		int rc = poll_thread(op->fd, poll_dir(op->kind), op->deadline);
		if (rc)
			return rc;
	}
}

/* A plain thread's connect with a deadline: a blocking connect() cannot be
 * bounded, so the attempt is started with the socket switched to
 * non-blocking (the connection proceeds in the kernel whatever the flag
 * says afterwards) and waited for in poll(). */
static int connect_thread_timed(struct zk__op *op)
{
	int fl = fcntl(op->fd, F_GETFL);
	if (fl < 0)
		return -errno;
	if (!(fl & O_NONBLOCK) && fcntl(op->fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	ssize_t r = op_syscall(op, 0);
	if (!(fl & O_NONBLOCK))
		fcntl(op->fd, F_SETFL, fl);
	if (r != -EINPROGRESS && r != -EINTR)
		return (int)r;
	int rc = poll_thread(op->fd, POLLOUT, op->deadline);
	return rc ? rc : connect_outcome(op->fd);
}

/* A plain thread's call with its own deadline: the waiting happens in
 * poll(), bounded by the deadline, and the call is made once the fd is
 * ready - socket calls with MSG_DONTWAIT, so they never block.  A plain
 * read, write or accept on a blocking fd that another thread drains
 * between the poll and the call can still block (zokio.h says so). */
static ssize_t op_thread_timed(struct zk__op *op)
{
	if (op->kind == ZK__OP_CONNECT)
		return connect_thread_timed(op);
	int is_sock = op->kind == ZK__OP_RECV || op->kind == ZK__OP_SEND ||
		      op->kind == ZK__OP_RECVMSG || op->kind == ZK__OP_SENDMSG;
	for (;;) {
		int rc = poll_thread(op->fd, poll_dir(op->kind), op->deadline);
		if (rc)
			return rc;
		ssize_t r = op_syscall(op, is_sock ? MSG_DONTWAIT : 0);
		if (r != -EAGAIN && r != -EWOULDBLOCK && r != -EINTR)
			return r;
	}
}

/* A fresh op of kind on fd: no deadline, the file position, the timer
 * left for a deadline to set up (driver.h). */
static void op_init(struct zk__op *op, int kind, int fd)
{
	memset(op, 0, offsetof(struct zk__op, timer));
	op->kind = kind;
	op->fd = fd;
	op->off = -1;
	op->deadline = ZK__NO_DEADLINE;
}

/* Park until fd is ready for events (a POLL op).  0 or -errno. */
static int wait_ready(int fd, int events, int64_t deadline)
{
	struct zk__worker *w = io_worker();
	if (!w)
		return poll_thread(fd, events, deadline);
	if (w->rt->netpoll) {
		int rc = zk__netpoll_wait(w->rt->netpoll, fd, events, deadline);
		if (rc != -ERANGE)
			return rc == -EPERM ? 0 : rc; /* EPERM: a regular file, always ready */
	}
	struct zk__op op;
	op_init(&op, ZK__OP_POLL, fd);
	op.flags = events;
	op.deadline = deadline;
	int rc = op_wait(w, &op);
	if (rc == -EPERM) /* epoll refuses regular files: they are always ready */
		return 0;
	return rc < 0 ? rc : 0;
}

static void *op_on_pool(void *arg)
{
	return (void *)(intptr_t)op_thread(arg);
}

/* A connect that said EINPROGRESS: wait, then read its outcome. */
static int connect_finish(int fd, int64_t deadline)
{
	int rc = wait_ready(fd, POLLOUT, deadline);
	return rc ? rc : connect_outcome(fd);
}

/* Readiness path: try, wait on EAGAIN, try again.  With the worker's own
 * (level-triggered, one-shot) epoll set, a read (or recv) that came back
 * short drained the fd, so the next one on it - typically the next request
 * of a connection, not there yet - waits for readiness before it tries: a
 * ping-pong then costs epoll_ctl + epoll_wait + read + write, not also a
 * read that says EAGAIN.  The shared poller is edge-triggered: there a
 * short read proves the fd drained only for a stream socket, and only
 * because the poller keeps a hang-up for good (data and the end of the
 * stream may come with one edge); two datagrams may too, so every other
 * fd's read tries first (use_hint 0). */
static ssize_t op_readiness(struct zk__op *op, int use_hint)
{
	int is_sock = op->kind == ZK__OP_RECV || op->kind == ZK__OP_SEND ||
		      op->kind == ZK__OP_RECVMSG || op->kind == ZK__OP_SENDMSG;
	if (!is_sock) {
		int rc = nb_ensure(op->fd);
		if (rc)
			return rc;
	}
	if (op->kind == ZK__OP_ACCEPT)
		op->flags |= SOCK_NONBLOCK;
	_Atomic uint8_t *drained = NULL;
	if (use_hint && (op->kind == ZK__OP_RECV || op->kind == ZK__OP_READ) &&
	    !(op->flags & MSG_PEEK) &&
	    op->fd >= 0 && op->fd < NB_FDS && op->len > 0) {
		drained = &rd_drained[op->fd];
		/* Not past a deadline: the call must still take what has come. */
		if (atomic_load_explicit(drained, memory_order_relaxed) &&
		    (op->deadline == ZK__NO_DEADLINE || op->deadline > zk__now())) {
			atomic_store_explicit(drained, 0, memory_order_relaxed);
			int rc = wait_ready(op->fd, POLLIN, op->deadline);
			if (rc)
				return rc;
		}
	}
	for (;;) {
		ssize_t r = op_syscall(op, is_sock ? MSG_DONTWAIT : 0);
		if (drained && r > 0 && (size_t)r < op->len)
			atomic_store_explicit(drained, 1, memory_order_relaxed);
		if (op->kind == ZK__OP_ACCEPT && r >= 0)
			nb_remember((int)r);
		if (op->kind == ZK__OP_CONNECT && r == -EINPROGRESS)
			return connect_finish(op->fd, op->deadline);
		if (r == -EINTR)
			continue;
		if (r != -EAGAIN && r != -EWOULDBLOCK)
			return r;
		int rc = wait_ready(op->fd, poll_dir(op->kind), op->deadline);
		if (rc)
			return rc;
	}
}

/* Completion path: the kernel does the call.  An fd that is O_NONBLOCK
 * makes io_uring report EAGAIN instead of waiting: wait for readiness and
 * submit again. */
static ssize_t op_completion(struct zk__worker *w, struct zk__op *op)
{
	for (;;) {
		int r = op_wait(w, op);
		if (op->kind == ZK__OP_CONNECT && (r == -EINPROGRESS || r == -EALREADY))
			return connect_finish(op->fd, op->deadline);
		if (r != -EAGAIN || op->kind == ZK__OP_POLL)
			return r;
		int rc = wait_ready(op->fd, poll_dir(op->kind), op->deadline);
		if (rc)
			return rc;
		w = io_worker(); /* the fiber may have moved */
		if (!w)
			return op_thread(op);
	}
}

/* io_uring: calls that usually succeed at once are first made directly,
 * without waiting: an accept on a listener made non-blocking here, as
 * under epoll (io_uring itself ignores O_NONBLOCK on sockets and waits),
 * so a burst of waiting connections is accepted in one go instead of one
 * per round; and a socket send (MSG_DONTWAIT; the send buffer almost always
 * has room) when no other fiber waits to run.  Then one plain system call
 * replaces a trip through the ring: a submission entry, a completion, a
 * park and a resume, and nothing else would share the ring's entry.  With
 * other fibers to run, the send joins the round's batch instead: one
 * io_uring_enter carries the sends of many fibers, which at 1000 echo
 * connections saves ~0.25 us of system time per round trip.
 * Returns -EAGAIN when the call has to go through the ring after all
 * (receives do so at once: their data is rarely there yet). */
static ssize_t op_try_first(struct zk__worker *w, struct zk__op *op)
{
	ssize_t r;
	switch (op->kind) {
	case ZK__OP_SEND:
	case ZK__OP_SENDMSG:
		if (zk__worker_has_queued(w))
			return -EAGAIN;
		r = op_syscall(op, MSG_DONTWAIT);
		break;
	case ZK__OP_ACCEPT:
		if (nb_ensure(op->fd))
			return -EAGAIN;
		r = op_syscall(op, 0);
		break;
	default:
		return -EAGAIN;
	}
	if (r == -EWOULDBLOCK || r == -EINTR)
		return -EAGAIN;
	return r;
}

/* Calls only sockets take: under the shared poller they wait for
 * readiness there and are then made directly, whatever the backend. */
static int is_socket_call(int kind)
{
	switch (kind) {
	case ZK__OP_RECV:
	case ZK__OP_SEND:
	case ZK__OP_RECVMSG:
	case ZK__OP_SENDMSG:
	case ZK__OP_ACCEPT:
	case ZK__OP_CONNECT:
		return 1;
	default:
		return 0;
	}
}

/* Run one call described by op (deadline: the call's own, or
 * ZK__NO_DEADLINE). */
static ssize_t op_run(struct zk__op *op)
{
	struct zk__worker *w = io_worker();
	if (!w)
		return op->deadline == ZK__NO_DEADLINE ? op_thread(op) : op_thread_timed(op);
	if (atomic_load_explicit(&w->current->cancel, memory_order_relaxed))
		return -ECANCELED;
	op->deadline = zk__effective_deadline(op->deadline);
	int hint = w->rt->netpoll == NULL || (zk__netpoll_flags(op->fd) & ZK__NP_STREAM);
	if (w->rt->netpoll && is_socket_call(op->kind))
		return op_readiness(op, hint);
	if (w->driver.vt->completion) {
		ssize_t r = op_try_first(w, op);
		if (r != -EAGAIN)
			return r;
		return op_completion(w, op);
	}
	switch (op->kind) {
	case ZK__OP_CLOSE:
		return op_syscall(op, 0);
	case ZK__OP_OPENAT:
	case ZK__OP_FSYNC: {
		void *res;
		int rc = zk_blocking(op_on_pool, op, &res);
		return rc ? rc : (ssize_t)(intptr_t)res;
	}
	case ZK__OP_READ:
	case ZK__OP_WRITE:
	case ZK__OP_READV:
	case ZK__OP_WRITEV:
		if (op->off >= 0) { /* positioned: a file, which epoll cannot wait for */
			void *res;
			int rc = zk_blocking(op_on_pool, op, &res);
			return rc ? rc : (ssize_t)(intptr_t)res;
		}
		return op_readiness(op, hint);
	default:
		return op_readiness(op, hint);
	}
}

/* ---- the public calls ---------------------------------------------------- */

/* A public deadline (< 0: none) as an op's. */
static int64_t call_deadline(int64_t deadline_ns)
{
	return deadline_ns < 0 ? ZK__NO_DEADLINE : deadline_ns;
}

static ssize_t rw(int kind, int fd, void *buf, size_t len, int64_t off, int64_t deadline)
{
	struct zk__op op;
	op_init(&op, kind, fd);
	op.buf = buf;
	op.len = len;
	op.off = off;
	op.deadline = deadline;
	return op_run(&op);
}

ssize_t zk_read(int fd, void *buf, size_t len)
{
	return rw(ZK__OP_READ, fd, buf, len, -1, ZK__NO_DEADLINE);
}

ssize_t zk_read_timed(int fd, void *buf, size_t len, int64_t deadline_ns)
{
	return rw(ZK__OP_READ, fd, buf, len, -1, call_deadline(deadline_ns));
}

ssize_t zk_write(int fd, const void *buf, size_t len)
{
	return rw(ZK__OP_WRITE, fd, (void *)buf, len, -1, ZK__NO_DEADLINE);
}

ssize_t zk_write_timed(int fd, const void *buf, size_t len, int64_t deadline_ns)
{
	return rw(ZK__OP_WRITE, fd, (void *)buf, len, -1, call_deadline(deadline_ns));
}

ssize_t zk_pread(int fd, void *buf, size_t len, off_t off)
{
	if (off < 0)
		return -EINVAL;
	return rw(ZK__OP_READ, fd, buf, len, off, ZK__NO_DEADLINE);
}

ssize_t zk_pwrite(int fd, const void *buf, size_t len, off_t off)
{
	if (off < 0)
		return -EINVAL;
	return rw(ZK__OP_WRITE, fd, (void *)buf, len, off, ZK__NO_DEADLINE);
}

static ssize_t rwv(int kind, int fd, const struct iovec *iov, int iovcnt, int64_t deadline)
{
	struct zk__op op;
	op_init(&op, kind, fd);
	op.iov = iov;
	op.iovcnt = iovcnt;
	op.deadline = deadline;
	return op_run(&op);
}

ssize_t zk_readv(int fd, const struct iovec *iov, int iovcnt)
{
	return rwv(ZK__OP_READV, fd, iov, iovcnt, ZK__NO_DEADLINE);
}

ssize_t zk_readv_timed(int fd, const struct iovec *iov, int iovcnt, int64_t deadline_ns)
{
	return rwv(ZK__OP_READV, fd, iov, iovcnt, call_deadline(deadline_ns));
}

ssize_t zk_writev(int fd, const struct iovec *iov, int iovcnt)
{
	return rwv(ZK__OP_WRITEV, fd, iov, iovcnt, ZK__NO_DEADLINE);
}

ssize_t zk_writev_timed(int fd, const struct iovec *iov, int iovcnt, int64_t deadline_ns)
{
	return rwv(ZK__OP_WRITEV, fd, iov, iovcnt, call_deadline(deadline_ns));
}

ssize_t zk_recv_timed(int fd, void *buf, size_t len, int flags, int64_t deadline_ns)
{
	struct zk__op op;
	op_init(&op, ZK__OP_RECV, fd);
	op.buf = buf;
	op.len = len;
	op.flags = flags;
	op.deadline = call_deadline(deadline_ns);
	return op_run(&op);
}

ssize_t zk_recv(int fd, void *buf, size_t len, int flags)
{
	return zk_recv_timed(fd, buf, len, flags, -1);
}

ssize_t zk_send_timed(int fd, const void *buf, size_t len, int flags, int64_t deadline_ns)
{
	struct zk__op op;
	op_init(&op, ZK__OP_SEND, fd);
	op.buf = (void *)buf;
	op.len = len;
	op.flags = flags | MSG_NOSIGNAL;
	op.deadline = call_deadline(deadline_ns);
	return op_run(&op);
}

ssize_t zk_send(int fd, const void *buf, size_t len, int flags)
{
	return zk_send_timed(fd, buf, len, flags, -1);
}

ssize_t zk_recvmsg_timed(int fd, struct msghdr *msg, int flags, int64_t deadline_ns)
{
	struct zk__op op;
	op_init(&op, ZK__OP_RECVMSG, fd);
	op.msg = msg;
	op.flags = flags;
	op.deadline = call_deadline(deadline_ns);
	return op_run(&op);
}

ssize_t zk_recvmsg(int fd, struct msghdr *msg, int flags)
{
	return zk_recvmsg_timed(fd, msg, flags, -1);
}

ssize_t zk_sendmsg_timed(int fd, const struct msghdr *msg, int flags, int64_t deadline_ns)
{
	struct zk__op op;
	op_init(&op, ZK__OP_SENDMSG, fd);
	op.msg = (struct msghdr *)msg;
	op.flags = flags | MSG_NOSIGNAL;
	op.deadline = call_deadline(deadline_ns);
	return op_run(&op);
}

ssize_t zk_sendmsg(int fd, const struct msghdr *msg, int flags)
{
	return zk_sendmsg_timed(fd, msg, flags, -1);
}

ssize_t zk_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
		    socklen_t *addrlen)
{
	struct iovec iov;
	struct msghdr msg;
	zk__msghdr_one(&msg, &iov, buf, len, addrlen ? addr : NULL, addrlen ? *addrlen : 0);
	ssize_t r = zk_recvmsg(fd, &msg, flags);
	if (r >= 0 && addr && addrlen)
		*addrlen = msg.msg_namelen;
	return r;
}

ssize_t zk_recvfrom_timed(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
			  socklen_t *addrlen, int64_t deadline_ns)
{
	struct iovec iov = { buf, len };
	struct msghdr msg;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	if (addr && addrlen) {
		msg.msg_name = addr;
		msg.msg_namelen = *addrlen;
	}
	ssize_t r = zk_recvmsg_timed(fd, &msg, flags, deadline_ns);
	if (r >= 0 && addr && addrlen)
		*addrlen = msg.msg_namelen;
	return r;
}

ssize_t zk_sendto_timed(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
			socklen_t addrlen, int64_t deadline_ns)
{
	struct iovec iov = { (void *)buf, len };
	struct msghdr msg;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_name = (void *)addr;
	msg.msg_namelen = addr ? addrlen : 0;
	return zk_sendmsg_timed(fd, &msg, flags, deadline_ns);
}

ssize_t zk_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
		  socklen_t addrlen)
{
	return zk_sendto_timed(fd, buf, len, flags, addr, addrlen, -1);
}

int zk_accept_timed(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags,
		    int64_t deadline_ns)
{
	if (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC))
		return -EINVAL;
	struct zk__op op;
	op_init(&op, ZK__OP_ACCEPT, fd);
	op.addr = addr;
	op.addrlenp = addrlen;
	op.flags = flags;
	op.deadline = call_deadline(deadline_ns);
	int nfd = (int)op_run(&op);
	/* a new life for the number (no-op if < 0), of the listener's kind */
	zk__netpoll_reborn(nfd, ZK__NP_OURS | (zk__netpoll_flags(fd) & ZK__NP_STREAM));
	return nfd;
}

int zk_accept(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
	return zk_accept_timed(fd, addr, addrlen, flags, -1);
}

int zk_connect_timed(int fd, const struct sockaddr *addr, socklen_t addrlen, int64_t deadline_ns)
{
	struct zk__op op;
	op_init(&op, ZK__OP_CONNECT, fd);
	op.addr = (struct sockaddr *)addr;
	op.addrlen = addrlen;
	op.deadline = call_deadline(deadline_ns);
	return (int)op_run(&op);
}

int zk_connect(int fd, const struct sockaddr *addr, socklen_t addrlen)
{
	return zk_connect_timed(fd, addr, addrlen, -1);
}

int zk_shutdown(int fd, int how)
{
	return shutdown(fd, how) < 0 ? -errno : 0;
}

int zk_close(int fd)
{
	if (fd < 0)
		return -EBADF;
	/* Forget before the number can be handed out again. */
	nb_forget(fd);
	zk__netpoll_reborn(fd, 0);
	struct zk__op op;
	op_init(&op, ZK__OP_CLOSE, fd);
	struct zk__worker *w = io_worker();
	if (w && w->driver.vt->completion)
		return op_wait(w, &op); /* not cancellable: the fd must end up closed */
	int r = close(fd);
	return r < 0 && errno != EINTR ? -errno : 0;
}

int zk_socket(int domain, int type, int protocol)
{
	struct zk__worker *w = io_worker();
	int nb = w && !w->driver.vt->completion ? SOCK_NONBLOCK : 0;
	int fd = socket(domain, type | SOCK_CLOEXEC | nb, protocol);
	if (fd < 0)
		return -errno;
	if (nb || (type & SOCK_NONBLOCK))
		nb_remember(fd);
	zk__netpoll_reborn(fd, ZK__NP_OURS | ((type & 0xf) == SOCK_STREAM ? ZK__NP_STREAM : 0));
	return fd;
}

static int sync_op(int kind, int fd, int flags)
{
	struct zk__op op;
	op_init(&op, kind, fd);
	op.flags = flags;
	return (int)op_run(&op);
}

int zk_fsync(int fd)
{
	return sync_op(ZK__OP_FSYNC, fd, 0);
}

int zk_fdatasync(int fd)
{
	return sync_op(ZK__OP_FSYNC, fd, 1);
}

int zk_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	if (!path)
		return -EFAULT;
	struct zk__op op;
	op_init(&op, ZK__OP_OPENAT, dirfd);
	op.path = path;
	op.flags = flags | O_CLOEXEC;
	op.mode = mode;
	return (int)op_run(&op);
}

int zk_open(const char *path, int flags, mode_t mode)
{
	return zk_openat(AT_FDCWD, path, flags, mode);
}

static int wait_fd(int fd, int events, int64_t deadline_ns)
{
	if (fd < 0)
		return -EBADF;
	struct zk__worker *w = io_worker();
	if (w && atomic_load_explicit(&w->current->cancel, memory_order_relaxed))
		return -ECANCELED;
	int64_t d = zk__effective_deadline(deadline_ns);
	if (d != ZK__NO_DEADLINE && d <= zk__now()) {
		struct pollfd p = { .fd = fd, .events = (short)events };
		return poll(&p, 1, 0) == 1 ? 0 : -ETIMEDOUT;
	}
	return wait_ready(fd, events, d);
}

int zk_wait_readable(int fd, int64_t deadline_ns)
{
	return wait_fd(fd, POLLIN, deadline_ns);
}

int zk_wait_writable(int fd, int64_t deadline_ns)
{
	return wait_fd(fd, POLLOUT, deadline_ns);
}
