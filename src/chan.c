/*
 * chan.c - channels (MPMC, fixed element size; bounded, rendezvous,
 * unbounded) and select.
 *
 * A channel is a spin lock, a ring buffer and two queues of waiter nodes
 * (waitq.h): senders waiting for room or a receiver, receivers waiting for
 * a value.  A node's data points at the waiter's element (a sender's value
 * or a receiver's destination), so a value goes straight from sender to
 * receiver when one waits: the waker copies it under the lock, then wakes.
 * At most one of the queues is non-empty at any time (a sender waits only
 * if no receiver does and vice versa), except for select nodes, which may
 * sit on both queues of one channel and are skipped once their select is
 * over.
 *
 * Close: queued senders fail with -EPIPE (their values are not sent);
 * receivers take what is buffered, then get -EPIPE.
 *
 * Select (Go's select): lock every channel involved (in address order),
 * scan the cases in a random order and take the first that can proceed -
 * which makes the choice uniform among the ready ones.  If none can and the
 * caller may wait, queue one node per case, all sharing one zk__wsel, park
 * once and unlock everything in publish.  The first waker to win the
 * select's CAS completes its case; after waking, the selecting fiber locks
 * the channels again and takes its other nodes off their queues.
 */
#include "config.h"
#include "waitq.h"
#include "zokio.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct zk_chan {
	struct zk__spin lock;
	int closed;
	size_t esize;
	size_t cap;             /* 0 rendezvous, ZK_CHAN_UNBOUNDED, else bound */
	size_t size;            /* slots allocated in buf */
	size_t head, len;       /* ring: first element, element count */
	unsigned char *buf;
	struct zk__wq sendq, recvq;
};

int zk_chan_create(zk_chan_t **out, size_t elem_size, size_t capacity)
{
	if (!out || elem_size == 0 || elem_size > (1u << 20))
		return -EINVAL;
	zk_chan_t *ch = calloc(1, sizeof(*ch));
	if (!ch)
		return -ENOMEM;
	ch->esize = elem_size;
	ch->cap = capacity;
	size_t slots = capacity == ZK_CHAN_UNBOUNDED ? 16 : capacity;
	if (slots) {
		if (slots > SIZE_MAX / elem_size) {
			free(ch);
			return -EINVAL;
		}
		ch->buf = malloc(slots * elem_size);
		if (!ch->buf) {
			free(ch);
			return -ENOMEM;
		}
		ch->size = slots;
	}
	*out = ch;
	return 0;
}

int zk_chan_destroy(zk_chan_t *ch)
{
	if (!ch)
		return -EINVAL;
	zk__spin_lock(&ch->lock);
	int busy = !zk__wq_empty(&ch->sendq) || !zk__wq_empty(&ch->recvq);
	zk__spin_unlock(&ch->lock);
	if (busy)
		return -EBUSY;
	free(ch->buf);
	free(ch);
	return 0;
}

/* Copy one element: the common word-sized ones without a call. */
static inline void copy_elem(zk_chan_t *ch, void *dst, const void *src)
{
	if (ch->esize == 8)
		memcpy(dst, src, 8);
	else
		memcpy(dst, src, ch->esize);
}

static inline unsigned char *slot(zk_chan_t *ch, size_t i)
{
	return ch->buf + ((ch->head + i) % ch->size) * ch->esize;
}

/* Double an unbounded channel's ring (lock held). */
static int grow(zk_chan_t *ch)
{
	if (ch->size > SIZE_MAX / 2 / ch->esize)
		return -ENOMEM;
	size_t size = ch->size * 2;
	unsigned char *b = malloc(size * ch->esize);
	if (!b)
		return -ENOMEM;
	for (size_t i = 0; i < ch->len; i++)
		memcpy(b + i * ch->esize, slot(ch, i), ch->esize);
	free(ch->buf);
	ch->buf = b;
	ch->size = size;
	ch->head = 0;
	return 0;
}

/* ---- the non-waiting halves (lock held) ---------------------------------- */

