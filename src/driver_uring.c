/*
 * driver_uring.c - the completion backend: one io_uring per worker.
 *
 * submit() only fills a submission entry whose user data is the op record
 * (on the waiting fiber's stack); nothing reaches the kernel until poll(),
 * which the scheduler calls when the worker runs out of runnable fibers and
 * every few dozen ticks, so one io_uring_enter carries a whole round of
 * submissions.  poll() with a timeout is also where an idle worker sleeps:
 * io_uring_submit_and_wait_timeout, bounded by the next deadline, woken
 * early by a read that is always pending on the driver's eventfd.
 *
 * Setup flags are probed, best first: SINGLE_ISSUER + DEFER_TASKRUN (the
 * ring is only ever touched by its worker thread, which is why start() runs
 * on that thread), then COOP_TASKRUN, then nothing.
 *
 * Cancellation: an op is cancelled with IORING_OP_ASYNC_CANCEL, but its
 * fiber stays parked until the op's own completion arrives: until then the
 * kernel may still write into the op's buffer, which lives on that fiber's
 * stack.
 */
#include "config.h"
#include "driver.h"
#include "sanitize.h"

#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define UR__ENTRIES 256
#define UR__CQ_ENTRIES 4096
#define UR__REAP_MAX 128
#define UR__TAG_IGNORE 0  /* completions of cancel requests */
#define UR__TAG_WAKE 1    /* the eventfd read */
#define UR__TAG_NETPOLL 2 /* the shared poller's set became readable */

struct ur {
	struct io_uring ring;
	uint64_t wake_buf;
	unsigned setup_flags;
};

/* TASKRUN_FLAG: the kernel raises IORING_SQ_TASKRUN when completion work
 * is waiting for us to enter the ring (always so under DEFER_TASKRUN), so
 * ready() and poll(0) can tell from user space whether entering would
 * find anything. */
static const unsigned setup_flag_sets[] = {
	IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL |
		IORING_SETUP_TASKRUN_FLAG,
	IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL |
		IORING_SETUP_TASKRUN_FLAG,
	IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
	IORING_SETUP_COOP_TASKRUN,
	0,
};

/* Set up ring with the best flags this kernel accepts. */
static int ring_setup(struct io_uring *ring, unsigned *used)
{
	int rc = -EINVAL;
	for (size_t i = 0; i < sizeof(setup_flag_sets) / sizeof(setup_flag_sets[0]); i++) {
		struct io_uring_params p;
		memset(&p, 0, sizeof(p));
		p.flags = setup_flag_sets[i] | IORING_SETUP_CQSIZE;
		p.cq_entries = UR__CQ_ENTRIES;
		rc = io_uring_queue_init_params(UR__ENTRIES, ring, &p);
		if (rc == 0) {
			*used = setup_flag_sets[i];
			return 0;
		}
		if (rc != -EINVAL)
			return rc; /* refused outright: no point trying fewer flags */
	}
	return rc;
}

int zk__uring_probe(void)
{
	struct io_uring ring;
	unsigned used;
	int rc = ring_setup(&ring, &used);
	if (rc == 0)
		io_uring_queue_exit(&ring);
	return rc;
}

/* A free submission entry; when the queue is full, push it to the kernel
 * first (the only submission that does not wait for the end of a round). */
static struct io_uring_sqe *sqe_get(struct ur *ur)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ur->ring);
	if (!sqe) {
		io_uring_submit(&ur->ring);
		sqe = io_uring_get_sqe(&ur->ring);
	}
	return sqe;
}

static int arm_wake(struct zk__driver *d, struct ur *ur)
{
	struct io_uring_sqe *sqe = sqe_get(ur);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_read(sqe, d->wake_fd, &ur->wake_buf, sizeof(ur->wake_buf), 0);
	io_uring_sqe_set_data64(sqe, UR__TAG_WAKE);
	return 0;
}

/* One-shot, armed for a wait the scheduler wants watched (d->np_watch)
 * and left in place until it completes: at most one completion per
 * harvest, however many sockets became ready. */
static int arm_netpoll(struct zk__driver *d, struct ur *ur)
{
	if (d->np_fd < 0 || d->np_armed)
		return 0;
	struct io_uring_sqe *sqe = sqe_get(ur);
	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, d->np_fd, POLLIN);
	io_uring_sqe_set_data64(sqe, UR__TAG_NETPOLL);
	d->np_armed = 1;
	return 0;
}

static int ring_lifetimes; /* a ThreadSanitizer sync object, see ur_start */

