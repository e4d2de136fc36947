/*
 * stack.c - fiber stacks.
 *
 * Each stack is a guard page at the bottom, the usable stack above it, and
 * a small header (struct zk__stack) in its top bytes, so a stack needs no
 * separate allocation.  Stacks are mapped in slabs: one anonymous mapping
 * holds up to ZK__SLAB_MAX of them side by side.
 *
 * Guards.  mprotect(PROT_NONE) on the bottom page splits the mapping in two,
 * so every stack costs two of the process's vm.max_map_count mappings.
 * Linux 6.13 added madvise(MADV_GUARD_INSTALL), which marks the page as a
 * guard without splitting; we probe for it once and use it when present.
 * With ZK_GUARD_CANARY there is no guard at all: a known word at the lowest
 * usable address is checked at every switch away from the fiber.
 *
 * Slabs.  A new stack costs a mapping, a guard and the fault of its top
 * page: measured here 0.5, 0.45 and 1.5 us, which is most of what starting
 * 100,000 sleeping fibers costs.  A slab pays for the mapping once, installs
 * its guards with one process_madvise and faults in its top pages with
 * another (MADV_POPULATE_WRITE), about 1.4 us a stack in all against 2.5.
 * A slab holds half as many stacks as are mapped so far (1, 1, 1, 2, 3, ...
 * up to ZK__SLAB_MAX), so a small program maps little.  Stacks are never
 * unmapped one by one: the slabs go when the pool is destroyed.
 *
 * Pooling.  Reusing a warm stack costs nothing, so stacks are recycled: a
 * per-worker cache (no locking) in front of a global pool (one mutex).  The
 * pool keeps its stacks mapped; past its high-water mark it gives their
 * pages back with MADV_DONTNEED (the mapping stays, memory returns to the
 * OS), and they are touched afresh when reused.
 */
#include "config.h"
#include "stack.h"
#include "sanitize.h"

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

#define ZK__STACK_HEADER 64 /* bytes reserved for struct zk__stack at the top */
_Static_assert(sizeof(struct zk__stack) <= ZK__STACK_HEADER, "stack header too large");

#define ZK__PIDFD_SELF (-10001) /* PIDFD_SELF_THREAD_GROUP: this process */

/* Does MADV_GUARD_INSTALL work here?  Success of the call is not proof
 * (an emulator such as qemu-user may accept and ignore it), so check that
 * the kernel now refuses to read the page: write(2) from it must fail with
 * EFAULT instead of faulting us. */
static int probe_madvise_guard(size_t page)
{
	char *p = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 0;
	int ok = 0;
	int fds[2];
	if (madvise(p, page, MADV_GUARD_INSTALL) == 0 && pipe(fds) == 0) {
		ok = write(fds[1], p, 1) < 0 && errno == EFAULT;
		close(fds[0]);
		close(fds[1]);
	}
	munmap(p, 2 * page);
	return ok;
}

int zk__stack_pool_init(struct zk__stack_pool *p, size_t stack_size, int canary,
			unsigned cache_max, unsigned hwm)
{
	static int madvise_guard = -1; /* probed once per process */
	memset(p, 0, sizeof(*p));
	p->page = (size_t)sysconf(_SC_PAGESIZE);
	if (stack_size < 4 * p->page)
		stack_size = 4 * p->page;
	p->stack_size = (stack_size + p->page - 1) & ~(p->page - 1);
	p->cache_max = cache_max;
	p->hwm = hwm;
	p->slab_max = ZK__SLAB_MAX;
	if (canary) {
		p->guard = ZK__GUARD_CANARY;
	} else {
		if (madvise_guard < 0)
			madvise_guard = probe_madvise_guard(p->page);
		p->guard = madvise_guard ? ZK__GUARD_MADVISE : ZK__GUARD_MPROTECT;
	}
	return -pthread_mutex_init(&p->lock, NULL);
}

/* Advise each of n ranges of len bytes: with one process_madvise where the
 * kernel takes any advice for the calling process (Linux 6.13; PIDFD_SELF
 * since 6.15), else with one madvise per range.  0 or -errno. */