/* Returns 0 (sent), -EPIPE (closed), -EAGAIN (would wait), -ENOMEM. */
static int send_now(zk_chan_t *ch, const void *elem)
{
	if (ch->closed)
		return -EPIPE;
	struct zk__wnode *r = zk__wq_pop_claim(&ch->recvq);
	if (r) {
		copy_elem(ch, r->data, elem);
		zk__wnode_complete(r, 0);
		return 0;
	}
	if (ch->len == ch->size) {
		if (ch->cap != ZK_CHAN_UNBOUNDED)
			return -EAGAIN;
		int rc = grow(ch);
		if (rc)
			return rc;
	}
	copy_elem(ch, slot(ch, ch->len), elem);
	ch->len++;
	return 0;
}

/* Returns 0 (received), -EPIPE (closed and drained), -EAGAIN. */
static int recv_now(zk_chan_t *ch, void *out)
{
	if (ch->len) {
		copy_elem(ch, out, slot(ch, 0));
		ch->head = (ch->head + 1) % ch->size;
		ch->len--;
		/* A sender waiting for room takes the slot just freed. */
		struct zk__wnode *s = zk__wq_pop_claim(&ch->sendq);
		if (s) {
			copy_elem(ch, slot(ch, ch->len), s->data);
			ch->len++;
			zk__wnode_complete(s, 0);
		}
		return 0;
	}
	struct zk__wnode *s = zk__wq_pop_claim(&ch->sendq);
	if (s) { /* rendezvous */
		copy_elem(ch, out, s->data);
		zk__wnode_complete(s, 0);
		return 0;
	}
	return ch->closed ? -EPIPE : -EAGAIN;
}

/* ---- send / recv ------------------------------------------------------------ */

static int chan_send(zk_chan_t *ch, const void *elem, int64_t deadline, int try_only)
{
	if (!ch || !elem)
		return -EINVAL;
	zk__spin_lock(&ch->lock);
	int rc = send_now(ch, elem);
	if (rc != -EAGAIN || try_only) {
		zk__spin_unlock(&ch->lock);
		return rc;
	}
	struct zk__wnode n;
	zk__wnode_init(&n, (void *)elem, 0);
	zk__wq_push(&ch->sendq, &n);
	rc = zk__wq_wait_locked(&ch->lock, &ch->sendq, &n, "chan send", ZK__PARK_CANCELLABLE, deadline);
	if (!n.done)
		zk__spin_unlock(&ch->lock);
	return rc;
}

static int chan_recv(zk_chan_t *ch, void *out, int64_t deadline, int try_only)
{
	if (!ch || !out)
		return -EINVAL;
	zk__spin_lock(&ch->lock);
	int rc = recv_now(ch, out);
	if (rc != -EAGAIN || try_only) {
		zk__spin_unlock(&ch->lock);
		return rc;
	}
	struct zk__wnode n;
	zk__wnode_init(&n, out, 0);
	zk__wq_push(&ch->recvq, &n);
	rc = zk__wq_wait_locked(&ch->lock, &ch->recvq, &n, "chan recv", ZK__PARK_CANCELLABLE, deadline);
	if (!n.done)
		zk__spin_unlock(&ch->lock);
	return rc;
}

int zk_chan_send(zk_chan_t *ch, const void *elem) { return chan_send(ch, elem, -1, 0); }
int zk_chan_send_timed(zk_chan_t *ch, const void *elem, int64_t d) { return chan_send(ch, elem, d, 0); }
int zk_chan_try_send(zk_chan_t *ch, const void *elem) { return chan_send(ch, elem, -1, 1); }
int zk_chan_recv(zk_chan_t *ch, void *out) { return chan_recv(ch, out, -1, 0); }
int zk_chan_recv_timed(zk_chan_t *ch, void *out, int64_t d) { return chan_recv(ch, out, d, 0); }
int zk_chan_try_recv(zk_chan_t *ch, void *out) { return chan_recv(ch, out, -1, 1); }

