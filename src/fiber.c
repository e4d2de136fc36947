/*
 * fiber.c - the public fiber API: spawn, join, detach, yield, exit, names,
 * cancellation and fiber-local storage.  The mechanics (records, queues,
 * switching) live in scheduler.c; this file is the contract users see.
 *
 * Lifetime of a record: one word, the end word (joiner, fiber.h), decides
 * who frees it.  It is 0 while the fiber runs and a handle exists, a list
 * of waiting calls while someone joins or waits on it, DETACHED once the
 * handle was given up, DONE once the fiber ended.  The fiber's end swaps
 * in DONE (waking the list) and frees the record if it finds DETACHED;
 * zk_detach swaps in DETACHED and frees it if it finds DONE; zk_join
 * frees it after it saw DONE.  zk_join_timed and zk_wait_first only wait:
 * they never free, so the handle stays valid for a later join.
 */
#include "config.h"
#include "sanitize.h"
#include "scheduler.h"
#include "driver.h"
#include "waitq.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

zk_fiber_t *zk_self(void)
{
	struct zk__worker *w = zk__worker_self();
	return w ? w->current : NULL;
}

zk_runtime_t *zk_runtime_current(void)
{
	struct zk__worker *w = zk__worker_self();
	return w ? w->rt : NULL;
}

int zk_worker_index(void)
{
	struct zk__worker *w = zk__worker_self();
	return w ? w->index : -1;
}

/* on_worker: -1, or the worker the fiber must start on (and stay on). */
static int spawn(zk_runtime_t *rt, int on_worker, zk_fiber_t **out, zk_fiber_fn fn, void *arg,
		 const zk_spawn_opts_t *opts)
{
	struct zk__worker *w = zk__worker_self();
	if (!rt)
		rt = w ? w->rt : NULL;
	if (!rt || !fn || on_worker >= rt->nworkers)
		return -EINVAL;
	if (w && w->rt != rt)
		w = NULL; /* a worker of another runtime spawns like a plain thread */
	if (w) {
		/* Lazy stacks make spawn itself cheap, but a spawn that could
		 * never get a stack should fail here, not later: keep one stack
		 * in reserve in this worker's cache. */
		int rc = zk__stack_reserve(&rt->pool, &w->stacks);
		if (rc)
			return rc;
	}
	zk_fiber_t *f = zk__fiber_alloc(rt, w);
	if (!f)
		return -ENOMEM;
	f->fn = fn;
	f->arg = arg;
	if (opts) {
		f->pinned = opts->pinned ? 1 : 0;
		if (opts->name)
			zk_fiber_set_name(f, opts->name);
	}
	if (out)
		*out = f;
	else
		atomic_store_explicit(&f->joiner, ZK__JOIN_DETACHED, memory_order_relaxed);
	zk__count_spawn(rt, w);
	if (on_worker >= 0) {
		/* pinned before it starts: it only ever sits in that worker's
		 * own queues, never in a stealable one */
		f->pinned = 1;
		f->home = (int16_t)on_worker;
		zk__schedule(f);
	} else {
		zk__schedule_new(rt, w, f);
	}
	return 0;
}

int zk_spawn_ex(zk_runtime_t *rt, zk_fiber_t **out, zk_fiber_fn fn, void *arg,
		const zk_spawn_opts_t *opts)
{
	return spawn(rt, -1, out, fn, arg, opts);
}

int zk_spawn_on(zk_runtime_t *rt, int worker, zk_fiber_t **out, zk_fiber_fn fn, void *arg,
		const zk_spawn_opts_t *opts)
{
	if (worker < 0)
		return -EINVAL;
	return spawn(rt, worker, out, fn, arg, opts);
}

int zk_spawn(zk_fiber_t **out, zk_fiber_fn fn, void *arg)
{
	if (!zk__worker_self())
		return -EPERM;
	return zk_spawn_ex(NULL, out, fn, arg, NULL);
}

/* ---- waiting for ends ------------------------------------------------------
 *
 * zk_join, zk_join_timed and zk_wait_first all wait the same way: one node
 * per task on the task's end list (fiber.h), all nodes of a call sharing
 * one zk__end_wait.  The end of a task takes its whole list under
 * ZK__JOIN_LOCK and wakes each call whose `winner` it wins.  A call that
 * stops waiting (woken, timed out, cancelled) closes `winner` and takes its
 * nodes off every list; where the end has taken the list it waits for the
 * end to let go of it (end_lock), so a wake-up that was decided is always
 * delivered before the call returns - and can never hit a later park.
 * Nothing here consumes a handle: only zk_join (and zk_detach) free. */

