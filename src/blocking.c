/*
 * blocking.c - the blocking pool: plain threads that run the calls no
 * backend makes asynchronous (getaddrinfo, files under epoll, user work).
 *
 * One pool per process, shared by all runtimes.  A job lives on the stack
 * of the fiber that waits for it; the fiber parks, its publish step queues
 * the job (and starts a thread when none is idle and the bound allows), a
 * pool thread runs it and unparks the fiber.  Threads that find no job for
 * a while (10 s, $ZOKIO_BLOCKING_IDLE_MS) exit, so an idle process keeps
 * none.
 */
#include "config.h"
#include "scheduler.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#define ZK__POOL_MAX_DEFAULT 64
#define ZK__POOL_IDLE_MS_DEFAULT 10000

struct job {
	void *(*fn)(void *);
	void *arg;
	void *result;
	zk_fiber_t *fiber;
	int err;
	_Atomic int released;   /* the pool thread is done with the job */
	struct job *next;
};

static struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct job *head, *tail;
	int threads, idle, max;
	long idle_ms;
} pool = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, 0, 0, 0 };

static long env_long(const char *name, long dflt, long lo, long hi)
{
	const char *e = getenv(name);
	if (!e || !*e)
		return dflt;
	char *end;
	long v = strtol(e, &end, 10);
	return *end == 0 && v >= lo && v <= hi ? v : dflt;
}

static void *pool_main(void *arg)
{
	pthread_mutex_lock(&pool.lock);
	for (;;) {
		while (!pool.head) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += pool.idle_ms / 1000;
			ts.tv_nsec += (pool.idle_ms % 1000) * 1000000;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pool.idle++;
			int rc = pthread_cond_timedwait(&pool.cond, &pool.lock, &ts);
			pool.idle--;
			if (rc == ETIMEDOUT && !pool.head) {
				pool.threads--;
				pthread_mutex_unlock(&pool.lock);
				return NULL;
			}
		}
		struct job *j = pool.head;
		pool.head = j->next;
		if (!pool.head)
			pool.tail = NULL;
		pthread_mutex_unlock(&pool.lock);
		j->result = j->fn(j->arg);
		/* zk__unpark from this foreign thread still touches the
		 * runtime after the fiber is queued (it wakes a worker); the
		 * fiber waits for "released" so that neither it nor its
		 * runtime can be gone before this call returns. */
		zk__unpark(j->fiber, 0);
		atomic_store_explicit(&j->released, 1, memory_order_release);
		pthread_mutex_lock(&pool.lock);
	}
}

/* Runs after the fiber's registers are saved: queue the job. */
static int job_publish(zk_fiber_t *self, void *arg)
{
	struct job *j = arg;
	pthread_mutex_lock(&pool.lock);
	if (!pool.max) {
		pool.max = (int)env_long("ZOKIO_BLOCKING_THREADS", ZK__POOL_MAX_DEFAULT, 1, 4096);
		pool.idle_ms = env_long("ZOKIO_BLOCKING_IDLE_MS", ZK__POOL_IDLE_MS_DEFAULT, 1, 86400000);
	}
	if (pool.idle == 0 && pool.threads < pool.max) {
		pthread_t t;
		pthread_attr_t attr;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		int rc = pthread_create(&t, &attr, pool_main, NULL);
		pthread_attr_destroy(&attr);
		if (rc == 0) {
			pool.threads++;
		} else if (pool.threads == 0) {
			pthread_mutex_unlock(&pool.lock);
			j->err = -EAGAIN;
			return 1; /* nobody could ever run it */
		}
	}
	j->next = NULL;
	if (pool.tail)
		pool.tail->next = j;
	else
		pool.head = j;
	pool.tail = j;
	pthread_cond_signal(&pool.cond);
	pthread_mutex_unlock(&pool.lock);
	return 0;
}

int zk_blocking(void *(*fn)(void *), void *arg, void **result)
{
	if (!fn)
		return -EINVAL;
	zk_fiber_t *self = zk_self();
	if (!self) {
		void *r = fn(arg);
		if (result)
			*result = r;
		return 0;
	}
	struct job j = { fn, arg, NULL, self, 0, 0, NULL };
	zk__park("blocking pool", job_publish, &j, 0);
	if (j.err)
		return j.err;
	while (!atomic_load_explicit(&j.released, memory_order_acquire))
		sched_yield(); /* a few instructions away on the pool thread */
	if (result)
		*result = j.result;
	return 0;
}
