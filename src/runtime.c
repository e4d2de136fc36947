/*
 * runtime.c - runtime life cycle (create / run / shutdown / destroy), its
 * options, and the registry used by the signal-triggered fiber dump.
 */
#include "config.h"
#include "scheduler.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#define ZK__MAX_WORKERS 1024

void zk_runtime_opts_init(zk_runtime_opts_t *o)
{
	memset(o, 0, sizeof(*o));
	o->stack_size = ZK_DEFAULT_STACK_SIZE;
	o->guard = ZK_GUARD_PAGE;
}

static int default_workers(void)
{
	const char *env = getenv("ZOKIO_WORKERS");
	if (env && *env) {
		char *end;
		long n = strtol(env, &end, 10);
		if (*end == 0 && n > 0 && n <= ZK__MAX_WORKERS)
			return (int)n;
	}
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? (int)n : 1;
}

/* Whether sockets wait in the shared poller (zokio.h, enum zk_shared_poll). */
static int want_shared_poll(const zk_runtime_opts_t *o)
{
	if (o->shared_poll == ZK_SHARED_POLL_ON)
		return 1;
	if (o->shared_poll == ZK_SHARED_POLL_OFF)
		return 0;
	const char *env = getenv("ZOKIO_SHARED_POLL");
	if (env && *env)
		return strcmp(env, "0") != 0;
	return o->workers >= 2;
}

int zk_runtime_create(zk_runtime_t **out, const zk_runtime_opts_t *opts)
{
	if (!out)
		return -EINVAL;
	zk_runtime_opts_t o;
	if (opts)
		o = *opts;
	else
		zk_runtime_opts_init(&o);
	if (o.stack_size == 0)
		o.stack_size = ZK_DEFAULT_STACK_SIZE;
	if (o.guard != ZK_GUARD_PAGE && o.guard != ZK_GUARD_CANARY)
		return -EINVAL;
	if (o.workers < 0 || o.workers > ZK__MAX_WORKERS)
		return -EINVAL;
	if (o.stack_size > (size_t)1 << 30)
		return -EINVAL;
	if (o.shared_poll < ZK_SHARED_POLL_AUTO || o.shared_poll > ZK_SHARED_POLL_OFF)
		return -EINVAL;
	const struct zk__driver_vt *vt;
	int brc = zk__driver_select(o.backend, &vt);
	if (brc)
		return brc;
	if (o.workers == 0)
		o.workers = default_workers();
	if (o.stack_cache == 0)
		o.stack_cache = 64;
	if (o.stack_pool_hwm == 0)
		o.stack_pool_hwm = 256;

	zk_runtime_t *rt = aligned_alloc(64, (sizeof(*rt) + 63) & ~(size_t)63);
	if (!rt)
		return -ENOMEM;
	memset(rt, 0, sizeof(*rt));
	rt->opts = o;
	rt->driver_vt = vt;
	rt->nworkers = o.workers;
	int rc = 0;
	if (want_shared_poll(&o))
		rc = zk__netpoll_create(&rt->netpoll);
	if (rc) {
		free(rt);
		return rc;
	}
	rc = zk__stack_pool_init(&rt->pool, o.stack_size, o.guard == ZK_GUARD_CANARY,
				 o.stack_cache, o.stack_pool_hwm);
	if (rc == 0)
		rc = zk__sched_init(rt);
	if (rc) {
		zk__netpoll_destroy(rt->netpoll);
		free(rt);
		return rc;
	}
	zk__runtime_registry_add(rt);
	*out = rt;
	return 0;
}

const char *zk_runtime_backend(zk_runtime_t *rt)
{
	return rt && rt->driver_vt ? rt->driver_vt->name : "";
}

int zk_runtime_shared_poll(zk_runtime_t *rt)
{
	return rt ? rt->netpoll != NULL : -EINVAL;
}

int zk_runtime_run(zk_runtime_t *rt)
{
	if (!rt)
		return -EINVAL;
	return zk__sched_run(rt);
}

/* Cancel every live fiber.  Records are walked under the record lock, the
 * same way the dump does; zk_cancel only sets a flag and may wake. */
static int shutdown_mark(zk_fiber_t *f, int state, void *arg)
{
	(void)state;
	(void)arg;
	zk__cancel_mark(f);
	return 0;
}

static int shutdown_kick(zk_fiber_t *f, int state, void *arg)
{
	(void)state;
	(void)arg;
	zk__cancel_kick(f);
	return 0;
}