/* f's end word from w (its last value seen) on, once nobody holds its
 * lock: the holder is a few instructions from letting go. */
static uintptr_t end_unlocked(zk_fiber_t *f, uintptr_t w, unsigned *spins)
{
	while (w & ZK__JOIN_LOCK) {
		zk__spin_backoff(spins);
		w = atomic_load_explicit(&f->joiner, memory_order_acquire);
	}
	return w;
}

/* Take f's end list.  Returns its head (0 for an empty list) with
 * ZK__JOIN_LOCK set, or - without the lock - ZK__JOIN_DONE once f has
 * ended and its end is done with the list (or ZK__JOIN_DETACHED for a
 * handle that was given up: a caller's bug, refused earlier). */
static uintptr_t end_lock(zk_fiber_t *f)
{
	unsigned spins = 0;
	uintptr_t w = atomic_load_explicit(&f->joiner, memory_order_acquire);
	for (;;) {
		w = end_unlocked(f, w, &spins);
		if (w == ZK__JOIN_DONE || w == ZK__JOIN_DETACHED)
			return w;
		if (atomic_compare_exchange_weak_explicit(&f->joiner, &w, w | ZK__JOIN_LOCK,
							  memory_order_acquire, memory_order_acquire))
			return w;
	}
}

static void end_unlock(zk_fiber_t *f, struct zk__end_node *head)
{
	atomic_store_explicit(&f->joiner, (uintptr_t)head, memory_order_release);
}

/* The index of zk_join's node: the one wait no timeout or cancel ends. */
#define END_JOIN (-1)

/* The end of f found waiters (or a list being changed) in w. */
void zk__fiber_end_notify_slow(zk_fiber_t *f, uintptr_t w)
{
	unsigned spins = 0;
	for (;;) {
		w = end_unlocked(f, w, &spins);
		/* With waiters, keep the lock while waking them: a waiter that
		 * withdraws meanwhile waits until every wake is delivered. */
		uintptr_t to = w == 0 || w == ZK__JOIN_DETACHED ? ZK__JOIN_DONE
							     : ZK__JOIN_DONE | ZK__JOIN_LOCK;
		if (atomic_compare_exchange_weak_explicit(&f->joiner, &w, to, memory_order_acq_rel,
							  memory_order_relaxed))
			break;
	}
	/* The last waiter withdrew meanwhile (and the handle may have been
	 * detached since). */
	if (w == ZK__JOIN_DETACHED)
		zk__fiber_free(f);
	if (w == 0 || w == ZK__JOIN_DETACHED)
		return;
	for (struct zk__end_node *n = (struct zk__end_node *)w, *next; n; n = next) {
		next = n->next; /* n may vanish once its waiter is woken... */
		struct zk__end_wait *ew = n->w;
		int open = -1;
		if (n->index == END_JOIN) {
			/* zk_join's node: nothing else can end or close its wait */
			atomic_store_explicit(&ew->winner, 0, memory_order_release);
			zk__waiter_wake(&ew->waiter);
		} else if (atomic_compare_exchange_strong_explicit(&ew->winner, &open, n->index,
								   memory_order_acq_rel,
								   memory_order_acquire)) {
			zk__waiter_wake(&ew->waiter); /* ...but not before we unlock */
		}
	}
	atomic_store_explicit(&f->joiner, ZK__JOIN_DONE, memory_order_release);
}

/* Put nd on f's end list.  Returns 1 instead if f has already ended.
 * A push needs no lock: it only succeeds while nobody holds it, and a
 * head that was removed and put back meanwhile is still a valid next. */
static int end_register(zk_fiber_t *f, struct zk__end_node *nd)
{
	unsigned spins = 0;
	uintptr_t w = atomic_load_explicit(&f->joiner, memory_order_acquire);
	for (;;) {
		w = end_unlocked(f, w, &spins);
		if (w == ZK__JOIN_DONE || w == ZK__JOIN_DETACHED)
			return 1;
		nd->next = (struct zk__end_node *)w;
		if (atomic_compare_exchange_weak_explicit(&f->joiner, &w, (uintptr_t)nd,
							  memory_order_release, memory_order_acquire))
			return 0;
	}
}

/* Take nd off f's end list; if f's end took the list, wait until it has
 * finished with it. */