static int ur_start(struct zk__driver *d)
{
	struct ur *ur = calloc(1, sizeof(*ur));
	if (!ur)
		return -ENOMEM;
	int rc = ring_setup(&ur->ring, &ur->setup_flags);
	if (rc) {
		free(ur);
		return rc;
	}
	/* liburing maps the rings with raw syscalls, which ThreadSanitizer
	 * does not see: a new ring may reuse an old ring's addresses, whose
	 * shadow still holds the old owner thread's accesses.  Order every
	 * ring's life after every earlier one's end. */
	zk__tsan_acquire(&ring_lifetimes);
	/* Enter through a registered ring fd: no file lookup per
	 * io_uring_enter (kernels without it just say no). */
	io_uring_register_ring_fd(&ur->ring);
	arm_wake(d, ur);
	d->impl = ur;
	return 0;
}

static void ur_stop(struct zk__driver *d)
{
	struct ur *ur = d->impl;
	if (!ur)
		return;
	/* Every fiber has ended, so only the eventfd read (and the shared
	 * poller's poll) is still in flight; tearing the ring down cancels it. */
	zk__tsan_release(&ring_lifetimes);
	io_uring_queue_exit(&ur->ring);
	free(ur);
	d->impl = NULL;
}

static int ur_submit(struct zk__driver *d, struct zk__op *op)
{
	struct ur *ur = d->impl;
	struct io_uring_sqe *sqe = sqe_get(ur);
	if (!sqe)
		return -EBUSY;
	switch (op->kind) {
	case ZK__OP_POLL:
		io_uring_prep_poll_add(sqe, op->fd, (unsigned)op->flags);
		break;
	case ZK__OP_READ:
		io_uring_prep_read(sqe, op->fd, op->buf, (unsigned)op->len, (uint64_t)op->off);
		break;
	case ZK__OP_WRITE:
		io_uring_prep_write(sqe, op->fd, op->buf, (unsigned)op->len, (uint64_t)op->off);
		break;
	case ZK__OP_READV:
		io_uring_prep_readv(sqe, op->fd, op->iov, (unsigned)op->iovcnt, (uint64_t)op->off);
		break;
	case ZK__OP_WRITEV:
		io_uring_prep_writev(sqe, op->fd, op->iov, (unsigned)op->iovcnt, (uint64_t)op->off);
		break;
	case ZK__OP_RECV:
		io_uring_prep_recv(sqe, op->fd, op->buf, op->len, op->flags);
		break;
	case ZK__OP_SEND:
		io_uring_prep_send(sqe, op->fd, op->buf, op->len, op->flags);
		break;
	case ZK__OP_RECVMSG:
		io_uring_prep_recvmsg(sqe, op->fd, op->msg, (unsigned)op->flags);
		break;
	case ZK__OP_SENDMSG:
		io_uring_prep_sendmsg(sqe, op->fd, op->msg, (unsigned)op->flags);
		break;
	case ZK__OP_ACCEPT:
		io_uring_prep_accept(sqe, op->fd, op->addr, op->addrlenp, op->flags);
		break;
	case ZK__OP_CONNECT:
		io_uring_prep_connect(sqe, op->fd, op->addr, op->addrlen);
		break;
	case ZK__OP_CLOSE:
		io_uring_prep_close(sqe, op->fd);
		break;
	case ZK__OP_FSYNC:
		io_uring_prep_fsync(sqe, op->fd, op->flags ? IORING_FSYNC_DATASYNC : 0);
		break;
	case ZK__OP_OPENAT:
		io_uring_prep_openat(sqe, op->fd, op->path, op->flags, op->mode);
		break;
	default:
		/* Give the entry back as a no-op that nobody waits for. */
		io_uring_prep_nop(sqe);
		io_uring_sqe_set_data64(sqe, UR__TAG_IGNORE);
		return -EINVAL;
	}
	io_uring_sqe_set_data(sqe, op);
	return 0;
}

static void ur_cancel(struct zk__driver *d, struct zk__op *op)
{
	struct ur *ur = d->impl;
	struct io_uring_sqe *sqe = sqe_get(ur);
	if (!sqe) {
		/* No entry even after a submit: the next poll's scan tries
		 * again (it also picks up an op whose deadline passed). */
		op->cancelling = 0;
		atomic_store_explicit(&d->cancel_pending, 1, memory_order_relaxed);
		return;
	}
	io_uring_prep_cancel(sqe, op, 0);
	io_uring_sqe_set_data64(sqe, UR__TAG_IGNORE);
}

