/*
 * stack.h - fiber stacks: mapped with a guard below (or a canary), pooled in
 * a per-worker cache plus a global pool, and reported when overflowed.
 */
#ifndef ZK_STACK_H
#define ZK_STACK_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Header kept in the top bytes of each stack's own mapping. */
struct zk__stack {
	char *map;              /* lowest byte: the guard page (if any) is first */
	char *lo;               /* lowest usable byte (the canary lives here) */
	struct zk__stack *next; /* cache/pool link */
	unsigned vg_id;         /* Valgrind stack id */
	int cold;               /* pages were given back with madvise */
	struct zk__stack *slab_next; /* first stack of each slab: pool's slab list */
	size_t slab_size;            /* first stack of a slab: the slab's bytes */
};

/* Top of the usable stack: the header sits right above it. */
static inline char *zk__stack_top(struct zk__stack *s) { return (char *)s; }

enum zk__guard_kind { ZK__GUARD_MADVISE, ZK__GUARD_MPROTECT, ZK__GUARD_CANARY };

struct zk__stack_cache {
	struct zk__stack *head;
	unsigned count;
};

struct zk__stack_pool {
	pthread_mutex_t lock;
	struct zk__stack *head;
	struct zk__stack *slabs;  /* every mapping, by its first stack (under lock) */
	_Atomic unsigned mapped;  /* stacks mapped so far: sizes the next slab */
	unsigned count;
	unsigned hwm;          /* past this many pooled stacks, pages go back to the OS */
	unsigned cache_max;    /* per-worker cache bound */
	unsigned slab_max;     /* stacks per mapping, 1..ZK__SLAB_MAX (init: the most) */
	size_t stack_size;     /* usable bytes, page multiple */
	size_t page;
	enum zk__guard_kind guard;
};

#define ZK__CANARY 0x5a6f6b696f5a4b21ull /* "ZokioZK!" */
#define ZK__SLAB_MAX 32 /* stacks per mapping, at most */

int zk__stack_pool_init(struct zk__stack_pool *p, size_t stack_size, int canary,
			unsigned cache_max, unsigned hwm);
void zk__stack_pool_destroy(struct zk__stack_pool *p);
/* 0 and *out, or -EAGAIN (no mapping possible) / -ENOMEM. */
int zk__stack_get(struct zk__stack_pool *p, struct zk__stack_cache *c, struct zk__stack **out);
void zk__stack_put(struct zk__stack_pool *p, struct zk__stack_cache *c, struct zk__stack *s);
/* Make sure the next zk__stack_get from c will not need a new mapping. */
int zk__stack_reserve(struct zk__stack_pool *p, struct zk__stack_cache *c);
void zk__stack_cache_flush(struct zk__stack_pool *p, struct zk__stack_cache *c);
/* Usable bytes below the top (inline: the switch path passes it to the
 * sanitizer hooks on every jump). */
static inline size_t zk__stack_usable(const struct zk__stack *s)
{
	return (size_t)((const char *)s - s->lo);
}

static inline int zk__stack_canary_ok(const struct zk__stack *s)
{
	return *(const volatile uint64_t *)s->lo == ZK__CANARY;
}

/* Overflow reporting (stack.c).  The fiber layer registers a lookup that,
 * called from the SIGSEGV handler (async-signal-safe), names the stack and
 * fiber running on the calling thread; 0 on success. */
typedef int (*zk__overflow_lookup_fn)(struct zk__stack **s, uint64_t *id, const char **name);
extern zk__overflow_lookup_fn zk__overflow_lookup;
void zk__overflow_handler_install(void);
void *zk__altstack_enter(void);   /* give the calling thread a signal stack */
void zk__altstack_leave(void *h);
/* One line on stderr naming the fiber, then abort(). */
void zk__stack_report_overflow(uint64_t id, const char *name, size_t size, const char *how)
	__attribute__((noreturn));

#endif
