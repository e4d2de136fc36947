/*
 * zk_bench_io.c - Zokio's servers for the perf suite's network rows
 * (protocol in perf/bench.h and perf/run):
 *
 *   echo_server   port=P workers=N: echo every byte back, one fiber per
 *                 connection (driven by perf/peers/c/loadgen)
 *   http_server   port=P workers=N: HTTP/1.1 keep-alive "Hello, World!"
 *                 (driven by wrk)
 *
 * Both listen on 127.0.0.1:P, print READY once listening, and exit 0 on
 * SIGTERM/SIGINT: a signal thread (the signals are blocked everywhere else)
 * calls zk_runtime_shutdown, which cancels every fiber.
 */
#include "config.h"
#include "bench.h"
#include "http_hello.h"
#include "zokio.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int zk_bench_io(const char *bench, int argc, char **argv);

static int send_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = zk_send(fd, p, n, 0);
		if (w < 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void *echo_conn(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[16384];
	ssize_t n;
	while ((n = zk_recv(fd, buf, sizeof(buf), 0)) > 0)
		if (send_all(fd, buf, (size_t)n))
			break;
	zk_close(fd);
	return NULL;
}

static void *http_conn(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[8192], out[HTTP_RESPONSE_LEN * 16];
	struct http_scan scan = { 0 };
	ssize_t n;
	while ((n = zk_recv(fd, buf, sizeof(buf), 0)) > 0) {
		size_t reqs = http_count_requests(&scan, buf, (size_t)n);
		while (reqs > 0) {
			size_t k = reqs > 16 ? 16 : reqs;
			for (size_t j = 0; j < k; j++)
				memcpy(out + j * HTTP_RESPONSE_LEN, http_response, HTTP_RESPONSE_LEN);
			if (send_all(fd, out, k * HTTP_RESPONSE_LEN))
				goto out;
			reqs -= k;
		}
	}
out:
	zk_close(fd);
	return NULL;
}

struct server {
	int port;
	zk_fiber_fn conn;
	int rc;
};

static void *acceptor(void *arg)
{
	struct server *s = arg;
	int lfd = zk_tcp_listen("127.0.0.1", s->port, 4096, 0);
	if (lfd < 0) {
		fprintf(stderr, "zk_bench: listen on %d: %s\n", s->port, strerror(-lfd));
		s->rc = 1;
		return NULL;
	}
	fprintf(stderr, "zk_bench: backend %s\n", zk_runtime_backend(zk_runtime_current()));
	printf("READY\n");
	fflush(stdout);
	for (;;) {
		int fd = zk_accept(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd == -ECANCELED)
			break;
		if (fd < 0) {
			zk_sleep_ns(1000000);
			continue;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, 1 /* TCP_NODELAY */, &one, sizeof(one));
		if (zk_spawn(NULL, s->conn, (void *)(intptr_t)fd) != 0)
			zk_close(fd);
	}
	zk_close(lfd);
	return NULL;
}

static void *signal_thread(void *arg)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	int sig;
	sigwait(&set, &sig);
	zk_runtime_shutdown(arg);
	return NULL;
}

static int serve(int argc, char **argv, zk_fiber_fn conn)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = (int)bench_arg(argc, argv, "workers", 1);
	zk_runtime_t *rt;
	int rc = zk_runtime_create(&rt, &o);
	if (rc) {
		fprintf(stderr, "zk_bench: runtime: %s\n", strerror(-rc));
		return 1;
	}
	struct server s = { (int)bench_arg(argc, argv, "port", 0), conn, 0 };
	pthread_t t;
	pthread_create(&t, NULL, signal_thread, rt);
	zk_spawn_ex(rt, NULL, acceptor, &s, NULL);
	zk_runtime_run(rt);
	/* The run ends once the signal thread's shutdown has cancelled every
	 * fiber - possibly before zk_runtime_shutdown itself has returned:
	 * wait for that thread (waking it if the run ended on its own, e.g.
	 * listen failed) before the runtime goes away. */
	pthread_kill(t, SIGTERM);
	pthread_join(t, NULL);
	zk_runtime_destroy(rt);
	return s.rc;
}

int zk_bench_io(const char *bench, int argc, char **argv)
{
	if (!strcmp(bench, "echo_server"))
		return serve(argc, argv, echo_conn);
	if (!strcmp(bench, "http_server"))
		return serve(argc, argv, http_conn);
	return -1;
}
