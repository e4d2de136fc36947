/*
 * driver_netpoll.c - the shared readiness poller: one epoll set per
 * runtime, which any worker may harvest.
 *
 * Why.  A worker's own driver can complete only that worker's operations:
 * an io_uring posts a socket's completion from the submitting thread (under
 * DEFER_TASKRUN only when that thread enters the ring), and a per-worker
 * epoll set is waited on by its worker alone.  When the kernel preempts a
 * worker that has work - on a machine where the load shares its CPUs - the
 * fibers waiting in its driver wait with it, for a whole scheduler tick
 * (4 ms at HZ=250), while the other workers may be idle.  With two or more
 * workers, sockets therefore wait for readiness here instead: the fiber
 * registers its fd in the shared set and parks; whichever worker next looks
 * wakes it onto its own queue.  A busy worker looks whenever it reaps; a
 * sleeping one is woken through its own driver, which watches this set's
 * fd - under io_uring only one sleeper at a time does, and others look in
 * on a worker that stops making progress (scheduler.c, worker_sleep).
 * The call itself is then made directly, as under epoll.  Go's netpoller
 * and Tokio's I/O driver share readiness the same way.
 *
 * Registration comes in two kinds, chosen per life of an fd number.
 *   Once, edge-triggered: for sockets born through Zokio (zk_socket,
 *   zk_accept), until zk_close - the rule zokio.h sets, since a plain
 *   close() lets the number be reused behind our back.  A wait then costs
 *   no epoll_ctl.  An edge that finds no waiter of its direction is kept as
 *   a ready bit, which the next wait in that direction consumes instead of
 *   parking, so an edge that comes between a call's EAGAIN and its wait is
 *   never lost (a bit left over from before the call costs one retry that
 *   says EAGAIN again).  A hang-up or error is kept for good: a stream
 *   socket's reader skips the EAGAIN read after a short one (io.c), so the
 *   end of the stream, which may come with the same edge as the last data,
 *   must not be waited for again.
 *   One-shot, re-armed per wait: for every other fd (zk_wait_readable on a
 *   foreign fd, the hook library's waits), whose number may be closed and
 *   reused without our knowing.  One epoll_ctl per wait, and the set never
 *   holds a registration we would trust wrongly (as in driver_epoll.c).
 * Waiters are kept per fd and direction, in a table indexed by fd, each
 * slot under its own lock (a lock shared by several fds would let a worker
 * preempted while holding it stall the others' harvests).  A waiter lives
 * on its fiber's stack and is parked cancellably with the fiber's deadline
 * (zk__park_until): no kernel operation is in flight, so a timeout or a
 * cancel may wake it directly.  The lock makes that safe: a harvester
 * unlinks a waiter and unparks its fiber while holding it, and a fiber
 * woken any other way unlinks itself under it before it returns.  So a
 * harvester never touches a waiter that is gone, nor wakes a fiber that
 * has moved on to another park.
 */
#include "config.h"
#include "driver.h"
#include "scheduler.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define NP__PAGE_SHIFT 12
#define NP__PAGE (1 << NP__PAGE_SHIFT)
#define NP__PAGES 256                          /* fds below 1M */
#define NP__MAX_FD (NP__PAGE * NP__PAGES)
#define NP__EVENTS 64

struct np_waiter {
	zk_fiber_t *fiber;
	struct np_waiter *next;
	int fd;
	int events;                    /* POLLIN or POLLOUT */
	int err;                       /* registration failed: -errno */
	int linked;                    /* on its slot's list (under the lock) */
};

struct np_slot {
	pthread_mutex_t lock;
	struct np_waiter *rd, *wr;
	uint32_t gen;                  /* the fd's life (fd_gen) it describes */
	uint8_t edge;                  /* that life registers once, edge-triggered */
	uint8_t registered;            /* in the epoll set in that life */
	uint8_t rd_ready, wr_ready;    /* edge: an edge came while nobody waited */
	uint8_t rd_end, wr_end;        /* edge: hang-up or error seen: ready for good */
};

/* Lives of fd numbers, process-wide (every runtime's poller looks):
 * zk__netpoll_reborn starts a new one; the low bits are its ZK__NP_*
 * flags, the rest counts lives. */
static _Atomic uint32_t fd_gen[NP__MAX_FD];