static void end_withdraw(zk_fiber_t *f, struct zk__end_node *nd)
{
	uintptr_t w = end_lock(f);
	if (w == ZK__JOIN_DONE || w == ZK__JOIN_DETACHED)
		return;
	struct zk__end_node *head = (struct zk__end_node *)w, **pp = &head;
	while (*pp && *pp != nd)
		pp = &(*pp)->next;
	if (*pp)
		*pp = nd->next;
	end_unlock(f, head);
}

struct end_ctx {
	zk_fiber_t *const *tasks;
	struct zk__end_node *nodes;
	int n;
	int registered;              /* nodes[0..registered) are on lists */
	struct zk__end_wait ew;
};

/* Register the waiter's nodes; for a fiber this runs once it is parked
 * (publish-after-save: an end may wake it as soon as a node is listed).
 * Returns 1 if there is no need to wait: a task has ended already (then
 * the call claims it itself) or an end has claimed the call meanwhile.
 * Called again after a stray wake-up, it only checks. */
static int end_publish(zk_fiber_t *self, void *arg)
{
	struct end_ctx *c = arg;
	(void)self;
	while (c->registered < c->n) {
		int i = c->registered;
		if (end_register(c->tasks[i], &c->nodes[i])) {
			int open = -1;
			atomic_compare_exchange_strong_explicit(&c->ew.winner, &open, i,
								memory_order_acq_rel,
								memory_order_acquire);
			return 1;
		}
		c->registered++;
	}
	return atomic_load_explicit(&c->ew.winner, memory_order_acquire) != -1;
}

/* Wait until one of tasks[0..n) ends (nodes: n slots).  Returns the index
 * of the task whose end woke the call, or -ETIMEDOUT / -ECANCELED as
 * zk__park_until does with flags and deadline.  On return no node is on
 * any list and no end will touch the call again. */
static int end_wait(zk_fiber_t *const *tasks, int n, struct zk__end_node *nodes, const char *what,
		    int flags, int64_t deadline)
{
	struct end_ctx c = { .tasks = tasks, .nodes = nodes, .n = n, .registered = 0 };
	atomic_init(&c.ew.winner, -1);
	c.ew.waiter.fiber = zk_self();
	atomic_init(&c.ew.waiter.futex, 0);
	for (int i = 0; i < n; i++) {
		nodes[i].next = NULL;
		nodes[i].w = &c.ew;
		nodes[i].index = i;
	}
	int rc = 0;
	if (c.ew.waiter.fiber) {
		do
			rc = zk__park_until(what, end_publish, &c, flags, deadline);
		while (rc == 0 && atomic_load_explicit(&c.ew.winner, memory_order_acquire) < 0);
	} else if (!end_publish(NULL, &c)) {
		if (!(flags & ZK__PARK_NO_FIBER_DEADLINE))
			deadline = zk__effective_deadline(deadline);
		rc = zk__waiter_block_until(&c.ew.waiter, deadline < 0 ? ZK__NO_DEADLINE : deadline);
	}
	/* Close the call: from here on no end wins it.  If one already has,
	 * its result stands even if we timed out meanwhile. */
	int winner = -1;
	if (!atomic_compare_exchange_strong_explicit(&c.ew.winner, &winner, -2, memory_order_acq_rel,
						     memory_order_acquire))
		rc = winner;
	for (int i = 0; i < c.registered; i++)
		end_withdraw(tasks[i], &nodes[i]);
	return rc;
}

/* Read f's outcome and free its record (f has ended; the handle was the
 * last user). */
static int join_finish(zk_fiber_t *f, void **result)
{
	/* pairs with the release of the end word in zk__fiber_end_notify */
	unsigned spins = 0;
	while (atomic_load_explicit(&f->joiner, memory_order_acquire) != ZK__JOIN_DONE)
		zk__spin_backoff(&spins); /* the end is still waking other waiters */
	if (result)
		*result = f->result;
	int err = f->err;
	zk__fiber_free(f);
	return err;
}

/* Validate a handle for a wait: 0, or the error. */
static int end_check(zk_fiber_t *f, zk_fiber_t *self)
{
	if (!f)
		return -EINVAL;
	if (f == self)
		return -EDEADLK;
	if (atomic_load_explicit(&f->joiner, memory_order_relaxed) == ZK__JOIN_DETACHED)
		return -EINVAL;
	return 0;
}

