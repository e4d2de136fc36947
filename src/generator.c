/*
 * generator.c - stackful generators: a fiber that yields values one at a
 * time to a consumer.
 *
 * The generator fiber and its consumer meet on a rendezvous channel and a
 * request semaphore: zk_gen_next() posts a request and receives; the
 * generator runs only while a request is outstanding, so it is lazy (it
 * computes value k+1 only when next is called for it).  When the function
 * returns the channel is closed, which next reports as -EPIPE.
 * zk_gen_destroy() abandons a generator at any point: it closes the
 * channel and cancels the fiber, so the pending or next zk_gen_yield fails
 * and the function unwinds normally (freeing what it holds), then it joins
 * the fiber and frees everything.
 */
#include "config.h"
#include "zokio.h"

#include <errno.h>
#include <stdlib.h>

struct zk_gen {
	zk_chan_t *ch;
	zk_sem_t req;
	zk_gen_fn fn;
	void *arg;
	zk_fiber_t *f;
};

static void *gen_main(void *arg)
{
	zk_gen_t *g = arg;
	if (zk_sem_wait(&g->req) == 0) /* lazy: start on the first next */
		g->fn(g, g->arg);
	zk_chan_close(g->ch);
	return NULL;
}

int zk_gen_create(zk_gen_t **out, size_t elem_size, zk_gen_fn fn, void *arg)
{
	if (!out || !fn)
		return -EINVAL;
	if (!zk_runtime_current())
		return -EPERM;
	zk_gen_t *g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	int rc = zk_chan_create(&g->ch, elem_size, 0);
	if (rc) {
		free(g);
		return rc;
	}
	zk_sem_init(&g->req, 0);
	g->fn = fn;
	g->arg = arg;
	rc = zk_spawn(&g->f, gen_main, g);
	if (rc) {
		zk_chan_destroy(g->ch);
		free(g);
		return rc;
	}
	*out = g;
	return 0;
}

int zk_gen_yield(zk_gen_t *g, const void *value)
{
	int rc = zk_chan_send(g->ch, value);
	if (rc)
		return rc;
	/* Wait until the consumer asks for the next one. */
	return zk_sem_wait(&g->req);
}

int zk_gen_next(zk_gen_t *g, void *out)
{
	if (!g || !out)
		return -EINVAL;
	int rc = zk_sem_post(&g->req);
	if (rc)
		return rc;
	return zk_chan_recv(g->ch, out);
}

int zk_gen_destroy(zk_gen_t *g)
{
	if (!g)
		return -EINVAL;
	zk_chan_close(g->ch); /* -EPIPE if the generator ended: fine */
	zk_cancel(g->f);
	zk_join(g->f, NULL);
	zk_chan_destroy(g->ch);
	free(g);
	return 0;
}
