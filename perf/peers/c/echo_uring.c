/*
 * perf/peers/c/echo_uring.c - the plain C reference server on raw liburing:
 * single-threaded, one ring, completion-driven. It is the ceiling Zokio's
 * io_uring driver is measured against ("echo/HTTP at >= 0.9x the raw
 * liburing server at one worker").
 *
 *     echo_uring echo_server port=P   echo every byte back
 *     echo_uring http_server port=P   fixed keep-alive "Hello, World!"
 *
 * Each connection has exactly one operation in flight: a recv, or the send
 * that answers it. All new submissions of a batch of completions go to the
 * kernel in one io_uring_submit_and_wait(), which also waits for the next
 * completion. The listener uses multishot accept where the kernel has it
 * and re-armed single accepts otherwise.
 *
 * Prints READY when listening, serves until SIGTERM (then exits 0).
 */
#include "common.h"

#include <liburing.h>

#define BUF_SIZE 16384
#define RING_ENTRIES 4096

enum op { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3 };

struct conn {
	int fd;
	size_t out_off, out_len;
	struct http_scan scan;
	char in[BUF_SIZE];  /* HTTP requests */
	char out[BUF_SIZE]; /* echo data / HTTP responses */
};

static struct io_uring ring;
static int http_mode;
static int listen_fd;
static int multishot_accept = 1;

/* user_data: the conn pointer (8-byte aligned) with the op in the low bits. */
static uint64_t tag(struct conn *c, enum op op)
{
	return (uint64_t)(uintptr_t)c | (uint64_t)op;
}

static struct io_uring_sqe *get_sqe(void)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
	while (!sqe) {
		/* SQ full: hand the batch to the kernel and take a fresh entry. */
		io_uring_submit(&ring);
		sqe = io_uring_get_sqe(&ring);
	}
	return sqe;
}

static void arm_accept(void)
{
	struct io_uring_sqe *sqe = get_sqe();
	if (multishot_accept)
		io_uring_prep_multishot_accept(sqe, listen_fd, NULL, NULL, SOCK_CLOEXEC);
	else
		io_uring_prep_accept(sqe, listen_fd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data64(sqe, tag(NULL, OP_ACCEPT));
}

static void arm_recv(struct conn *c)
{
	struct io_uring_sqe *sqe = get_sqe();
	char *buf = http_mode ? c->in : c->out;
	io_uring_prep_recv(sqe, c->fd, buf, BUF_SIZE, 0);
	io_uring_sqe_set_data64(sqe, tag(c, OP_RECV));
}

static void arm_send(struct conn *c)
{
	struct io_uring_sqe *sqe = get_sqe();
	io_uring_prep_send(sqe, c->fd, c->out + c->out_off,
			   c->out_len - c->out_off, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(sqe, tag(c, OP_SEND));
}

static void conn_close(struct conn *c)
{
	close(c->fd); /* no operation of c is in flight here */
	free(c);
}

static void on_accept(int res, unsigned flags)
{
	if (res >= 0) {
		int one = 1;
		setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		struct conn *c = malloc(sizeof *c);
		if (!c) {
			close(res);
		} else {
			c->fd = res;
			c->out_off = c->out_len = 0;
			c->scan.matched = 0;
			arm_recv(c);
		}
	} else if (res == -EINVAL && multishot_accept) {
		multishot_accept = 0; /* kernel without multishot accept */
	} else if (res != -EINTR && res != -ECONNABORTED && res != -EAGAIN) {
		fprintf(stderr, "echo_uring: accept: %s\n", strerror(-res));
	}
	if (!multishot_accept || !(flags & IORING_CQE_F_MORE))
		arm_accept();
}

static void on_recv(struct conn *c, int res)
{
	if (res <= 0) {
		conn_close(c);
		return;
	}
	if (!http_mode) {
		c->out_off = 0;
		c->out_len = (size_t)res;
		arm_send(c);
		return;
	}
	size_t reqs = http_count_requests(&c->scan, c->in, (size_t)res);
	c->out_off = c->out_len = 0;
	for (size_t i = 0; i < reqs && c->out_len + HTTP_RESPONSE_LEN <= BUF_SIZE; i++) {
		memcpy(c->out + c->out_len, http_response, HTTP_RESPONSE_LEN);
		c->out_len += HTTP_RESPONSE_LEN;
	}
	if (c->out_len)
		arm_send(c);
	else
		arm_recv(c);
}

static void on_send(struct conn *c, int res)
{
	if (res < 0) {
		conn_close(c);
		return;
	}
	c->out_off += (size_t)res;
	if (c->out_off < c->out_len)
		arm_send(c); /* short send: the rest */
	else
		arm_recv(c);
}

static int ring_init(void)
{
	struct io_uring_params p;
	unsigned want[] = {
#if defined(IORING_SETUP_DEFER_TASKRUN) && defined(IORING_SETUP_SINGLE_ISSUER)
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
#endif
#ifdef IORING_SETUP_COOP_TASKRUN
		IORING_SETUP_COOP_TASKRUN,
#endif
		0,
	};
	int ret = -EINVAL;
	/* Newest flags first; older kernels reject them with -EINVAL. */
	for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
		memset(&p, 0, sizeof p);
		p.flags = want[i];
		ret = io_uring_queue_init_params(RING_ENTRIES, &ring, &p);
		if (ret == 0)
			return 0;
	}
	fprintf(stderr, "echo_uring: io_uring_queue_init: %s\n", strerror(-ret));
	return ret;
}

int main(int argc, char **argv)
{
	const char *bench = argc > 1 ? argv[1] : "";
	http_mode = server_mode(bench);
	if (http_mode < 0) {
		bench_na(bench, "echo_uring implements only echo_server and http_server");
		return 0;
	}
	long port = bench_arg(argc, argv, "port", 0);
	if (port <= 0 || port > 65535) {
		fprintf(stderr, "echo_uring: port=P is required\n");
		return 2;
	}
	install_sigterm();
	listen_fd = listen_loopback((int)port, 0);
	if (listen_fd < 0)
		return 1;
	if (ring_init() < 0) {
		/* io_uring may be disabled (sysctl, seccomp): say so, exit 0 */
		printf("NA %s io_uring unavailable\n", bench);
		return 0;
	}
	arm_accept();
	announce_ready();

	while (!stop_requested) {
		int ret = io_uring_submit_and_wait(&ring, 1);
		if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
			fprintf(stderr, "echo_uring: submit_and_wait: %s\n", strerror(-ret));
			return 1;
		}
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&ring, head, cqe) {
			uint64_t ud = io_uring_cqe_get_data64(cqe);
			struct conn *c = (struct conn *)(uintptr_t)(ud & ~(uint64_t)7);
			switch ((enum op)(ud & 7)) {
			case OP_ACCEPT: on_accept(cqe->res, cqe->flags); break;
			case OP_RECV: on_recv(c, cqe->res); break;
			case OP_SEND: on_send(c, cqe->res); break;
			}
			seen++;
		}
		io_uring_cq_advance(&ring, seen);
	}
	io_uring_queue_exit(&ring);
	return 0;
}