static int advise_ranges(struct iovec *iov, unsigned n, int advice)
{
#ifndef ZK_VALGRIND /* valgrind 3.19 does not know the system call */
	static _Atomic int batch = 1; /* cleared once the kernel refuses */
	if (n > 1 && atomic_load_explicit(&batch, memory_order_relaxed)) {
		long r = syscall(SYS_process_madvise, ZK__PIDFD_SELF, iov, (size_t)n, advice, 0u);
		if (r == (long)(n * iov[0].iov_len))
			return 0;
		if (r < 0 && errno != ENOMEM && errno != EAGAIN)
			atomic_store_explicit(&batch, 0, memory_order_relaxed);
	}
#endif
	for (unsigned i = 0; i < n; i++)
		if (madvise(iov[i].iov_base, iov[i].iov_len, advice) != 0)
			return -errno;
	return 0;
}

/* How many stacks the next slab holds: half of those mapped so far, so a
 * small program maps few and a large one makes few system calls. */
static unsigned slab_count(struct zk__stack_pool *p)
{
	unsigned n = atomic_load_explicit(&p->mapped, memory_order_relaxed) / 2;
	unsigned max = p->slab_max < 1 ? 1 : p->slab_max > ZK__SLAB_MAX ? ZK__SLAB_MAX : p->slab_max;
	return n < 1 ? 1 : n > max ? max : n;
}

/* The cache's and the pool's free lists (the pool's under its lock). */
static void cache_push(struct zk__stack_cache *c, struct zk__stack *s)
{
	s->next = c->head;
	c->head = s;
	c->count++;
}

static struct zk__stack *cache_pop(struct zk__stack_cache *c)
{
	struct zk__stack *s = c->head;
	if (s) {
		c->head = s->next;
		c->count--;
	}
	return s;
}

static void pool_push(struct zk__stack_pool *p, struct zk__stack *s)
{
	s->next = p->head;
	p->head = s;
	p->count++;
}

static struct zk__stack *pool_pop(struct zk__stack_pool *p)
{
	struct zk__stack *s = p->head;
	if (s) {
		p->head = s->next;
		p->count--;
	}
	return s;
}

/* Map n stacks of size bytes side by side with their guards (and their top
 * pages faulted in where that is cheap).  0 and *out, or -errno. */
