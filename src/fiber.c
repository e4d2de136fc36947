/*
 * fiber.c - the public fiber API: spawn, join, detach, yield, exit, names,
 * cancellation and fiber-local storage.  The mechanics (records, queues,
 * switching) live in scheduler.c; this file is the contract users see.
 *
 * Lifetime of a record: one word, joiner, decides who frees it.  It is NULL
 * while the fiber runs and a handle exists, a waiter while someone joins,
 * DETACHED once the handle was given up, DONE once the fiber ended.  The
 * fiber's end exchanges in DONE and frees the record if it finds DETACHED;
 * zk_detach exchanges in DETACHED and frees it if it finds DONE; zk_join
 * frees it after it saw DONE.  One atomic exchange per fiber, no counts.
 */
#include "config.h"
#include "sanitize.h"
#include "scheduler.h"
#include "driver.h"

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

struct join_ctx {
	zk_fiber_t *target;
	struct zk__waiter *waiter;
};

/* Runs after the joiner's context is saved: register it, unless the target
 * ended meanwhile (then resume the joiner at once).  Already registered
 * (parked again after a stray wake-up): stay parked. */
static int join_publish(zk_fiber_t *self, void *arg)
{
	struct join_ctx *jc = arg;
	struct zk__waiter *cur = NULL;
	if (atomic_compare_exchange_strong_explicit(&jc->target->joiner, &cur, jc->waiter,
						    memory_order_acq_rel, memory_order_acquire))
		return 0;
	return cur != jc->waiter;
}

int zk_join(zk_fiber_t *f, void **result)
{
	if (!f)
		return -EINVAL;
	zk_fiber_t *self = zk_self();
	if (self == f)
		return -EDEADLK;
	struct zk__waiter *j = atomic_load_explicit(&f->joiner, memory_order_acquire);
	if (j == ZK__JOIN_DETACHED || (j != NULL && j != ZK__JOIN_DONE))
		return -EINVAL; /* detached, or another join is waiting */
	if (j != ZK__JOIN_DONE) {
		struct zk__waiter wt = { .fiber = self };
		atomic_init(&wt.futex, 0);
		if (self) {
			struct join_ctx jc = { f, &wt };
			/* Only the target's end may let us go: the waiter lives in
			 * this frame and stays registered until then. */
			do
				zk__park("join", join_publish, &jc, 0);
			while (atomic_load_explicit(&f->joiner, memory_order_acquire) != ZK__JOIN_DONE);
		} else {
			struct zk__waiter *expected = NULL;
			if (atomic_compare_exchange_strong_explicit(&f->joiner, &expected, &wt,
								    memory_order_acq_rel,
								    memory_order_acquire))
				zk__waiter_block(&wt);
		}
		/* pairs with the exchange in fiber_ended() */
		(void)atomic_load_explicit(&f->joiner, memory_order_acquire);
	}
	if (result)
		*result = f->result;
	int err = f->err;
	zk__fiber_free(f); /* the fiber has ended: the handle was the last user */
	return err;
}

int zk_detach(zk_fiber_t *f)
{
	if (!f)
		return -EINVAL;
	struct zk__waiter *j = atomic_exchange_explicit(&f->joiner, ZK__JOIN_DETACHED,
							memory_order_acq_rel);
	if (j == ZK__JOIN_DONE)
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
	}
	self->tls[key] = value;
	return 0;
}

/* POSIX-style: destructors may set values again, so repeat a few rounds. */
void zk__fiber_run_tls_dtors(zk_fiber_t *f)
{
	if (!f->tls)
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
}
