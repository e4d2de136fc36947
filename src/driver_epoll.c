/*
 * driver_epoll.c - the readiness backend: one epoll set per worker.
 *
 * io.c tries each system call on a non-blocking fd first and submits a
 * ZK__OP_POLL here only after EAGAIN.  Interest is registered one-shot
 * (EPOLLONESHOT) and re-armed per wait: it costs an epoll_ctl per wait, but
 * the set never holds a stale registration that a plain close() and a
 * reused fd number could confuse.  Waiters are kept per fd and direction in
 * a table indexed by fd; several fibers may wait on one fd (acceptors on a
 * shared listener) and are all woken to retry.
 */
#include "config.h"
#include "driver.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define EP__WAKE_TAG UINT64_MAX
#define EP__NETPOLL_TAG (UINT64_MAX - 1)  /* the shared poller's set */
#define EP__EVENTS 256

struct ep_slot {
	struct zk__op *rd, *wr;        /* waiters, linked through op->link */
	uint8_t registered;
};

struct ep {
	int epfd;
	struct ep_slot *slots;
	int nslots;
	int nstash;                    /* events taken by ready(), not yet handled */
	unsigned ready_calls;
	struct epoll_event evs[EP__EVENTS];
};

static int ep_start(struct zk__driver *d)
{
	struct ep *ep = calloc(1, sizeof(*ep));
	if (!ep)
		return -ENOMEM;
	ep->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (ep->epfd < 0) {
		int rc = -errno;
		free(ep);
		return rc;
	}
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = EP__WAKE_TAG };
	struct epoll_event np = { .events = EPOLLIN, .data.u64 = EP__NETPOLL_TAG };
	if (epoll_ctl(ep->epfd, EPOLL_CTL_ADD, d->wake_fd, &ev) != 0 ||
	    (d->np_fd >= 0 && epoll_ctl(ep->epfd, EPOLL_CTL_ADD, d->np_fd, &np) != 0)) {
		int rc = -errno;
		close(ep->epfd);
		free(ep);
		return rc;
	}
	d->impl = ep;
	return 0;
}

static void ep_stop(struct zk__driver *d)
{
	struct ep *ep = d->impl;
	if (!ep)
		return;
	close(ep->epfd);
	free(ep->slots);
	free(ep);
	d->impl = NULL;
}

static struct ep_slot *slot_get(struct ep *ep, int fd)
{
	if (fd >= ep->nslots) {
		int n = ep->nslots ? ep->nslots : 64;
		while (n <= fd)
			n *= 2;
		struct ep_slot *s = realloc(ep->slots, sizeof(*s) * (size_t)n);
		if (!s)
			return NULL;
		memset(s + ep->nslots, 0, sizeof(*s) * (size_t)(n - ep->nslots));
		ep->slots = s;
		ep->nslots = n;
	}
	return &ep->slots[fd];
}

int zk__epoll_set(int epfd, int fd, struct epoll_event *ev, int registered)
{
	int op = registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
	if (epoll_ctl(epfd, op, fd, ev) == 0)
		return 0;
	/* The table and the kernel disagree: the fd was closed and its number
	 * reused, or registered in an earlier life of the slot (a dup of that
	 * file is still open). */
	if (errno == ENOENT)
		op = EPOLL_CTL_ADD;
	else if (errno == EEXIST)
		op = EPOLL_CTL_MOD;
	else
		return -errno;
	return epoll_ctl(epfd, op, fd, ev) == 0 ? 0 : -errno;
}

/* (Re)arm fd for whatever its waiters want. */
static int slot_arm(struct ep *ep, struct ep_slot *s, int fd)
{
	uint32_t want = (s->rd ? EPOLLIN | EPOLLRDHUP : 0) | (s->wr ? EPOLLOUT : 0);
	if (!want)
		return 0;
	struct epoll_event ev = { .events = want | EPOLLONESHOT, .data.u64 = (uint64_t)fd };
	int rc = zk__epoll_set(ep->epfd, fd, &ev, s->registered);
	if (rc == 0)
		s->registered = 1;
	return rc;
}

static void list_remove(struct zk__op **head, struct zk__op *op)
{
	for (struct zk__op **pp = head; *pp; pp = &(*pp)->link) {
		if (*pp == op) {
			*pp = op->link;
			return;
		}
	}
}

