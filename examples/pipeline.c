/*
 * pipeline.c - a streaming pipeline over bounded channels:
 *
 *     source -> map -> filter -> K parallel workers -> sink
 *
 * Every stage is a fiber (the parallel stage is K fibers sharing one input
 * and one output channel) and every link is a bounded channel, so a slow
 * stage holds back the stages before it (backpressure): however many items
 * flow, at most the channels' capacities are in flight.  End of stream is
 * zk_chan_close(): each stage drains its input until recv returns -EPIPE,
 * then closes its output; the last of the K workers closes theirs.
 *
 *     pipeline [items] [K] [sink_delay_us]
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "zokio.h"

#define CAP 16

static long n_items = 100000;
static int k_workers = 4;
static long sink_delay_us = 0;

static zk_chan_t *c_src, *c_map, *c_filt, *c_out;
static zk_waitgroup_t workers_left;

static void *source(void *arg)
{
	for (uint64_t i = 1; i <= (uint64_t)n_items; i++)
		if (zk_chan_send(c_src, &i) != 0)
			break;
	zk_chan_close(c_src);
	return NULL;
}

static void *map(void *arg) /* x -> x * x */
{
	uint64_t v;
	while (zk_chan_recv(c_src, &v) == 0) {
		v *= v;
		zk_chan_send(c_map, &v);
	}
	zk_chan_close(c_map);
	return NULL;
}

static void *filter(void *arg) /* keep the odd squares */
{
	uint64_t v;
	while (zk_chan_recv(c_map, &v) == 0)
		if (v & 1)
			zk_chan_send(c_filt, &v);
	zk_chan_close(c_filt);
	return NULL;
}

static void *worker(void *arg) /* the parallel stage: some "work" per item */
{
	uint64_t v;
	while (zk_chan_recv(c_filt, &v) == 0) {
		uint64_t h = v;
		for (int i = 0; i < 100; i++)
			h = h * 6364136223846793005ull + 1442695040888963407ull;
		v = (v + (h & 1)) % 1000003;
		zk_chan_send(c_out, &v);
	}
	zk_waitgroup_done(&workers_left);
	return NULL;
}

static void *closer(void *arg) /* closes the workers' output after the last one */
{
	zk_waitgroup_wait(&workers_left);
	zk_chan_close(c_out);
	return NULL;
}

static void *sink(void *arg)
{
	uint64_t v, sum = 0;
	long count = 0;
	size_t max_in_flight = 0;
	while (zk_chan_recv(c_out, &v) == 0) {
		sum += v;
		count++;
		size_t in_flight = zk_chan_len(c_src) + zk_chan_len(c_map) + zk_chan_len(c_filt) +
				   zk_chan_len(c_out);
		if (in_flight > max_in_flight)
			max_in_flight = in_flight;
		if (sink_delay_us)
			zk_sleep_ns(sink_delay_us * 1000);
	}
	printf("sink: %ld items, sum %llu, at most %zu items buffered in the pipeline (cap %d x 4)\n",
	       count, (unsigned long long)sum, max_in_flight, CAP);
	return NULL;
}

static void *pipeline_main(void *arg)
{
	zk_chan_create(&c_src, sizeof(uint64_t), CAP);
	zk_chan_create(&c_map, sizeof(uint64_t), CAP);
	zk_chan_create(&c_filt, sizeof(uint64_t), CAP);
	zk_chan_create(&c_out, sizeof(uint64_t), CAP);
	zk_waitgroup_init(&workers_left);
	zk_waitgroup_add(&workers_left, k_workers);

	zk_fiber_t *f[5];
	zk_spawn(&f[0], source, NULL);
	zk_spawn(&f[1], map, NULL);
	zk_spawn(&f[2], filter, NULL);
	for (int i = 0; i < k_workers; i++)
		zk_spawn(NULL, worker, NULL);
	zk_spawn(&f[3], closer, NULL);
	zk_spawn(&f[4], sink, NULL);
	for (int i = 0; i < 5; i++)
		zk_join(f[i], NULL);

	zk_chan_destroy(c_src);
	zk_chan_destroy(c_map);
	zk_chan_destroy(c_filt);
	zk_chan_destroy(c_out);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc > 1)
		n_items = atol(argv[1]);
	if (argc > 2)
		k_workers = atoi(argv[2]);
	if (argc > 3)
		sink_delay_us = atol(argv[3]);
	if (n_items < 0 || k_workers < 1) {
		fprintf(stderr, "usage: %s [items] [K>=1] [sink_delay_us]\n", argv[0]);
		return 2;
	}
	int64_t t0 = zk_now_ns();
	int rc = zk_run(pipeline_main, NULL, NULL);
	if (rc) {
		fprintf(stderr, "zk_run: %d\n", rc);
		return 1;
	}
	printf("%.1f ms\n", (zk_now_ns() - t0) / 1e6);
	return 0;
}