int zk_chan_close(zk_chan_t *ch)
{
	if (!ch)
		return -EINVAL;
	zk__spin_lock(&ch->lock);
	if (ch->closed) {
		zk__spin_unlock(&ch->lock);
		return -EPIPE;
	}
	ch->closed = 1;
	struct zk__wnode *n;
	while ((n = zk__wq_pop_claim(&ch->recvq)))
		zk__wnode_complete(n, -EPIPE);
	while ((n = zk__wq_pop_claim(&ch->sendq)))
		zk__wnode_complete(n, -EPIPE);
	zk__spin_unlock(&ch->lock);
	return 0;
}

size_t zk_chan_len(zk_chan_t *ch)
{
	zk__spin_lock(&ch->lock);
	size_t n = ch->len;
	zk__spin_unlock(&ch->lock);
	return n;
}

size_t zk_chan_cap(const zk_chan_t *ch)
{
	return ch->cap;
}

/* ---- select ----------------------------------------------------------------- */

#define SELECT_STACK 8

/* Per-thread generator for the scan order; never used across a park. */
static __thread uint64_t sel_rng;

static uint32_t sel_random(void)
{
	uint64_t x = sel_rng;
	if (!x)
		x = (uint64_t)(uintptr_t)&sel_rng ^ 0x9e3779b97f4a7c15ull ^ (uint64_t)zk__now();
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	sel_rng = x;
	return (uint32_t)(x >> 32);
}

struct sel_locks {
	zk_chan_t **chans;      /* distinct channels, ascending address */
	int n;
	zk_chan_t *skip;        /* not locked (the winner's, after a wake) */
};

static void sel_lock(struct sel_locks *l)
{
	for (int i = 0; i < l->n; i++)
		if (l->chans[i] != l->skip)
			zk__spin_lock(&l->chans[i]->lock);
}

static void sel_unlock(void *arg)
{
	struct sel_locks *l = arg;
	for (int i = l->n; i-- > 0;)
		if (l->chans[i] != l->skip)
			zk__spin_unlock(&l->chans[i]->lock);
}

static int sel_case_now(zk_select_case_t *c)
{
	if (c->op == ZK_SELECT_SEND)
		return send_now(c->chan, c->buf);
	return recv_now(c->chan, c->buf);
}

