/*
 * scope.c - structured concurrency: a scope (nursery) owns the fibers
 * spawned in it, and leaving it waits for all of them.
 *
 * Members run a small wrapper that records the first failure (a negative
 * return) and then cancels every other member.  The owner waits in
 * zk_scope_end() on the scope's queue until the live count reaches zero;
 * if the owner is cancelled or its deadline passes meanwhile, it cancels
 * the members and goes on waiting - a scope never ends before its members.
 * Member handles are kept until the end, so cancelling one is always
 * cancelling a live record.
 */
#include "config.h"
#include "waitq.h"
#include "zokio.h"

#include <errno.h>
#include <stdlib.h>

struct member {
	struct member *next;
	zk_scope_t *scope;
	zk_task_fn fn;
	void *arg;
	zk_fiber_t *f;
};

struct zk_scope {
	struct zk__spin lock;
	int live;               /* members not yet ended */
	int err;                /* first failure, 0 while none */
	int cancelled;          /* members were told to stop */
	struct member *members;
	struct zk__wq q;        /* the owner, waiting in zk_scope_end */
};

int zk_scope_begin(zk_scope_t **out)
{
	if (!out)
		return -EINVAL;
	zk_scope_t *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	*out = s;
	return 0;
}

/* Cancel every member (lock held). */
static void cancel_members(zk_scope_t *s)
{
	s->cancelled = 1;
	for (struct member *m = s->members; m; m = m->next)
		zk_cancel(m->f);
}

static void *member_main(void *arg)
{
	struct member *m = arg;
	zk_scope_t *s = m->scope;
	int rc = m->fn(m->arg);
	zk__spin_lock(&s->lock);
	if (rc < 0 && !s->err) {
		s->err = rc;
		cancel_members(s);
	}
	if (--s->live == 0) {
		struct zk__wnode *n;
		while ((n = zk__wq_pop_claim(&s->q)))
			zk__wnode_complete(n, 0);
	}
	zk__spin_unlock(&s->lock);
	return NULL;
}

int zk_scope_spawn(zk_scope_t *s, zk_task_fn fn, void *arg)
{
	if (!s || !fn)
		return -EINVAL;
	struct member *m = malloc(sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->scope = s;
	m->fn = fn;
	m->arg = arg;
	zk__spin_lock(&s->lock);
	if (s->cancelled) {
		zk__spin_unlock(&s->lock);
		free(m);
		return -ECANCELED;
	}
	/* Spawn under the lock: the member cannot end (and look at the
	 * scope) before it is counted and listed. */
	int rc = zk_spawn(&m->f, member_main, m);
	if (rc) {
		zk__spin_unlock(&s->lock);
		free(m);
		return rc;
	}
	m->next = s->members;
	s->members = m;
	s->live++;
	zk__spin_unlock(&s->lock);
	return 0;
}

int zk_scope_cancel(zk_scope_t *s)
{
	if (!s)
		return -EINVAL;
	zk__spin_lock(&s->lock);
	cancel_members(s);
	zk__spin_unlock(&s->lock);
	return 0;
}

int zk_scope_end(zk_scope_t *s)
{
	if (!s)
		return -EINVAL;
	int flags = ZK__PARK_CANCELLABLE;
	zk__spin_lock(&s->lock);
	while (s->live > 0) {
		struct zk__wnode n;
		zk__wnode_init(&n, NULL, 0);
		zk__wq_push(&s->q, &n);
		int rc = zk__wq_wait_locked(&s->lock, &s->q, &n, "scope", flags, -1);
		if (n.done)
			zk__spin_lock(&s->lock); /* the scope is ours: safe to touch */
		else {
			/* The owner was cancelled or timed out: stop the members
			 * and wait for them regardless. */
			if (!s->err)
				s->err = rc;
			cancel_members(s);
			flags = ZK__PARK_NO_FIBER_DEADLINE;
		}
	}
	zk__spin_unlock(&s->lock);
	int err = s->err;
	struct member *m = s->members;
	while (m) {
		struct member *next = m->next;
		zk_join(m->f, NULL);
		free(m);
		m = next;
	}
	free(s);
	return err;
}