static int ep_submit(struct zk__driver *d, struct zk__op *op)
{
	struct ep *ep = d->impl;
	if (op->kind != ZK__OP_POLL || op->fd < 0)
		return -EINVAL;
	struct ep_slot *s = slot_get(ep, op->fd);
	if (!s)
		return -ENOMEM;
	struct zk__op **head = (op->flags & POLLOUT) ? &s->wr : &s->rd;
	op->link = *head;
	*head = op;
	int rc = slot_arm(ep, s, op->fd);
	if (rc) {
		/* EPERM: a regular file or directory, which epoll refuses
		 * because it is always ready; io.c treats that as ready. */
		list_remove(head, op);
	}
	return rc;
}

static void ep_cancel(struct zk__driver *d, struct zk__op *op)
{
	struct ep *ep = d->impl;
	struct ep_slot *s = &ep->slots[op->fd];
	list_remove((op->flags & POLLOUT) ? &s->wr : &s->rd, op);
	/* The registration may stay armed: a spurious event finds no waiter. */
	zk__op_complete(d, op, -ECANCELED);
}

static int wake_all_of(struct zk__driver *d, struct zk__op **head)
{
	int n = 0;
	struct zk__op *op = *head;
	*head = NULL;
	while (op) {
		struct zk__op *next = op->link;
		zk__op_complete(d, op, 0);
		op = next;
		n++;
	}
	return n;
}

static int ep_poll(struct zk__driver *d, int64_t timeout_ns)
{
	struct ep *ep = d->impl;
	int n = ep->nstash;
	ep->nstash = 0;
	if (n == 0) {
		int ms = 0;
		if (timeout_ns < 0)
			ms = -1;
		else if (timeout_ns > 0)
			ms = (int)((timeout_ns + 999999) / 1000000 > 86400000
					   ? 86400000
					   : (timeout_ns + 999999) / 1000000);
		n = epoll_wait(ep->epfd, ep->evs, EP__EVENTS, ms);
		if (n < 0)
			return 0; /* EINTR: the caller looks again */
	}
	/* Last event first: the worker runs the fiber woken last first, so
	 * the fibers run in the order the kernel reported readiness (as in
	 * the io_uring driver's reap). */
	int woken = 0;
	for (int i = n; i-- > 0;) {
		uint64_t tag = ep->evs[i].data.u64;
		uint32_t e = ep->evs[i].events;
		if (tag == EP__WAKE_TAG) {
			uint64_t v;
			ssize_t r = read(d->wake_fd, &v, sizeof(v));
			(void)r;
			continue;
		}
		if (tag == EP__NETPOLL_TAG) {
			d->np_fired = 1; /* level-triggered: io.c harvests */
			continue;
		}
		int fd = (int)tag;
		if (fd >= ep->nslots)
			continue;
		struct ep_slot *s = &ep->slots[fd];
		if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
			woken += wake_all_of(d, &s->rd);
		if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR))
			woken += wake_all_of(d, &s->wr);
		/* One-shot: whoever still waits needs the fd armed again. */
		if (s->rd || s->wr) {
			int rc = slot_arm(ep, s, fd);
			if (rc) {
				woken += wake_all_of(d, &s->rd);
				woken += wake_all_of(d, &s->wr);
			}
		}
	}
	return woken;
}

/* Readiness cannot be seen from user space: look with a zero-timeout
 * epoll_wait, and keep what it found for the next poll().  Only when some
 * fiber waits here. */
static int ep_ready(struct zk__driver *d)
{
	struct ep *ep = d->impl;
	/* a spinner calls this every ~0.1 us: look on every 16th call */
	if (ep->nstash == 0 && d->nops > 0 && (++ep->ready_calls & 15) == 0) {
		int n = epoll_wait(ep->epfd, ep->evs, EP__EVENTS, 0);
		ep->nstash = n > 0 ? n : 0;
	}
	return ep->nstash > 0;
}

static void ep_wake(struct zk__driver *d)
{
	uint64_t one = 1;
	ssize_t r = write(d->wake_fd, &one, sizeof(one));
	(void)r;
}

const struct zk__driver_vt zk__driver_epoll = {
	.name = "epoll",
	.completion = 0,
	.start = ep_start,
	.stop = ep_stop,
	.submit = ep_submit,
	.cancel = ep_cancel,
	.poll = ep_poll,
	.wake = ep_wake,
	.ready = ep_ready,
};