static int map_slab(struct zk__stack_pool *p, unsigned n, size_t size, size_t guard, char **out)
{
	char *map = mmap(NULL, n * size, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
	if (map == MAP_FAILED)
		return -errno;
	struct iovec iov[ZK__SLAB_MAX];
	for (unsigned i = 0; i < n; i++)
		iov[i] = (struct iovec){ map + i * size, guard };
	int rc = 0;
	if (p->guard == ZK__GUARD_MADVISE) {
		rc = advise_ranges(iov, n, MADV_GUARD_INSTALL);
	} else if (p->guard == ZK__GUARD_MPROTECT) {
		for (unsigned i = 0; i < n && rc == 0; i++)
			if (mprotect(iov[i].iov_base, guard, PROT_NONE) != 0)
				rc = -errno;
	}
	if (rc != 0) {
		munmap(map, n * size);
		return rc;
	}
#if defined(MADV_POPULATE_WRITE) && !defined(ZK_VALGRIND)
	/* Every new fiber writes its top page at once: fault them in together
	 * (a miss only leaves the fault to the first write). */
	for (unsigned i = 0; i < n; i++)
		iov[i] = (struct iovec){ map + (i + 1) * size - p->page, p->page };
	advise_ranges(iov, n, MADV_POPULATE_WRITE);
#endif
	*out = map;
	return 0;
}

/* Map a slab of stacks; the first goes to *out, the others to c (and past
 * its bound to the pool). */
static int stack_map(struct zk__stack_pool *p, struct zk__stack_cache *c, struct zk__stack **out)
{
	size_t guard = p->guard == ZK__GUARD_CANARY ? 0 : p->page;
	size_t size = p->stack_size + guard;
	unsigned n = slab_count(p);
	char *map;
	int rc = map_slab(p, n, size, guard, &map);
	if (rc != 0 && n > 1) /* near a limit a single stack may still fit */
		rc = map_slab(p, n = 1, size, guard, &map);
	if (rc != 0) {
		/* mprotect fails with ENOMEM when the split would pass
		 * vm.max_map_count: the same "no more stacks" condition. */
		return rc == -ENOMEM ? -EAGAIN : rc;
	}
	struct zk__stack *first = NULL, *spare = NULL, **tail = &spare;
	for (unsigned i = 0; i < n; i++) {
		char *m = map + i * size;
		struct zk__stack *s = (struct zk__stack *)(m + size - ZK__STACK_HEADER);
		s->map = m;
		s->lo = m + guard;
		s->next = NULL;
		s->cold = 0;
		s->slab_next = NULL;
		s->slab_size = 0;
		s->vg_id = zk__vg_stack_register(s->lo, (char *)s);
		if (p->guard == ZK__GUARD_CANARY)
			*(uint64_t *)s->lo = ZK__CANARY;
		if (i == 0) {
			first = s;
		} else if (c->count < p->cache_max) {
			cache_push(c, s);
		} else {
			*tail = s; /* for the pool, in order */
			tail = &s->next;
		}
	}
	first->slab_size = n * size;
	atomic_fetch_add_explicit(&p->mapped, n, memory_order_relaxed);
	pthread_mutex_lock(&p->lock);
	first->slab_next = p->slabs;
	p->slabs = first;
	while (spare) {
		struct zk__stack *s = spare;
		spare = s->next;
		pool_push(p, s);
	}
	pthread_mutex_unlock(&p->lock);
	*out = first;
	return 0;
}

int zk__stack_get(struct zk__stack_pool *p, struct zk__stack_cache *c, struct zk__stack **out)
{
	struct zk__stack *s = cache_pop(c);
	if (!s) {
		/* Refill half a cache from the pool in one lock round trip. */
		pthread_mutex_lock(&p->lock);
		for (unsigned want = p->cache_max / 2 + 1; want > 0 && (s = pool_pop(p)); want--)
			cache_push(c, s);
		pthread_mutex_unlock(&p->lock);
		s = cache_pop(c);
	}
	if (s) {
		s->cold = 0; /* its user touches it now */
		*out = s;
		return 0;
	}
	return stack_map(p, c, out);
}

/* Give a stack's pages back to the OS, keeping the mapping (and, in canary
 * mode, the page that holds the canary).  Only for a stack nobody runs on. */
static void stack_release_pages(struct zk__stack_pool *p, struct zk__stack *s)
{
	char *hi = (char *)((uintptr_t)s & ~(uintptr_t)(p->page - 1));
	char *lo = s->lo;
	if (p->guard == ZK__GUARD_CANARY)
		lo += p->page;
	if (hi > lo)
		madvise(lo, (size_t)(hi - lo), MADV_DONTNEED);
	s->cold = 1;
}

void zk__stack_put(struct zk__stack_pool *p, struct zk__stack_cache *c, struct zk__stack *s)
{
	if (c && c->count < p->cache_max) {
		cache_push(c, s);
		return;
	}
	/* Cache full (or none): to the global pool.  Past the high-water mark the
	 * pages go back to the OS first, while the stack is still private to us
	 * (once pooled another thread may take it at once). */
	pthread_mutex_lock(&p->lock);
	int release = p->count >= p->hwm;
	pthread_mutex_unlock(&p->lock);
	if (release && !s->cold)
		stack_release_pages(p, s);
	pthread_mutex_lock(&p->lock);
	pool_push(p, s);
	pthread_mutex_unlock(&p->lock);
}

int zk__stack_reserve(struct zk__stack_pool *p, struct zk__stack_cache *c)
{
	if (c->head)
		return 0;
	struct zk__stack *s;
	int rc = zk__stack_get(p, c, &s);
	if (rc == 0)
		cache_push(c, s);
	return rc;
}

void zk__stack_cache_flush(struct zk__stack_pool *p, struct zk__stack_cache *c)
{
	struct zk__stack *s;
	while ((s = cache_pop(c)))
		zk__stack_put(p, NULL, s);
}

/* Unmaps every slab, so every stack, pooled or not: the runtime is gone and
 * no fiber runs on one any more. */
void zk__stack_pool_destroy(struct zk__stack_pool *p)
{
#ifdef ZK_VALGRIND
	for (struct zk__stack *s = p->head; s; s = s->next)
		zk__vg_stack_deregister(s->vg_id);
#endif
	while (p->slabs) {
		struct zk__stack *s = p->slabs;
		p->slabs = s->slab_next;
		zk__asan_forget(s->map, s->slab_size);
		munmap(s->map, s->slab_size);
	}
	p->head = NULL;
	p->count = 0;
	pthread_mutex_destroy(&p->lock);
}

/* ---- overflow reports -----------------------------------------------------
 *
 * A guard-page hit is a SIGSEGV, and a SIGSEGV handler cannot run on the
 * stack that just overflowed: every worker thread therefore gets an
 * alternate signal stack (sigaltstack) and the handler is installed with
 * SA_ONSTACK.  The handler asks the fiber layer which fiber runs on this
 * thread and where its stack is; a fault in its guard page (or with the
 * stack pointer below the usable range) is reported and aborts.  Any other
 * fault goes to the previous handler, or to the default action.
 */

static struct sigaction old_segv, old_bus;
zk__overflow_lookup_fn zk__overflow_lookup;

static void write_str(const char *s)
{
	ssize_t r = write(2, s, strlen(s));
	(void)r;
}

static void write_u64(uint64_t v)
{
	char buf[24];
	int i = (int)sizeof(buf);
	buf[--i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	write_str(buf + i);
}

/* Async-signal-safe: write(2) only, then abort(). */
void zk__stack_report_overflow(uint64_t id, const char *name, size_t size, const char *how)
{
	write_str("zokio: fiber ");
	write_u64(id);
	if (name && name[0]) {
		write_str(" (");
		write_str(name);
		write_str(")");
	}
	write_str(" overflowed its ");
	write_u64(size);
	write_str("-byte stack (");
	write_str(how);
	write_str("); aborting\n");
	abort();
}

static void chain(int sig, siginfo_t *si, void *uc)
{
	struct sigaction *old = sig == SIGBUS ? &old_bus : &old_segv;
	if ((old->sa_flags & SA_SIGINFO) && old->sa_sigaction) {
		old->sa_sigaction(sig, si, uc);
		return;
	}
	if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN && old->sa_handler) {
		old->sa_handler(sig);
		return;
	}
	/* Default action: reinstate it; returning re-executes the faulting
	 * instruction, which now kills the process with the original signal. */
	signal(sig, SIG_DFL);
}

static void on_fault(int sig, siginfo_t *si, void *uc)
{
	struct zk__stack *s = NULL;
	uint64_t id = 0;
	const char *name = NULL;
	if (zk__overflow_lookup && zk__overflow_lookup(&s, &id, &name) == 0 && s) {
		char *addr = si->si_addr;
		/* Below the usable range and at most a little below the mapping: a
		 * frame larger than the guard can skip past it into the page below. */
		if (addr < s->lo && addr + 256 * 1024 >= s->map)
			zk__stack_report_overflow(id, name, zk__stack_usable(s), "guard page hit");
	}
	chain(sig, si, uc);
}

static void install(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_fault;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, &old_segv);
	sigaction(SIGBUS, &sa, &old_bus);
}