void zk_runtime_shutdown(zk_runtime_t *rt)
{
	if (!rt)
		return;
	/* Called from another thread, our cancels may end the last fiber, so
	 * that zk_runtime_run() returns and its caller destroys the runtime
	 * while we still walk its records: count ourselves among the foreign
	 * wakers, whom zk_runtime_destroy() waits for (zk__sched_quiesce). */
	atomic_fetch_add_explicit(&rt->foreign_wakers, 1, memory_order_seq_cst);
	/* As zk_cancel, in two passes around one heavy barrier: mark every
	 * live fiber, then wake those parked. */
	pthread_mutex_lock(&rt->rec_lock);
	zk__each_live_fiber(rt, shutdown_mark, NULL);
	zk__heavy_barrier();
	zk__each_live_fiber(rt, shutdown_kick, NULL);
	pthread_mutex_unlock(&rt->rec_lock);
	atomic_fetch_sub_explicit(&rt->foreign_wakers, 1, memory_order_release);
}

int zk_runtime_destroy(zk_runtime_t *rt)
{
	if (!rt)
		return -EINVAL;
	if (atomic_load(&rt->running))
		return -EBUSY;
	zk__sched_quiesce(rt);
	zk__runtime_registry_remove(rt);
	zk__sched_fini(rt);
	zk__stack_pool_destroy(&rt->pool);
	zk__netpoll_destroy(rt->netpoll);
	free(rt);
	return 0;
}

int zk_run(zk_fiber_fn fn, void *arg, void **result)
{
	zk_runtime_t *rt;
	int rc = zk_runtime_create(&rt, NULL);
	if (rc)
		return rc;
	zk_fiber_t *f;
	rc = zk_spawn_ex(rt, &f, fn, arg, NULL);
	if (rc == 0) {
		rc = zk_runtime_run(rt);
		int jrc = zk_join(f, result);
		if (rc == 0)
			rc = jrc;
	}
	zk_runtime_destroy(rt);
	return rc;
}

/* ---- registry and signal-triggered dumps --------------------------------
 *
 * The signal handler only writes a byte to a pipe (async-signal-safe); a
 * small thread started by zk_dump_on_signal() reads it and does the dump.
 */

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static zk_runtime_t *registry;
static int dump_pipe[2] = { -1, -1 };

void zk__runtime_registry_add(zk_runtime_t *rt)
{
	pthread_mutex_lock(&registry_lock);
	rt->next_rt = registry;
	registry = rt;
	pthread_mutex_unlock(&registry_lock);
}

void zk__runtime_registry_remove(zk_runtime_t *rt)
{
	pthread_mutex_lock(&registry_lock);
	zk_runtime_t **pp = &registry;
	while (*pp && *pp != rt)
		pp = &(*pp)->next_rt;
	if (*pp)
		*pp = rt->next_rt;
	pthread_mutex_unlock(&registry_lock);
}

static void on_dump_signal(int sig)
{
	int saved = errno;
	char c = 1;
	ssize_t r = write(dump_pipe[1], &c, 1);
	(void)r;
	errno = saved;
}

static void *dump_thread(void *arg)
{
	char c;
	while (read(dump_pipe[0], &c, 1) == 1) {
		static const char hdr[] = "zokio: fiber dump\n";
		ssize_t r = write(2, hdr, sizeof(hdr) - 1);
		(void)r;
		pthread_mutex_lock(&registry_lock);
		for (zk_runtime_t *rt = registry; rt; rt = rt->next_rt)
			zk_runtime_dump(rt, 2);
		pthread_mutex_unlock(&registry_lock);
	}
	return NULL;
}

int zk_dump_on_signal(int signo)
{
	static pthread_mutex_t once_lock = PTHREAD_MUTEX_INITIALIZER;
	pthread_mutex_lock(&once_lock);
	if (dump_pipe[0] < 0) {
		if (pipe2(dump_pipe, O_CLOEXEC) != 0) {
			int rc = -errno;
			pthread_mutex_unlock(&once_lock);
			return rc;
		}
		pthread_t t;
		int rc = pthread_create(&t, NULL, dump_thread, NULL);
		if (rc) {
			close(dump_pipe[0]);
			close(dump_pipe[1]);
			dump_pipe[0] = dump_pipe[1] = -1;
			pthread_mutex_unlock(&once_lock);
			return -rc;
		}
		pthread_detach(t);
	}
	pthread_mutex_unlock(&once_lock);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_dump_signal;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(signo, &sa, NULL) != 0)
		return -errno;
	return 0;
}