struct zk__netpoll {
	int epfd;
	_Atomic(struct np_slot *) pages[NP__PAGES];
};

int zk__netpoll_create(struct zk__netpoll **out)
{
	struct zk__netpoll *np = calloc(1, sizeof(*np));
	if (!np)
		return -ENOMEM;
	np->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (np->epfd < 0) {
		int rc = -errno;
		free(np);
		return rc;
	}
	*out = np;
	return 0;
}

void zk__netpoll_destroy(struct zk__netpoll *np)
{
	if (!np)
		return;
	close(np->epfd);
	for (int i = 0; i < NP__PAGES; i++) {
		struct np_slot *page = atomic_load_explicit(&np->pages[i], memory_order_relaxed);
		for (int j = 0; page && j < NP__PAGE; j++)
			pthread_mutex_destroy(&page[j].lock);
		free(page);
	}
	free(np);
}

int zk__netpoll_fd(const struct zk__netpoll *np)
{
	return np->epfd;
}

/* The slot of fd, its page allocated on first use (NULL: no memory).
 * Pages are published once and never freed before the poller. */
static struct np_slot *slot_of(struct zk__netpoll *np, int fd, int create)
{
	_Atomic(struct np_slot *) *pp = &np->pages[fd >> NP__PAGE_SHIFT];
	struct np_slot *page = atomic_load_explicit(pp, memory_order_acquire);
	if (!page && create) {
		struct np_slot *fresh = calloc(NP__PAGE, sizeof(*fresh));
		if (!fresh)
			return NULL;
		for (int i = 0; i < NP__PAGE; i++)
			pthread_mutex_init(&fresh[i].lock, NULL);
		if (atomic_compare_exchange_strong_explicit(pp, &page, fresh, memory_order_acq_rel,
							    memory_order_acquire))
			page = fresh;
		else
			free(fresh); /* another thread's page won (its locks are
				      * plain memory until used) */
	}
	return page ? &page[fd & (NP__PAGE - 1)] : NULL;
}

/* Register fd, or re-arm it (under its lock): edge-triggered for both
 * directions once per life, or one-shot for what its waiters want now. */
static int slot_arm(struct zk__netpoll *np, struct np_slot *s, int fd)
{
	struct epoll_event ev = { .data.u64 = (uint64_t)fd };
	if (s->edge) {
		if (s->registered)
			return 0;
		ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
	} else {
		ev.events = (s->rd ? EPOLLIN | EPOLLRDHUP : 0) | (s->wr ? EPOLLOUT : 0);
		if (!ev.events)
			return 0;
		ev.events |= EPOLLONESHOT;
	}
	int rc = zk__epoll_set(np->epfd, fd, &ev, s->registered);
	if (rc == 0)
		s->registered = 1;
	return rc;
}

static void list_remove(struct np_waiter **head, struct np_waiter *wt)
{
	for (struct np_waiter **pp = head; *pp; pp = &(*pp)->next) {
		if (*pp == wt) {
			*pp = wt->next;
			return;
		}
	}
}

static struct np_waiter **list_of(struct np_slot *s, int events)
{
	return (events & POLLOUT) ? &s->wr : &s->rd;
}

/* Runs on the parking worker right after the fiber's registers are saved;
 * a harvester may wake the fiber as soon as the lock is dropped. */