void zk__overflow_handler_install(void)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;
	pthread_once(&once, install);
}

#define ZK__ALTSTACK_SIZE (64 * 1024)

/* Give the calling thread an alternate signal stack unless it has one.
 * Returns a handle for zk__altstack_leave (NULL when nothing was done). */
void *zk__altstack_enter(void)
{
	stack_t cur;
	if (sigaltstack(NULL, &cur) == 0 && !(cur.ss_flags & SS_DISABLE))
		return NULL;
	size_t size = ZK__ALTSTACK_SIZE;
	if (size < (size_t)SIGSTKSZ)
		size = (size_t)SIGSTKSZ;
	void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return NULL;
	stack_t ss = { .ss_sp = mem, .ss_size = size, .ss_flags = 0 };
	if (sigaltstack(&ss, NULL) != 0) {
		munmap(mem, size);
		return NULL;
	}
	return mem;
}

void zk__altstack_leave(void *h)
{
	if (!h)
		return;
	stack_t ss = { .ss_sp = NULL, .ss_size = 0, .ss_flags = SS_DISABLE };
	sigaltstack(&ss, NULL);
	size_t size = ZK__ALTSTACK_SIZE;
	if (size < (size_t)SIGSTKSZ)
		size = (size_t)SIGSTKSZ;
	zk__asan_forget(h, size);
	munmap(h, size);
}