static int select_impl(zk_select_case_t *cases, int n, int *result, int64_t deadline, int try_only)
{
	if (!cases || n < 0 || n > ZK_SELECT_MAX)
		return -EINVAL;
	int order_st[SELECT_STACK];
	zk_chan_t *chans_st[SELECT_STACK];
	struct zk__wnode nodes_st[SELECT_STACK];
	int *order = order_st;
	zk_chan_t **chans = chans_st;
	struct zk__wnode *nodes = nodes_st;
	if (n > SELECT_STACK) {
		order = malloc((size_t)n * sizeof(*order));
		chans = malloc((size_t)n * sizeof(*chans));
		nodes = malloc((size_t)n * sizeof(*nodes));
		if (!order || !chans || !nodes) {
			free(order);
			free(chans);
			free(nodes);
			return -ENOMEM;
		}
	}

	/* Random scan order (Fisher-Yates) and the sorted distinct channels. */
	int m = 0, nc = 0;
	for (int i = 0; i < n; i++) {
		zk_select_case_t *c = &cases[i];
		if (!c->chan)
			continue; /* a NULL channel never proceeds (as in Go) */
		if ((c->op != ZK_SELECT_SEND && c->op != ZK_SELECT_RECV) || !c->buf) {
			m = -1;
			break;
		}
		int j = (int)(sel_random() % (uint32_t)(m + 1));
		order[m] = order[j];
		order[j] = i;
		m++;
		int k = nc;
		while (k > 0 && (uintptr_t)chans[k - 1] > (uintptr_t)c->chan)
			k--;
		if (k > 0 && chans[k - 1] == c->chan)
			continue;
		memmove(&chans[k + 1], &chans[k], (size_t)(nc - k) * sizeof(*chans));
		chans[k] = c->chan;
		nc++;
	}
	int rc;
	if (m < 0) {
		rc = -EINVAL;
		goto out;
	}
	struct sel_locks locks = { chans, nc, NULL };
	sel_lock(&locks);
	for (int k = 0; k < m; k++) {
		int i = order[k];
		int r = sel_case_now(&cases[i]);
		if (r != -EAGAIN) {
			sel_unlock(&locks);
			if (result)
				*result = r;
			rc = i;
			goto out;
		}
	}
	if (try_only || m == 0) {
		sel_unlock(&locks);
		if (m == 0 && !try_only) {
			/* Nothing can ever proceed: wait for the deadline or
			 * cancellation only (like Go's empty select). */
			rc = zk_sleep_until(zk__effective_deadline(deadline) == ZK__NO_DEADLINE
						    ? INT64_MAX
						    : zk__effective_deadline(deadline));
			rc = rc == 0 ? -ETIMEDOUT : rc;
		} else {
			rc = -EAGAIN;
		}
		goto out;
	}

	struct zk__wsel sel;
	atomic_init(&sel.winner, -1);
	sel.waiter.fiber = zk__self();
	atomic_init(&sel.waiter.futex, 0);
	for (int k = 0; k < m; k++) {
		int i = order[k];
		struct zk__wnode *nd = &nodes[i];
		zk__wnode_init(nd, cases[i].buf, i);
		nd->waiter = &sel.waiter;
		nd->sel = &sel;
		zk__wq_push(cases[i].op == ZK_SELECT_SEND ? &cases[i].chan->sendq : &cases[i].chan->recvq, nd);
	}
	int wrc = zk__wq_wait(&sel.waiter, "select", sel_unlock, &locks, ZK__PARK_CANCELLABLE, deadline);
	int winner = atomic_load_explicit(&sel.winner, memory_order_acquire);
	if (winner >= 0 && wrc == 0) {
		/* Woken by the waker that dequeued and completed the winner's node; its
		 * channel need not be touched again (its user may free it
		 * as soon as the other side's call returns) unless another
		 * of our cases still sits on it. */
		locks.skip = cases[winner].chan;
		for (int k = 0; k < m; k++)
			if (order[k] != winner && cases[order[k]].chan == locks.skip)
				locks.skip = NULL;
	}
	sel_lock(&locks);
	if (winner < 0) {
		/* Timed out or cancelled: withdraw, unless a waker wins first
		 * (it holds a lock we now hold, so this CAS settles it). */
		int open = -1;
		if (!atomic_compare_exchange_strong_explicit(&sel.winner, &open, -2, memory_order_acq_rel,
							     memory_order_acquire))
			winner = open;
	}
	for (int k = 0; k < m; k++) {
		int i = order[k];
		if (i == winner)
			continue; /* dequeued by its waker */
		zk__wq_remove(cases[i].op == ZK_SELECT_SEND ? &cases[i].chan->sendq : &cases[i].chan->recvq,
			      &nodes[i]);
	}
	if (winner >= 0 && !nodes[winner].done) {
		/* Won but the waker has not completed yet: impossible, as it
		 * completes under the lock we hold now. */
		abort();
	}
	sel_unlock(&locks);
	if (winner >= 0) {
		if (result)
			*result = nodes[winner].result;
		rc = winner;
	} else {
		rc = wrc ? wrc : -EINTR;
	}
out:
	if (n > SELECT_STACK) {
		free(order);
		free(chans);
		free(nodes);
	}
	return rc;
}

int zk_select(zk_select_case_t *cases, int n, int *result)
{
	return select_impl(cases, n, result, -1, 0);
}

int zk_select_timed(zk_select_case_t *cases, int n, int *result, int64_t deadline_ns)
{
	return select_impl(cases, n, result, deadline_ns, 0);
}

int zk_select_try(zk_select_case_t *cases, int n, int *result)
{
	return select_impl(cases, n, result, -1, 1);
}