int zk_join(zk_fiber_t *f, void **result)
{
	int rc = end_check(f, zk_self());
	if (rc)
		return rc;
	if (atomic_load_explicit(&f->joiner, memory_order_acquire) != ZK__JOIN_DONE) {
		/* Only the end may let us go (neither deadline nor cancel), so
		 * the node is never withdrawn: the end takes it. */
		struct zk__end_node nd = { .next = NULL, .index = END_JOIN };
		struct end_ctx c = { .tasks = &f, .nodes = &nd, .n = 1, .registered = 0 };
		atomic_init(&c.ew.winner, -1);
		c.ew.waiter.fiber = zk_self();
		atomic_init(&c.ew.waiter.futex, 0);
		nd.w = &c.ew;
		if (c.ew.waiter.fiber) {
			while (atomic_load_explicit(&c.ew.winner, memory_order_acquire) < 0)
				zk__park("join", end_publish, &c, 0);
		} else if (!end_publish(NULL, &c)) {
			zk__waiter_block(&c.ew.waiter);
		}
	}
	return join_finish(f, result);
}

int zk_join_timed(zk_fiber_t *f, void **result, int64_t deadline_ns)
{
	int rc = end_check(f, zk_self());
	if (rc)
		return rc;
	if (atomic_load_explicit(&f->joiner, memory_order_acquire) != ZK__JOIN_DONE) {
		struct zk__end_node nd;
		rc = end_wait(&f, 1, &nd, "join", ZK__PARK_CANCELLABLE, deadline_ns);
		if (rc < 0)
			return rc; /* the handle stays valid */
	}
	return join_finish(f, result);
}

#define WAIT_FIRST_STACK 16

int zk_wait_first(zk_fiber_t *const *tasks, int n, int64_t deadline_ns, int flags)
{
	if (!tasks || n <= 0 || n > ZK_WAIT_MAX || (flags & ~ZK_WAIT_CANCEL_REST))
		return -EINVAL;
	zk_fiber_t *self = zk_self();
	int first = -1;
	for (int i = 0; i < n; i++) {
		int rc = end_check(tasks[i], self);
		if (rc)
			return rc;
		if (first < 0 && atomic_load_explicit(&tasks[i]->joiner, memory_order_acquire) ==
					 ZK__JOIN_DONE)
			first = i; /* already ended: no need to wait */
	}
	if (first < 0) {
		struct zk__end_node nodes_st[WAIT_FIRST_STACK];
		struct zk__end_node *nodes = nodes_st;
		if (n > WAIT_FIRST_STACK && !(nodes = malloc((size_t)n * sizeof(*nodes))))
			return -ENOMEM;
		first = end_wait(tasks, n, nodes, "wait first", ZK__PARK_CANCELLABLE, deadline_ns);
		if (nodes != nodes_st)
			free(nodes);
		if (first < 0)
			return first; /* nothing ended: nobody is cancelled */
	}
	if (flags & ZK_WAIT_CANCEL_REST)
		for (int i = 0; i < n; i++)
			if (tasks[i] != tasks[first])
				zk_cancel(tasks[i]);
	return first;
}

int zk_detach(zk_fiber_t *f)
{
	if (!f)
		return -EINVAL;
	unsigned spins = 0;
	uintptr_t w = atomic_load_explicit(&f->joiner, memory_order_acquire);
	for (;;) {
		w = end_unlocked(f, w, &spins);
		if (w == ZK__JOIN_DETACHED)
			return -EINVAL;
		if (w != 0 && w != ZK__JOIN_DONE)
			return -EBUSY; /* a join or wait on it is in progress */
		if (atomic_compare_exchange_weak_explicit(&f->joiner, &w, ZK__JOIN_DETACHED,
							  memory_order_acq_rel, memory_order_acquire))
			break;
	}
	if (w == ZK__JOIN_DONE)
		zk__fiber_free(f); /* already ended: nobody else will */
	return 0;
}

void zk_yield(void)
{
	zk_fiber_t *self = zk_self();
	if (self)
		zk__yield(self);
}

void zk_exit(void *result)
{
	zk_fiber_t *self = zk_self();
	if (!self)
		return;
	self->result = result;
	zk__fiber_finish(self);
}

uint64_t zk_fiber_id(const zk_fiber_t *f)
{
	return f ? f->id : 0;
}