/* Complete what the completion queue holds, but at most UR__REAP_MAX ops:
 * the woken fibers go to the worker's deque (256 slots), and the rest wait,
 * in order, for the next poll.
 *
 * The worker runs the last fiber woken first (the LIFO slot, then the
 * deque's bottom), so the ops are completed newest first: the fibers then
 * run in the order their completions arrived, and the one that has waited
 * longest is served first (a request's tail latency, not its mean). */
static int reap(struct zk__driver *d, struct ur *ur)
{
	struct io_uring_cqe *cqe;
	struct zk__op *ops[UR__REAP_MAX];
	int res[UR__REAP_MAX];
	unsigned head, seen = 0;
	int n = 0, rearm = 0;
	io_uring_for_each_cqe(&ur->ring, head, cqe) {
		if (n == UR__REAP_MAX)
			break;
		seen++;
		uint64_t tag = io_uring_cqe_get_data64(cqe);
		if (tag == UR__TAG_IGNORE)
			continue;
		if (tag == UR__TAG_WAKE) {
			rearm = 1;
			continue;
		}
		if (tag == UR__TAG_NETPOLL) {
			d->np_fired = 1; /* io.c harvests after this reap */
			d->np_armed = 0;
			continue;
		}
		ops[n] = (struct zk__op *)(uintptr_t)tag;
		__builtin_prefetch(ops[n], 1);
		res[n++] = cqe->res;
	}
	io_uring_cq_advance(&ur->ring, seen);
	/* Each op lives on a parked fiber's stack, likely out of the cache
	 * by now: its line was requested above, and the next op's fiber
	 * record is requested while this one completes. */
	for (int i = n; i-- > 0;) {
		if (i > 0)
			__builtin_prefetch(ops[i - 1]->fiber, 1);
		zk__op_complete(d, ops[i], res[i]);
	}
	if (rearm)
		arm_wake(d, ur);
	return n;
}

/* Completion work is waiting for us in the kernel: with DEFER_TASKRUN (or
 * COOP_TASKRUN) finished ops are only posted when we enter the ring. */
static inline int taskrun_pending(const struct ur *ur)
{
	return (ur->setup_flags & IORING_SETUP_TASKRUN_FLAG) &&
	       (IO_URING_READ_ONCE(*ur->ring.sq.kflags) & IORING_SQ_TASKRUN);
}

static int ur_ready(struct zk__driver *d)
{
	struct ur *ur = d->impl;
	return io_uring_cq_ready(&ur->ring) || taskrun_pending(ur);
}

static int ur_poll(struct zk__driver *d, int64_t timeout_ns)
{
	struct ur *ur = d->impl;
	if (timeout_ns == 0) {
		/* Submit, and let deferred completions be posted; without
		 * TASKRUN_FLAG we cannot tell whether any are waiting. */
		if (io_uring_sq_ready(&ur->ring) || taskrun_pending(ur) ||
		    (!(ur->setup_flags & IORING_SETUP_TASKRUN_FLAG) &&
		     ((ur->setup_flags & IORING_SETUP_DEFER_TASKRUN) || !io_uring_cq_ready(&ur->ring))))
			io_uring_submit_and_get_events(&ur->ring);
	} else if (io_uring_cq_ready(&ur->ring)) {
		if (io_uring_sq_ready(&ur->ring))
			io_uring_submit(&ur->ring);
	} else {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {
			.tv_sec = timeout_ns / 1000000000,
			.tv_nsec = timeout_ns % 1000000000,
		};
		if (d->np_watch)
			arm_netpoll(d, ur);
		io_uring_submit_and_wait_timeout(&ur->ring, &cqe, 1, timeout_ns > 0 ? &ts : NULL, NULL);
	}
	return reap(d, ur);
}

static void ur_flush(struct zk__driver *d)
{
	struct ur *ur = d->impl;
	if (d->np_watch)
		arm_netpoll(d, ur);
	if (io_uring_sq_ready(&ur->ring))
		io_uring_submit(&ur->ring);
}

static void ur_wake(struct zk__driver *d)
{
	uint64_t one = 1;
	ssize_t r = write(d->wake_fd, &one, sizeof(one));
	(void)r;
}

const struct zk__driver_vt zk__driver_uring = {
	.name = "io_uring",
	.completion = 1,
	.start = ur_start,
	.stop = ur_stop,
	.submit = ur_submit,
	.cancel = ur_cancel,
	.poll = ur_poll,
	.flush = ur_flush,
	.wake = ur_wake,
	.ready = ur_ready,
};
