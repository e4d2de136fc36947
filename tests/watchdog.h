/*
 * tests/watchdog.h - a watchdog thread for the tests that could hang on a
 * lost wake-up: it turns a hang into a report of what is stuck (with a
 * dump of the runtime's fibers) and an abort, instead of a test timeout.
 * Header-only (static functions); include it after check.h and zokio.h.
 */
#ifndef ZK_TESTS_WATCHDOG_H
#define ZK_TESTS_WATCHDOG_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A watchdog thread: if the watched progress counter stands still for
 * `stall` seconds (a lost wake-up stops it for good), or the whole thing
 * takes longer than `limit` seconds, print what is stuck, dump the
 * runtime's fibers and abort.  Without a counter only the limit applies. */
struct watchdog {
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int stopped;
	int stall, limit;
	const char *what;
	_Atomic long *progress;
	zk_runtime_t *rt;
};

static void *watchdog_main(void *arg)
{
	struct watchdog *wd = arg;
	struct timespec dl;
	clock_gettime(CLOCK_MONOTONIC, &dl);
	long last = wd->progress ? atomic_load(wd->progress) : 0;
	int still = 0, elapsed = 0;
	const char *why = NULL;
	pthread_mutex_lock(&wd->lock);
	while (!wd->stopped && !why) {
		dl.tv_sec += 1;
		if (pthread_cond_timedwait(&wd->cond, &wd->lock, &dl) != ETIMEDOUT)
			continue;
		elapsed++;
		long now = wd->progress ? atomic_load(wd->progress) : 0;
		still = now == last ? still + 1 : 0;
		last = now;
		if (wd->progress && still >= wd->stall)
			why = "no progress";
		else if (elapsed >= wd->limit)
			why = "time limit";
	}
	pthread_mutex_unlock(&wd->lock);
	if (why) {
		fprintf(stderr, "watchdog: %s: %s after %d s (progress %ld); live fibers:\n", wd->what, why,
			elapsed, wd->progress ? atomic_load(wd->progress) : -1L);
		zk_runtime_dump(wd->rt, 2);
		abort();
	}
	return NULL;
}

static void watchdog_start(struct watchdog *wd, zk_runtime_t *rt, int stall, int limit,
			   const char *what, _Atomic long *progress)
{
	memset(wd, 0, sizeof(*wd));
	wd->stall = stall;
	wd->limit = limit;
	wd->what = what;
	wd->progress = progress;
	wd->rt = rt;
	pthread_mutex_init(&wd->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&wd->cond, &ca);
	pthread_condattr_destroy(&ca);
	ck_assert_int_eq(pthread_create(&wd->thread, NULL, watchdog_main, wd), 0);
}

static void watchdog_stop(struct watchdog *wd)
{
	pthread_mutex_lock(&wd->lock);
	wd->stopped = 1;
	pthread_cond_signal(&wd->cond);
	pthread_mutex_unlock(&wd->lock);
	pthread_join(wd->thread, NULL);
	pthread_cond_destroy(&wd->cond);
	pthread_mutex_destroy(&wd->lock);
}

#endif