static int np_publish(zk_fiber_t *self, void *arg)
{
	struct np_waiter *wt = arg;
	struct zk__netpoll *np = self->rt->netpoll;
	struct np_slot *s = slot_of(np, wt->fd, 1);
	if (!s) {
		wt->err = -ENOMEM;
		return 1;
	}
	pthread_mutex_lock(&s->lock);
	uint32_t gen = atomic_load_explicit(&fd_gen[wt->fd], memory_order_relaxed);
	if (s->gen != gen) { /* a new life: nothing known of it yet */
		s->gen = gen;
		s->edge = (gen & ZK__NP_OURS) != 0;
		s->registered = s->rd_ready = s->wr_ready = s->rd_end = s->wr_end = 0;
	}
	int out = (wt->events & POLLOUT) != 0;
	uint8_t *ready = out ? &s->wr_ready : &s->rd_ready;
	int rc = 1; /* resume at once */
	if (*ready || (out ? s->wr_end : s->rd_end)) {
		*ready = 0; /* an edge came since the call: retry it */
	} else {
		struct np_waiter **head = list_of(s, wt->events);
		wt->next = *head;
		*head = wt;
		wt->linked = 1;
		wt->err = slot_arm(np, s, wt->fd);
		if (wt->err == 0) {
			rc = 0;
		} else {
			list_remove(head, wt);
			wt->linked = 0;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return rc;
}

int zk__netpoll_wait(struct zk__netpoll *np, int fd, int events, int64_t deadline)
{
	if (fd < 0)
		return -EBADF;
	if (fd >= NP__MAX_FD)
		return -ERANGE;
	struct np_waiter wt = { .fd = fd, .events = events & POLLOUT ? POLLOUT : POLLIN };
	wt.fiber = zk__self();
	int rc = zk__park_until(events & POLLOUT ? "io: writable" : "io: readable", np_publish, &wt,
				ZK__PARK_CANCELLABLE, deadline);
	if (rc != 0) {
		/* Timed out or cancelled: maybe still listed.  The lock also
		 * waits out a harvester that is waking us right now. */
		struct np_slot *s = slot_of(np, fd, 0);
		if (s) {
			pthread_mutex_lock(&s->lock);
			if (wt.linked) {
				list_remove(list_of(s, wt.events), &wt);
				wt.linked = 0;
			}
			pthread_mutex_unlock(&s->lock);
		}
		return rc;
	}
	return wt.err;
}

/* Wake every waiter of one list (under its lock). */
static int wake_list(struct np_waiter **head)
{
	int n = 0;
	struct np_waiter *wt = *head;
	*head = NULL;
	while (wt) {
		struct np_waiter *next = wt->next; /* wt may be gone once woken */
		wt->linked = 0;
		zk__unpark(wt->fiber, 0);
		wt = next;
		n++;
	}
	return n;
}

/* One readiness event for fd: wake its waiters, or keep the edge. */
static int np_event(struct zk__netpoll *np, int fd, uint32_t e)
{
	struct np_slot *s = slot_of(np, fd, 0);
	if (!s)
		return 0;
	int woken = 0;
	pthread_mutex_lock(&s->lock);
	if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
		if (s->rd)
			woken += wake_list(&s->rd);
		else if (s->edge)
			s->rd_ready = 1;
	}
	if (e & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
		if (s->wr)
			woken += wake_list(&s->wr);
		else if (s->edge)
			s->wr_ready = 1;
	}
	/* The end of the stream (or an error) comes with one edge, maybe the
	 * same as the last data's: a read that then returns only that data
	 * must still not wait for another (io.c's drained hint). */
	if (s->edge && (e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
		s->rd_end = 1;
	if (s->edge && (e & (EPOLLHUP | EPOLLERR)))
		s->wr_end = 1;
	/* One-shot: whoever still waits needs the fd armed again. */
	if (!s->edge && (s->rd || s->wr) && slot_arm(np, s, fd) != 0) {
		woken += wake_list(&s->rd); /* they retry, and see the error */
		woken += wake_list(&s->wr);
	}
	pthread_mutex_unlock(&s->lock);
	return woken;
}

void zk__netpoll_reborn(int fd, int flags)
{
	if (fd < 0 || fd >= NP__MAX_FD)
		return;
	uint32_t g = atomic_load_explicit(&fd_gen[fd], memory_order_relaxed);
	g = ((g & ~(uint32_t)ZK__NP_FLAGS) + ZK__NP_FLAGS + 1) | ((uint32_t)flags & ZK__NP_FLAGS);
	atomic_store_explicit(&fd_gen[fd], g, memory_order_relaxed);
}

int zk__netpoll_flags(int fd)
{
	if (fd < 0 || fd >= NP__MAX_FD)
		return 0;
	return (int)(atomic_load_explicit(&fd_gen[fd], memory_order_relaxed) & ZK__NP_FLAGS);
}

int zk__netpoll_harvest(struct zk__netpoll *np)
{
	struct epoll_event evs[NP__EVENTS];
	int woken = 0, n;
	do {
		n = epoll_wait(np->epfd, evs, NP__EVENTS, 0);
		/* Last event first, as in the drivers' reaps: the worker runs
		 * the fiber woken last first. */
		for (int i = n; i-- > 0;)
			woken += np_event(np, (int)evs[i].data.u64, evs[i].events);
	} while (n == NP__EVENTS);
	return woken;
}
