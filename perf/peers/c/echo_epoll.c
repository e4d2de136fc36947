/*
 * perf/peers/c/echo_epoll.c - the plain C reference server on epoll:
 * single-threaded, edge-triggered, non-blocking, no allocation on the hot
 * path. It approximates what one core can do with the classic readiness
 * model and is the yardstick for "how much does the runtime cost".
 *
 *     echo_epoll echo_server port=P   echo every byte back
 *     echo_epoll http_server port=P   answer each request with a fixed
 *                                     keep-alive "Hello, World!"
 *
 * Prints READY when listening and serves until SIGTERM (then exits 0).
 * workers= is accepted and ignored: this server is one thread by design.
 */
#include "common.h"

#include <sys/epoll.h>

#define BUF_SIZE 16384

struct conn {
	int fd;
	int http;
	size_t out_off, out_len; /* pending output: out[out_off..out_len) */
	struct http_scan scan;
	char out[BUF_SIZE];
};

static char in_buf[BUF_SIZE]; /* HTTP input is parsed and dropped */

static void conn_close(struct conn *c)
{
	close(c->fd); /* also removes it from the epoll set */
	free(c);
}

/* Writes pending output. Returns 1 when all is written, 0 when the socket
 * is full (an EPOLLOUT edge will call us again), -1 on error. */
static int conn_flush(struct conn *c)
{
	while (c->out_off < c->out_len) {
		ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN ? 0 : -1;
		}
		c->out_off += (size_t)n;
	}
	c->out_off = c->out_len = 0;
	return 1;
}

/* Reads what is available and queues the answer. Returns 1 to keep going,
 * 0 when the socket is drained, -1 to close. */
static int conn_read(struct conn *c)
{
	ssize_t n;
	if (!c->http) {
		/* Echo: read straight into the (empty) output buffer. */
		n = read(c->fd, c->out, sizeof c->out);
		if (n > 0)
			c->out_len = (size_t)n;
	} else {
		n = read(c->fd, in_buf, sizeof in_buf);
		if (n > 0) {
			size_t reqs = http_count_requests(&c->scan, in_buf, (size_t)n);
			for (size_t i = 0; i < reqs; i++) {
				if (c->out_len + HTTP_RESPONSE_LEN > sizeof c->out) {
					if (conn_flush(c) < 0)
						return -1;
					if (c->out_len + HTTP_RESPONSE_LEN > sizeof c->out)
						return -1; /* client pipelines without reading */
				}
				memcpy(c->out + c->out_len, http_response, HTTP_RESPONSE_LEN);
				c->out_len += HTTP_RESPONSE_LEN;
			}
		}
	}
	if (n == 0)
		return -1;
	if (n < 0)
		return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
	/*
	 * A short read means the receive queue was empty at that moment; any
	 * later data raises a new edge, so we may stop without the extra
	 * read() that would only return EAGAIN.
	 */
	return (size_t)n == BUF_SIZE ? 1 : 0;
}

/* Handles one edge: flush, then read/answer until drained or blocked. */
static void conn_event(struct conn *c, uint32_t events)
{
	if (events & (EPOLLERR | EPOLLHUP)) {
		conn_close(c);
		return;
	}
	for (;;) {
		int r = conn_flush(c);
		if (r < 0) {
			conn_close(c);
			return;
		}
		if (r == 0)
			return; /* output blocked: resume reading on EPOLLOUT */
		r = conn_read(c);
		if (r < 0) {
			conn_close(c);
			return;
		}
		if (r == 0) {
			if (conn_flush(c) < 0)
				conn_close(c);
			return;
		}
	}
}

static void accept_all(int lfd, int ep, int http)
{
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				perror("accept4");
			return;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		struct conn *c = calloc(1, sizeof *c);
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->http = http;
		struct epoll_event ev = {
			.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
			.data.ptr = c,
		};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
			perror("epoll_ctl");
			conn_close(c);
		}
	}
}

int main(int argc, char **argv)
{
	const char *bench = argc > 1 ? argv[1] : "";
	int http = server_mode(bench);
	if (http < 0) {
		bench_na(bench, "echo_epoll implements only echo_server and http_server");
		return 0;
	}
	long port = bench_arg(argc, argv, "port", 0);
	if (port <= 0 || port > 65535) {
		fprintf(stderr, "echo_epoll: port=P is required\n");
		return 2;
	}
	install_sigterm();
	int lfd = listen_loopback((int)port, 1);
	if (lfd < 0)
		return 1;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event lev = { .events = EPOLLIN | EPOLLET, .data.ptr = NULL };
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0) {
		perror("epoll");
		return 1;
	}
	announce_ready();

	struct epoll_event evs[512];
	while (!stop_requested) {
		int n = epoll_wait(ep, evs, 512, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("epoll_wait");
			return 1;
		}
		for (int i = 0; i < n; i++) {
			if (evs[i].data.ptr == NULL)
				accept_all(lfd, ep, http);
			else
				conn_event(evs[i].data.ptr, evs[i].events);
		}
	}
	return 0;
}