int zk_fiber_set_name(zk_fiber_t *f, const char *name)
{
	if (!f || !name)
		return -EINVAL;
	/* The buffer, once there, stays until the record is freed: a dump
	 * running meanwhile reads a name being rewritten, never a freed one. */
	if (!f->name) {
		f->name = malloc(ZK__NAME_MAX);
		if (!f->name)
			return -ENOMEM;
		f->name[ZK__NAME_MAX - 1] = 0;
	}
	size_t n = strnlen(name, ZK__NAME_MAX - 1);
	memcpy(f->name, name, n);
	f->name[n] = 0;
	return 0;
}

const char *zk_fiber_name(const zk_fiber_t *f)
{
	return f && f->name ? f->name : "";
}

void zk__cancel_mark(zk_fiber_t *f)
{
	atomic_store_explicit(&f->cancel, 1, memory_order_seq_cst);
}

/* After zk__cancel_mark and a zk__heavy_barrier: pairs with after_switch,
 * which stores PARKED and then reads cancel (scheduler.c). */
void zk__cancel_kick(zk_fiber_t *f)
{
	int st = atomic_load_explicit(&f->state, memory_order_seq_cst);
	if (st == ZK__PARKING && f->cancellable_park) {
		zk__unpark(f, -ECANCELED); /* deferred until publish is done */
	} else if (st == ZK__PARKED) {
		struct zk__cancel_hook *h = atomic_load_explicit(&f->cancel_hook, memory_order_acquire);
		if (h)
			h->fn(h);
		else if (f->cancellable_park)
			zk__unpark(f, -ECANCELED);
	}
}

int zk_cancel(zk_fiber_t *f)
{
	if (!f)
		return -EINVAL;
	zk__cancel_mark(f);
	zk__heavy_barrier();
	zk__cancel_kick(f);
	return 0;
}

int zk_cancelled(void)
{
	zk_fiber_t *self = zk_self();
	return self ? atomic_load_explicit(&self->cancel, memory_order_relaxed) : 0;
}

/* ---- fiber-local storage ------------------------------------------------ */

static pthread_mutex_t keys_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
	int used;
	void (*dtor)(void *);
} keys[ZK_KEYS_MAX];

int zk_key_create(zk_key_t *key, void (*dtor)(void *))
{
	if (!key)
		return -EINVAL;
	pthread_mutex_lock(&keys_lock);
	for (unsigned i = 0; i < ZK_KEYS_MAX; i++) {
		if (!keys[i].used) {
			keys[i].used = 1;
			keys[i].dtor = dtor;
			pthread_mutex_unlock(&keys_lock);
			*key = i;
			return 0;
		}
	}
	pthread_mutex_unlock(&keys_lock);
	return -EAGAIN;
}

int zk_key_delete(zk_key_t key)
{
	if (key >= ZK_KEYS_MAX)
		return -EINVAL;
	pthread_mutex_lock(&keys_lock);
	int ok = keys[key].used;
	keys[key].used = 0;
	keys[key].dtor = NULL;
	pthread_mutex_unlock(&keys_lock);
	return ok ? 0 : -EINVAL;
}

void *zk_key_get(zk_key_t key)
{
	zk_fiber_t *self = zk_self();
	if (!self || !self->tls || key >= ZK_KEYS_MAX)
		return NULL;
	return self->tls[key];
}

int zk_key_set(zk_key_t key, void *value)
{
	zk_fiber_t *self = zk_self();
	if (!self)
		return -EPERM;
	if (key >= ZK_KEYS_MAX || !keys[key].used)
		return -EINVAL;
	if (!self->tls) {
		self->tls = calloc(ZK_KEYS_MAX, sizeof(void *));
		if (!self->tls)
			return -ENOMEM;
		self->has_tls = 1;
	}
	self->tls[key] = value;
	return 0;
}

/* POSIX-style: destructors may set values again, so repeat a few rounds. */
void zk__fiber_run_tls_dtors(zk_fiber_t *f)
{
	if (!f->has_tls) /* not f->tls: the end reads only the first line */
		return;
	for (int round = 0; round < 4; round++) {
		int again = 0;
		for (unsigned i = 0; i < ZK_KEYS_MAX; i++) {
			void *v = f->tls[i];
			if (!v)
				continue;
			f->tls[i] = NULL;
			pthread_mutex_lock(&keys_lock);
			void (*dtor)(void *) = keys[i].used ? keys[i].dtor : NULL;
			pthread_mutex_unlock(&keys_lock);
			if (dtor) {
				dtor(v);
				again = 1;
			}
		}
		if (!again)
			break;
	}
	free(f->tls);
	f->tls = NULL;
	f->has_tls = 0;
}
