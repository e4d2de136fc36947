/*
 * test_hook.c - libzokio_hook: plain libc calls in fibers park instead of
 * blocking, with POSIX semantics kept, and nothing changes outside fibers.
 *
 * This program links the shared libzokio and libzokio_hook, so every libc
 * call it makes goes through the hook, exactly as in a user's program.
 * Fiber tests run once per backend (_i = 0: io_uring, 1: epoll; io_uring
 * rounds are skipped where it cannot be set up).  Servers are on 127.0.0.1
 * only: a Zokio HTTP server in a forked child, and redis-server when it is
 * installed.  Every wait is bounded.
 */
#include "config.h"
#include "zokio.h"
#include "zokio_hook.h"

#include <check.h>
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef HAVE_CURL
#include <curl/curl.h>
#endif
#ifdef HAVE_HIREDIS
#include <hiredis/hiredis.h>
#endif

static const int backends[] = { ZK_BACKEND_IO_URING, ZK_BACKEND_EPOLL };
static const char *backend_names[] = { "io_uring", "epoll" };

/* ---- helpers --------------------------------------------------------------- */

static int64_t ms_since(int64_t t0)
{
	return (zk_now_ns() - t0) / 1000000;
}

/* Run fn(arg) as the first fiber of a runtime with the given backend and
 * number of workers; returns fn's result (NULL when the backend is
 * unavailable here, after saying so). */
static void *run_on(int bi, int workers, zk_fiber_fn fn, void *arg)
{
	zk_runtime_opts_t o;
	zk_runtime_opts_init(&o);
	o.workers = workers;
	o.backend = backends[bi];
	o.stack_size = 256 * 1024; /* libcurl and hiredis use more than 64 KiB */
	zk_runtime_t *rt;
	int rc = zk_runtime_create(&rt, &o);
	if (rc == -ENOSYS) {
		fprintf(stderr, "test_hook: %s unavailable here: skipped\n", backend_names[bi]);
		return NULL;
	}
	ck_assert_int_eq(rc, 0);
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn_ex(rt, &f, fn, arg, NULL), 0);
	ck_assert_int_eq(zk_runtime_run(rt), 0);
	void *res;
	ck_assert_int_eq(zk_join(f, &res), 0);
	ck_assert_int_eq(zk_runtime_destroy(rt), 0);
	return res;
}

/* Run fn(sv) on one worker of backend bi with a fresh Unix socket pair. */
static void run_on_socketpair(int bi, zk_fiber_fn fn)
{
	int sv[2];
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	run_on(bi, 1, fn, sv);
	close(sv[0]);
	close(sv[1]);
}

/* A fiber that counts 5 ms ticks while *run: proof that the worker kept
 * running fibers while another one "blocked". */
struct ticker {
	atomic_int run;
	atomic_int ticks;
	zk_fiber_t *f;
};

static void *ticker_main(void *arg)
{
	struct ticker *t = arg;
	while (atomic_load(&t->run)) {
		zk_sleep_ns(5 * 1000000);
		atomic_fetch_add(&t->ticks, 1);
	}
	return NULL;
}

static void ticker_start(struct ticker *t)
{
	atomic_store(&t->run, 1);
	atomic_store(&t->ticks, 0);
	ck_assert_int_eq(zk_spawn(&t->f, ticker_main, t), 0);
}

static int ticker_stop(struct ticker *t)
{
	atomic_store(&t->run, 0);
	zk_join(t->f, NULL);
	return atomic_load(&t->ticks);
}

static void set_rcvtimeo(int fd, int ms, int opt)
{
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
	ck_assert_int_eq(setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof(tv)), 0);
}

/* A blocking listening socket on 127.0.0.1; *port gets its port. */
static int listen_local(int *port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(fd, 0);
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(fd, 1024), 0);
	socklen_t len = sizeof(sa);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
	*port = ntohs(sa.sin_port);
	return fd;
}

static struct sockaddr_in local_addr(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	return sa;
}

/* A port nothing listens on (bound, then closed). */
static int dead_port(void)
{
	int port;
	int fd = listen_local(&port);
	close(fd);
	return port;
}

/* ---- a local HTTP server: Zokio's native API, in a forked child ----------- */

struct conn {
	int fd;
	int delay_ms;
};

static void *http_conn(void *arg)
{
	struct conn c = *(struct conn *)arg;
	free(arg);
	char buf[4096];
	size_t have = 0;
	for (;;) {
		char *end = have ? memmem(buf, have, "\r\n\r\n", 4) : NULL;
		if (!end) {
			if (have == sizeof(buf))
				break;
			ssize_t r = zk_recv(c.fd, buf + have, sizeof(buf) - have, 0);
			if (r <= 0)
				break;
			have += (size_t)r;
			continue;
		}
		char path[256] = "/";
		sscanf(buf, "GET %255s", path);
		if (c.delay_ms)
			zk_sleep_ns((int64_t)c.delay_ms * 1000000);
		char body[300], resp[512];
		int bl = snprintf(body, sizeof(body), "hello %s\n", path);
		int rl = snprintf(resp, sizeof(resp),
				  "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
				  bl, body);
		size_t off = 0;
		while (off < (size_t)rl) {
			ssize_t w = zk_send(c.fd, resp + off, (size_t)rl - off, 0);
			if (w <= 0)
				goto out;
			off += (size_t)w;
		}
		size_t used = (size_t)(end + 4 - buf);
		memmove(buf, buf + used, have - used);
		have -= used;
	}
out:
	zk_close(c.fd);
	return NULL;
}

struct server {
	int fd;
	int delay_ms;
};

static void *http_accept(void *arg)
{
	struct server *s = arg;
	for (;;) {
		int fd = zk_accept(s->fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue;
		struct conn *c = malloc(sizeof(*c));
		c->fd = fd;
		c->delay_ms = s->delay_ms;
		zk_spawn(NULL, http_conn, c);
	}
	return NULL;
}

/* Start the server (each response delayed by delay_ms); *port gets its
 * port.  Returns the child's pid. */
static pid_t http_server_start(int delay_ms, int *port)
{
	int fd = listen_local(port);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		signal(SIGTERM, SIG_DFL); /* not Check's handler, which kills the group */
		zk_runtime_opts_t o;
		zk_runtime_opts_init(&o);
		o.workers = 1;
		zk_runtime_t *rt;
		struct server s = { fd, delay_ms };
		if (zk_runtime_create(&rt, &o) || zk_spawn_ex(rt, NULL, http_accept, &s, NULL))
			_exit(1);
		zk_runtime_run(rt);
		_exit(0);
	}
	close(fd);
	return pid;
}

static void child_stop(pid_t pid)
{
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
}

/* ---- (a) POSIX semantics in fibers ---------------------------------------- */

struct pair {
	int a, b;            /* the two ends */
	int delay_ms;
	int64_t t0;
	ssize_t r;
	int err;
	char buf[64];
};

static void *write_later(void *arg)
{
	struct pair *p = arg;
	usleep((useconds_t)p->delay_ms * 1000); /* hooked: parks */
	ck_assert_int_eq(write(p->b, "ping", 4), 4);
	return NULL;
}

static void *blocking_read_main(void *arg)
{
	struct pair *p = arg;
	struct ticker t;
	ticker_start(&t);
	zk_fiber_t *w;
	ck_assert_int_eq(zk_spawn(&w, write_later, p), 0);
	int64_t t0 = zk_now_ns();
	memset(p->buf, 0, sizeof(p->buf));
	ssize_t r = read(p->a, p->buf, sizeof(p->buf));
	ck_assert_int_eq(r, 4);
	ck_assert_str_eq(p->buf, "ping");
	ck_assert_int_ge(ms_since(t0), p->delay_ms - 5);
	zk_join(w, NULL);
	ck_assert_msg(ticker_stop(&t) >= 3, "the worker was blocked in read()");
	/* The application's flags are untouched. */
	ck_assert_int_eq(fcntl(p->a, F_GETFL) & O_NONBLOCK, 0);
	return (void *)1;
}

START_TEST(test_blocking_read_on_socket_parks_the_fiber_not_the_worker)
{
	struct pair p = { .delay_ms = 50 };
	int sv[2];
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	p.a = sv[0];
	p.b = sv[1];
	run_on(_i, 1, blocking_read_main, &p);
	close(sv[0]);
	close(sv[1]);
}
END_TEST

START_TEST(test_blocking_read_on_pipe_parks_the_fiber_not_the_worker)
{
	struct pair p = { .delay_ms = 50 };
	int pf[2];
	ck_assert_int_eq(pipe(pf), 0);
	p.a = pf[0];
	p.b = pf[1];
	run_on(_i, 1, blocking_read_main, &p);
	close(pf[0]);
	close(pf[1]);
}
END_TEST

static void *nonblock_main(void *arg)
{
	int *fds = arg;
	char c;
	int64_t t0 = zk_now_ns();
	/* O_NONBLOCK set by the application: EAGAIN at once, as usual. */
	fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK);
	errno = 0;
	ck_assert_int_eq(read(fds[0], &c, 1), -1);
	ck_assert_int_eq(errno, EAGAIN);
	ck_assert_int_eq(recv(fds[0], &c, 1, 0), -1);
	ck_assert_int_eq(errno, EAGAIN);
	/* FIONBIO, the other way to say it. */
	int one = 1;
	ck_assert_int_eq(ioctl(fds[2], FIONBIO, &one), 0);
	ck_assert_int_eq(read(fds[2], &c, 1), -1);
	ck_assert_int_eq(errno, EAGAIN);
	/* MSG_DONTWAIT on a blocking socket. */
	ck_assert_int_eq(recv(fds[1], &c, 1, MSG_DONTWAIT), -1);
	ck_assert_int_eq(errno, EAGAIN);
	/* A non-blocking listener. */
	ck_assert_int_eq(accept(fds[3], NULL, NULL), -1);
	ck_assert_int_eq(errno, EAGAIN);
	ck_assert_int_lt(ms_since(t0), 100);
	return NULL;
}

START_TEST(test_nonblocking_fds_stay_nonblocking)
{
	int sv[2], pf[2], port;
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	ck_assert_int_eq(pipe(pf), 0);
	int l = listen_local(&port);
	fcntl(l, F_SETFL, O_NONBLOCK);
	int fds[4] = { sv[0], sv[1], pf[0], l };
	run_on(_i, 1, nonblock_main, fds);
	close(sv[0]);
	close(sv[1]);
	close(pf[0]);
	close(pf[1]);
	close(l);
}
END_TEST

static void *rcvtimeo_main(void *arg)
{
	int *sv = arg;
	struct ticker t;
	ticker_start(&t);
	set_rcvtimeo(sv[0], 100, SO_RCVTIMEO);
	char c;
	int64_t t0 = zk_now_ns();
	errno = 0;
	ck_assert_int_eq(read(sv[0], &c, 1), -1);
	ck_assert_int_eq(errno, EAGAIN);
	int64_t ms = ms_since(t0);
	ck_assert_msg(ms >= 95 && ms < 1000, "SO_RCVTIMEO of 100 ms took %lld ms", (long long)ms);
	ck_assert_msg(ticker_stop(&t) >= 5, "the worker was blocked");

	/* SO_SNDTIMEO on a send that cannot finish: the bytes moved so far,
	 * then EAGAIN once nothing more moves. */
	set_rcvtimeo(sv[1], 50, SO_SNDTIMEO);
	size_t big = 8 << 20;
	char *p = calloc(1, big);
	ssize_t r = send(sv[1], p, big, 0);
	ck_assert_int_gt(r, 0);
	ck_assert_int_lt(r, (ssize_t)big);
	t0 = zk_now_ns();
	ck_assert_int_eq(send(sv[1], p, big, 0), -1);
	ck_assert_int_eq(errno, EAGAIN);
	ck_assert_int_ge(ms_since(t0), 45);
	free(p);
	return NULL;
}

START_TEST(test_so_rcvtimeo_and_so_sndtimeo_give_eagain_after_the_timeout)
{
	run_on_socketpair(_i, rcvtimeo_main);
}
END_TEST

struct big {
	int fd;
	size_t n;
	ssize_t r;
};

static void *big_writer(void *arg)
{
	struct big *b = arg;
	char *p = malloc(b->n);
	for (size_t i = 0; i < b->n; i++)
		p[i] = (char)(i * 7);
	b->r = write(b->fd, p, b->n);
	free(p);
	return NULL;
}

static void *full_transfer_main(void *arg)
{
	int *sv = arg;
	struct big b = { sv[1], 4 << 20, 0 };
	zk_fiber_t *w;
	ck_assert_int_eq(zk_spawn(&w, big_writer, &b), 0);
	char *p = malloc(b.n);
	/* MSG_WAITALL: the whole length, though it arrives in pieces. */
	ssize_t r = recv(sv[0], p, b.n, MSG_WAITALL);
	ck_assert_int_eq(r, (ssize_t)b.n);
	zk_join(w, NULL);
	ck_assert_int_eq(b.r, (ssize_t)b.n); /* one blocking write moved it all */
	for (size_t i = 0; i < b.n; i++)
		if (p[i] != (char)(i * 7))
			ck_abort_msg("byte %zu differs", i);
	free(p);
	return NULL;
}

START_TEST(test_blocking_write_and_recv_waitall_move_every_byte)
{
	run_on_socketpair(_i, full_transfer_main);
}
END_TEST

static void *accept_one(void *arg)
{
	int *l = arg;
	int fd = accept(*l, NULL, NULL); /* blocking listener: parks */
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, "hi", 2), 2);
	close(fd);
	return NULL;
}

static void *connect_main(void *arg)
{
	(void)arg;
	int port;
	int l = listen_local(&port);
	zk_fiber_t *acc;
	ck_assert_int_eq(zk_spawn(&acc, accept_one, &l), 0);
	struct sockaddr_in sa = local_addr(port);

	/* Blocking connect: parks until connected; flags unchanged. */
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
	char buf[4] = { 0 };
	ck_assert_int_eq(read(fd, buf, sizeof(buf)), 2);
	ck_assert_int_eq(read(fd, buf, sizeof(buf)), 0);
	close(fd);
	zk_join(acc, NULL);

	/* Non-blocking connect: the EINPROGRESS dance is the caller's. */
	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	int r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	ck_assert(r == 0 || (r == -1 && errno == EINPROGRESS));
	struct pollfd p = { .fd = fd, .events = POLLOUT };
	ck_assert_int_eq(poll(&p, 1, 2000), 1);
	int err = -1;
	socklen_t len = sizeof(err);
	ck_assert_int_eq(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len), 0);
	ck_assert_int_eq(err, 0);
	close(fd);
	close(l);

	/* Refused: ECONNREFUSED, from a blocking and from a non-blocking one. */
	sa = local_addr(dead_port());
	fd = socket(AF_INET, SOCK_STREAM, 0);
	ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), -1);
	ck_assert_int_eq(errno, ECONNREFUSED);
	close(fd);
	return NULL;
}

START_TEST(test_connect_blocking_parks_and_nonblocking_keeps_einprogress)
{
	run_on(_i, 1, connect_main, NULL);
}
END_TEST

static void *errno_main(void *arg)
{
	char c;
	int pf[2];
	ck_assert_int_eq(pipe(pf), 0);
	ck_assert_int_eq(read(-1, &c, 1), -1);
	ck_assert_int_eq(errno, EBADF);
	ck_assert_int_eq(recv(pf[0], &c, 1, 0), -1);
	ck_assert_int_eq(errno, ENOTSOCK);
	ck_assert_int_eq(write(pf[0], "x", 1), -1);
	ck_assert_int_eq(errno, EBADF);
	ck_assert_int_eq(close(-1), -1);
	ck_assert_int_eq(errno, EBADF);
	close(pf[0]);
	close(pf[1]);
	return NULL;
}

START_TEST(test_errors_are_minus_one_and_errno)
{
	run_on(_i, 1, errno_main, NULL);
}
END_TEST

/* errno read anew, never through an address computed before a park (a
 * compiler may keep &errno across a call: see zokio.h on migration). */
static __attribute__((noinline)) int errno_now(void)
{
	return errno;
}

/* errno is set after the park, on the thread the fiber then runs on. */
static void *errno_migrating_fiber(void *arg)
{
	int *sv = arg;
	char c;
	int moved = 0, w = zk_worker_index();
	for (int i = 0; i < 10; i++) {
		if (read(sv[0], &c, 1) != -1 || errno_now() != EAGAIN)
			return (void *)1;
		moved += zk_worker_index() != w;
		w = zk_worker_index();
	}
	return NULL;
}

static void *errno_migration_main(void *arg)
{
	enum { N = 16 };
	int sv[N][2];
	zk_fiber_t *f[N];
	for (int i = 0; i < N; i++) {
		ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv[i]), 0);
		set_rcvtimeo(sv[i][0], 2, SO_RCVTIMEO);
		ck_assert_int_eq(zk_spawn(&f[i], errno_migrating_fiber, sv[i]), 0);
	}
	int bad = 0;
	for (int i = 0; i < N; i++) {
		void *r;
		zk_join(f[i], &r);
		bad += r != NULL;
		close(sv[i][0]);
		close(sv[i][1]);
	}
	ck_assert_int_eq(bad, 0);
	return NULL;
}

START_TEST(test_errno_is_right_after_resuming_on_another_worker)
{
	run_on(_i, 2, errno_migration_main, NULL);
}
END_TEST

static void *cancel_target(void *arg)
{
	int *sv = arg;
	char c;
	ssize_t r = read(sv[0], &c, 1);
	return (void *)(intptr_t)(r == -1 ? errno : 0);
}

static void *cancel_main(void *arg)
{
	int *sv = arg;
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn(&f, cancel_target, sv), 0);
	usleep(30000);
	zk_cancel(f);
	void *r;
	zk_join(f, &r);
	ck_assert_int_eq((int)(intptr_t)r, ECANCELED);
	/* The fiber's deadline: ETIMEDOUT. */
	zk_deadline_set(zk_now_ns() + 30 * 1000000);
	char c;
	ck_assert_int_eq(read(sv[0], &c, 1), -1);
	ck_assert_int_eq(errno, ETIMEDOUT);
	struct timespec ts = { 1, 0 }, rem = { 0, 0 };
	ck_assert_int_eq(nanosleep(&ts, &rem), -1);
	ck_assert_int_eq(errno, ETIMEDOUT);
	ck_assert(rem.tv_sec == 0 || rem.tv_sec == 1);
	zk_deadline_clear();
	return NULL;
}

START_TEST(test_cancel_and_fiber_deadline_end_a_parked_call)
{
	run_on_socketpair(_i, cancel_main);
}
END_TEST

static void *poll_main(void *arg)
{
	(void)arg;
	struct pair p2 = { .delay_ms = 30 };
	int sv1[2], sv2[2], sv3[2], sv4[2];
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv1), 0);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv4), 0);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv2), 0);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv3), 0);
	p2.a = sv2[0];
	p2.b = sv2[1];
	struct ticker t;
	ticker_start(&t);

	/* Several fds, in both directions: parks until one is ready.  sv4[1]
	 * is filled up so that it is not writable. */
	zk_fiber_t *w;
	ck_assert_int_eq(zk_spawn(&w, write_later, &p2), 0);
	int full = sv4[1];
	int sz = 4096;
	setsockopt(full, SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	fcntl(full, F_SETFL, O_NONBLOCK);
	char junk[4096] = { 0 };
	while (write(full, junk, sizeof(junk)) > 0)
		;
	fcntl(full, F_SETFL, 0);
	struct pollfd fds[3] = { { sv1[0], POLLIN, 0 }, { full, POLLOUT, 0 }, { sv2[0], POLLIN, 0 } };
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(poll(fds, 3, 2000), 1);
	ck_assert_int_ge(ms_since(t0), 20);
	ck_assert(fds[2].revents & POLLIN);
	ck_assert_int_eq(fds[0].revents, 0);
	ck_assert_int_eq(fds[1].revents, 0);
	zk_join(w, NULL);

	/* Timeouts: 0 after the time, also with no fds at all (a sleep). */
	t0 = zk_now_ns();
	ck_assert_int_eq(poll(fds, 2, 40), 0);
	ck_assert_int_ge(ms_since(t0), 38);
	t0 = zk_now_ns();
	ck_assert_int_eq(poll(NULL, 0, 30), 0);
	ck_assert_int_ge(ms_since(t0), 28);

	/* select, the same. */
	fd_set rd;
	FD_ZERO(&rd);
	FD_SET(sv1[0], &rd);
	struct timeval tv = { 0, 40000 };
	t0 = zk_now_ns();
	ck_assert_int_eq(select(sv1[0] + 1, &rd, NULL, NULL, &tv), 0);
	ck_assert_int_ge(ms_since(t0), 38);
	ck_assert(!FD_ISSET(sv1[0], &rd));
	p2.a = sv3[0];
	p2.b = sv3[1];
	ck_assert_int_eq(zk_spawn(&w, write_later, &p2), 0);
	FD_ZERO(&rd);
	FD_SET(sv1[0], &rd);
	FD_SET(sv3[0], &rd);
	tv.tv_sec = 2;
	tv.tv_usec = 0;
	ck_assert_int_eq(select(sv3[0] + 1, &rd, NULL, NULL, &tv), 1);
	ck_assert(FD_ISSET(sv3[0], &rd));
	ck_assert(!FD_ISSET(sv1[0], &rd));
	zk_join(w, NULL);

	/* ppoll with a timespec. */
	struct timespec ts = { 0, 30 * 1000000 };
	t0 = zk_now_ns();
	ck_assert_int_eq(ppoll(fds, 1, &ts, NULL), 0);
	ck_assert_int_ge(ms_since(t0), 28);

	ck_assert_msg(ticker_stop(&t) >= 10, "the worker was blocked in poll/select");
	close(sv1[0]);
	close(sv1[1]);
	close(sv2[0]);
	close(sv2[1]);
	close(sv3[0]);
	close(sv3[1]);
	close(sv4[0]);
	close(sv4[1]);
	return NULL;
}

START_TEST(test_poll_select_ppoll_park_until_ready_or_timeout)
{
	run_on(_i, 1, poll_main, NULL);
}
END_TEST

/* Open fds of this process, from /proc/self/fd. */
static int open_fds(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	ck_assert_ptr_nonnull(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

struct later {
	int fd;
	int delay_ms;
};

static void *write_byte_later(void *arg)
{
	struct later *l = arg;
	usleep((useconds_t)l->delay_ms * 1000);
	ck_assert_int_eq(write(l->fd, "x", 1), 1);
	return NULL;
}

/* Park in poll({a, b}) until a fiber writes to which[1]; check revents. */
static void poll_two_until(int a, int b, int *which)
{
	struct later l = { which[1], 20 };
	zk_fiber_t *w;
	ck_assert_int_eq(zk_spawn(&w, write_byte_later, &l), 0);
	struct pollfd p[2] = { { a, POLLIN, 0 }, { b, POLLIN, 0 } };
	ck_assert_int_eq(poll(p, 2, 5000), 1); /* 5 s: a bound, never reached */
	ck_assert_int_eq(p[0].revents, a == which[0] ? POLLIN : 0);
	ck_assert_int_eq(p[1].revents, b == which[0] ? POLLIN : 0);
	char c;
	ck_assert_int_eq(read(which[0], &c, 1), 1);
	zk_join(w, NULL);
}

static void *poll_set_fiber(void *arg)
{
	int (*pf)[2] = arg; /* three pipes */
	int base = open_fds();
	/* The same fds again and again: one set, kept. */
	for (int i = 0; i < 20; i++)
		poll_two_until(pf[0][0], pf[1][0], pf[i % 2]);
	ck_assert_int_eq(open_fds(), base + 1);
	/* Other fds: the set follows; the one dropped no longer counts. */
	poll_two_until(pf[0][0], pf[2][0], pf[2]);
	ck_assert_int_eq(open_fds(), base + 1);

	/* A number closed behind the hook's back (dup2 over it, not close())
	 * and so reused for another file: the new file is watched. */
	int old = pf[1][0];
	int np[2];
	ck_assert_int_eq(pipe(np), 0);
	ck_assert_int_eq(dup2(np[0], old), old);
	close(np[0]);
	np[0] = old;
	poll_two_until(pf[0][0], old, np);

	/* The same, but the old file stays open elsewhere, still registered
	 * in the set: its readiness is not the new file's. */
	int keep = dup(old);
	ck_assert_int_ge(keep, 0);
	int np2[2];
	ck_assert_int_eq(pipe(np2), 0);
	ck_assert_int_eq(dup2(np2[0], old), old);
	close(np2[0]);
	np2[0] = old;
	ck_assert_int_eq(write(np[1], "s", 1), 1); /* the old file is readable */
	poll_two_until(pf[0][0], old, np2);        /* yet only the new one counts */
	close(keep);
	close(np[1]);
	close(old);
	close(np2[1]);
	pf[1][0] = -1;
	return NULL;
}

static void *poll_set_main(void *arg)
{
	int pf[3][2];
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(pipe(pf[i]), 0);
	int before = open_fds();
	zk_fiber_t *f;
	ck_assert_int_eq(zk_spawn(&f, poll_set_fiber, pf), 0);
	zk_join(f, NULL);
	/* The fiber's set went with it. */
	ck_assert_int_eq(open_fds(), before - 1); /* pf[1][0] was closed in it */
	for (int i = 0; i < 3; i++) {
		if (pf[i][0] >= 0)
			close(pf[i][0]);
		close(pf[i][1]);
	}
	return NULL;
}

START_TEST(test_poll_keeps_one_set_per_fiber_and_follows_fd_changes)
{
	run_on(_i, 1, poll_set_main, NULL);
}
END_TEST

/* ---- ppoll with a signal mask ---------------------------------------------- */

static volatile sig_atomic_t usr1_seen;

static void on_usr1(int sig)
{
	(void)sig;
	usr1_seen++;
}

struct kicker {
	pthread_t thread;
	int delay_ms;
};

static void *kick_later(void *arg)
{
	struct kicker *k = arg;
	usleep((useconds_t)k->delay_ms * 1000);
	pthread_kill(k->thread, SIGUSR1); /* pending: the thread blocks it */
	return NULL;
}

static void *ppoll_mask_main(void *arg)
{
	(void)arg;
	struct sigaction sa, old_sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1; /* no SA_RESTART */
	sigemptyset(&sa.sa_mask);
	ck_assert_int_eq(sigaction(SIGUSR1, &sa, &old_sa), 0);
	sigset_t usr1, orig, during;
	sigemptyset(&usr1);
	sigaddset(&usr1, SIGUSR1);
	ck_assert_int_eq(pthread_sigmask(SIG_BLOCK, &usr1, &orig), 0);
	during = orig;
	sigdelset(&during, SIGUSR1);
	int pf[2];
	ck_assert_int_eq(pipe(pf), 0);
	struct pollfd p = { pf[0], POLLIN, 0 };
	struct timespec five = { 5, 0 }, short_ts = { 0, 30 * 1000000 };

	/* Already pending when ppoll starts: handled at once, EINTR. */
	usr1_seen = 0;
	pthread_kill(pthread_self(), SIGUSR1);
	ck_assert_int_eq(usr1_seen, 0);
	errno = 0;
	ck_assert_int_eq(ppoll(&p, 1, &five, &during), -1);
	ck_assert_int_eq(errno, EINTR);
	ck_assert_int_eq(usr1_seen, 1);

	/* Arriving while the fiber is parked: the worker runs the kicker
	 * (a fiber on the same, only worker), then the ppoll ends with EINTR. */
	struct ticker t;
	ticker_start(&t);
	struct kicker k = { pthread_self(), 30 };
	zk_fiber_t *kf;
	ck_assert_int_eq(zk_spawn(&kf, kick_later, &k), 0);
	errno = 0;
	ck_assert_int_eq(ppoll(&p, 1, &five, &during), -1);
	ck_assert_int_eq(errno, EINTR);
	ck_assert_int_eq(usr1_seen, 2);
	zk_join(kf, NULL);
	ck_assert_msg(ticker_stop(&t) >= 1, "the worker was blocked in ppoll");

	/* The thread's own mask is back: SIGUSR1 blocked again. */
	sigset_t now;
	ck_assert_int_eq(pthread_sigmask(SIG_SETMASK, NULL, &now), 0);
	ck_assert_int_eq(sigismember(&now, SIGUSR1), 1);

	/* Data instead of a signal; and a timeout. */
	struct later l = { pf[1], 20 };
	zk_fiber_t *w;
	ck_assert_int_eq(zk_spawn(&w, write_byte_later, &l), 0);
	ck_assert_int_eq(ppoll(&p, 1, &five, &during), 1);
	ck_assert(p.revents & POLLIN);
	zk_join(w, NULL);
	char c;
	ck_assert_int_eq(read(pf[0], &c, 1), 1);
	int64_t t0 = zk_now_ns();
	ck_assert_int_eq(ppoll(&p, 1, &short_ts, &during), 0);
	ck_assert_int_ge(ms_since(t0), 28);
	ck_assert_int_eq(usr1_seen, 2);

	close(pf[0]);
	close(pf[1]);
	pthread_sigmask(SIG_SETMASK, &orig, NULL);
	sigaction(SIGUSR1, &old_sa, NULL);
	return NULL;
}

START_TEST(test_ppoll_with_a_mask_parks_and_lets_its_signals_interrupt)
{
	run_on(_i, 1, ppoll_mask_main, NULL);
}
END_TEST

static void *sleeper(void *arg)
{
	int kind = (int)(intptr_t)arg;
	struct timespec ts = { 0, 100 * 1000000 };
	switch (kind % 4) {
	case 0:
		return (void *)(intptr_t)nanosleep(&ts, NULL);
	case 1:
		return (void *)(intptr_t)usleep(100000);
	case 2:
		return (void *)(intptr_t)clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
	default: {
		struct timespec now;
		clock_gettime(CLOCK_REALTIME, &now);
		now.tv_nsec += 100 * 1000000;
		if (now.tv_nsec >= 1000000000) {
			now.tv_sec++;
			now.tv_nsec -= 1000000000;
		}
		return (void *)(intptr_t)clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &now, NULL);
	}
	}
}

static void *sleeps_main(void *arg)
{
	enum { N = 20 };
	zk_fiber_t *f[N];
	int64_t t0 = zk_now_ns();
	for (int i = 0; i < N; i++)
		ck_assert_int_eq(zk_spawn(&f[i], sleeper, (void *)(intptr_t)i), 0);
	for (int i = 0; i < N; i++) {
		void *r;
		zk_join(f[i], &r);
		ck_assert_ptr_null(r);
	}
	int64_t ms = ms_since(t0);
	/* In series they take 2 s: half of that still proves overlap, and
	 * leaves a loaded or sanitized run room to be slow. */
	ck_assert_msg(ms >= 95 && ms < 1000, "20 concurrent 100 ms sleeps took %lld ms", (long long)ms);
	ck_assert_int_eq(sleep(0), 0);
	return NULL;
}

START_TEST(test_sleeps_park_concurrently)
{
	run_on(_i, 1, sleeps_main, NULL);
}
END_TEST

static void *off_main(void *arg)
{
	(void)arg;
	ck_assert_int_eq(zk_hook_enabled(), 1);
	struct ticker t;
	ticker_start(&t);
	usleep(20000); /* let the ticker run once */
	ck_assert_int_eq(zk_hook_enable(0), 1);
	ck_assert_int_eq(zk_hook_enabled(), 0);
	int before = atomic_load(&t.ticks);
	usleep(60000); /* really blocks the worker */
	ck_assert_int_eq(atomic_load(&t.ticks), before);
	ck_assert_int_eq(zk_hook_enable(1), 0);
	usleep(60000); /* parks */
	ck_assert_int_gt(atomic_load(&t.ticks), before + 3);
	ticker_stop(&t);
	return NULL;
}

START_TEST(test_per_fiber_switch_turns_hooking_off)
{
	run_on(_i, 1, off_main, NULL);
}
END_TEST

static void *files_main(void *arg)
{
	char path[] = "/tmp/zk_hook_XXXXXX";
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	unlink(path);
	ck_assert_int_eq(pwrite(fd, "hello", 5, 10), 5);
	ck_assert_int_eq(fsync(fd), 0);
	char buf[8] = { 0 };
	ck_assert_int_eq(pread(fd, buf, 5, 10), 5);
	ck_assert_str_eq(buf, "hello");
	ck_assert_int_eq(pread(fd, buf, 5, -1), -1);
	ck_assert_int_eq(errno, EINVAL);
	ck_assert_int_eq(write(fd, "abc", 3), 3); /* a regular file: libc's write */
	ck_assert_int_eq(lseek(fd, 0, SEEK_SET), 0);
	ck_assert_int_eq(read(fd, buf, 3), 3);
	close(fd);
	int pf[2];
	ck_assert_int_eq(pipe(pf), 0);
	ck_assert_int_eq(pread(pf[0], buf, 1, 0), -1);
	ck_assert_int_eq(errno, ESPIPE);
	close(pf[0]);
	close(pf[1]);

	/* getaddrinfo runs on the blocking pool. */
	struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *res;
	ck_assert_int_eq(getaddrinfo("127.0.0.1", "80", &hints, &res), 0);
	ck_assert_int_eq(res->ai_family, AF_INET);
	ck_assert_int_eq(ntohs(((struct sockaddr_in *)res->ai_addr)->sin_port), 80);
	freeaddrinfo(res);
	return NULL;
}

START_TEST(test_files_and_getaddrinfo_in_a_fiber)
{
	run_on(_i, 1, files_main, NULL);
}
END_TEST

/* ---- pipes: blocking writes larger than the free space ------------------- */

/* Fill the pipe's write end w until only one page is free (a pipe counts
 * pages), plus extra bytes in a last, partly used page when extra > 0.
 * Returns the number of bytes written. */
static size_t pipe_fill(int w, size_t extra)
{
	int cap = fcntl(w, F_GETPIPE_SZ);
	ck_assert_int_ge(cap, 2 * 4096);
	char page[4096];
	memset(page, 'f', sizeof(page));
	size_t n = 0;
	for (int i = 0; i < cap / 4096 - 1; i++) { /* fits: never parks */
		ck_assert_int_eq(write(w, page, sizeof(page)), (ssize_t)sizeof(page));
		n += sizeof(page);
	}
	if (extra) {
		ck_assert_int_eq(write(w, page, extra), (ssize_t)extra);
		n += extra;
	}
	return n;
}

struct pipe_job {
	int fd;
	size_t n;      /* bytes per write */
	int count;     /* writes */
	char tag;      /* 0: a pattern by position; else every byte is tag */
	ssize_t r;     /* the last write's result */
};

static char pattern_at(size_t i)
{
	return (char)(i * 13 + 1);
}

static void *pipe_writer(void *arg)
{
	struct pipe_job *j = arg;
	char *p = malloc(j->n);
	for (size_t i = 0; i < j->n; i++)
		p[i] = j->tag ? j->tag : pattern_at(i);
	for (int k = 0; k < j->count; k++) {
		j->r = write(j->fd, p, j->n); /* blocking fd, not enough room: parks */
		if (j->r != (ssize_t)j->n)
			break;
	}
	free(p);
	return NULL;
}

/* Read exactly n bytes (hooked reads: park while the pipe is empty). */
static void read_all(int fd, char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		ck_assert_int_gt(r, 0);
		got += (size_t)r;
	}
}

struct pipe_reader_job {
	int fd;
	size_t n;
	char *buf;
};

static void *pipe_reader(void *arg)
{
	struct pipe_reader_job *j = arg;
	read_all(j->fd, j->buf, j->n);
	return NULL;
}

static void *pipe_big_write_main(void *arg)
{
	int *pf = arg;
	size_t filled = pipe_fill(pf[1], 0);
	/* 1 MiB into one free page: the write must park for the rest, or the
	 * worker - the only one - blocks and the reader below never runs. */
	struct pipe_job wj = { pf[1], 1 << 20, 1, 0, 0 };
	zk_fiber_t *w, *r;
	ck_assert_int_eq(zk_spawn(&w, pipe_writer, &wj), 0);
	zk_yield(); /* the writer moves one page and parks */
	struct pipe_reader_job rj = { pf[0], filled + wj.n, malloc(filled + wj.n) };
	ck_assert_int_eq(zk_spawn(&r, pipe_reader, &rj), 0);
	zk_join(r, NULL);
	zk_join(w, NULL);
	ck_assert_int_eq(wj.r, (ssize_t)wj.n); /* one blocking write moved it all */
	for (size_t i = 0; i < filled; i++)
		ck_assert_int_eq(rj.buf[i], 'f');
	for (size_t i = 0; i < wj.n; i++)
		if (rj.buf[filled + i] != pattern_at(i))
			ck_abort_msg("byte %zu differs", i);
	free(rj.buf);
	/* The application's flags are untouched. */
	ck_assert_int_eq(fcntl(pf[1], F_GETFL) & O_NONBLOCK, 0);
	return NULL;
}

START_TEST(test_blocking_pipe_write_larger_than_free_space_parks)
{
	int pf[2];
	ck_assert_int_eq(pipe(pf), 0);
	run_on(_i, 1, pipe_big_write_main, pf);
	close(pf[0]);
	close(pf[1]);
}
END_TEST

/* Writers of PIPE_BUF bytes into a pipe with less room than that: each
 * write still arrives in one piece. */
static void *pipe_atomic_main(void *arg)
{
	enum { K = 8 };
	int *pf = arg;
	size_t filled = pipe_fill(pf[1], 100); /* the last page has 3996 bytes free */
	struct pipe_job a = { pf[1], PIPE_BUF, K, 'a', 0 }, b = { pf[1], PIPE_BUF, K, 'b', 0 };
	zk_fiber_t *wa, *wb, *r;
	ck_assert_int_eq(zk_spawn(&wa, pipe_writer, &a), 0);
	ck_assert_int_eq(zk_spawn(&wb, pipe_writer, &b), 0);
	zk_yield();
	size_t n = filled + 2 * K * PIPE_BUF;
	struct pipe_reader_job rj = { pf[0], n, malloc(n) };
	ck_assert_int_eq(zk_spawn(&r, pipe_reader, &rj), 0);
	zk_join(r, NULL);
	zk_join(wa, NULL);
	zk_join(wb, NULL);
	ck_assert_int_eq(a.r, PIPE_BUF);
	ck_assert_int_eq(b.r, PIPE_BUF);
	/* After the filler: runs of one letter, each a whole number of writes. */
	size_t i = filled;
	while (i < n) {
		size_t run = 1;
		while (i + run < n && rj.buf[i + run] == rj.buf[i])
			run++;
		ck_assert(rj.buf[i] == 'a' || rj.buf[i] == 'b');
		ck_assert_msg(run % PIPE_BUF == 0, "a run of %zu '%c' at %zu: a write was split", run,
			      rj.buf[i], i - filled);
		i += run;
	}
	free(rj.buf);
	return NULL;
}

START_TEST(test_blocking_pipe_writes_up_to_pipe_buf_stay_atomic)
{
	int pf[2];
	ck_assert_int_eq(pipe(pf), 0);
	run_on(_i, 1, pipe_atomic_main, pf);
	close(pf[0]);
	close(pf[1]);
}
END_TEST

/* ---- accept racing a plain thread on one listener ------------------------ */

/* A fiber and a plain thread both accept in a loop on one blocking
 * listener; a connector (another plain thread) makes one connection per
 * round.  Whoever loses a round must go back to waiting: a fiber whose
 * accept blocked its worker instead would leave the worker unable to
 * answer the connector's ping (an echo fiber on the same worker) until
 * the next connection.  The ping gets 10 s: a generous bound, not a
 * timing assumption. */
struct race {
	int l;
	int ping[2];          /* connector <-> echo fiber */
	int done[2];          /* the connector says it has finished */
	int port, rounds;
	atomic_int accepted, by_fiber, stop, fiber_out, thread_out;
	int blocked;
};

static void race_took_one(struct race *r, int fd, int fiber)
{
	close(fd);
	if (atomic_load(&r->stop))
		return;
	atomic_fetch_add(&r->accepted, 1);
	if (fiber)
		atomic_fetch_add(&r->by_fiber, 1);
}

/* The thread looks before it takes, with a varying pause in between, so
 * that its accept lands at all points of the fiber's own look-then-take
 * (where the fiber's accept would lose and, if libc's, block the worker). */
static void *race_thread_acceptor(void *arg)
{
	struct race *r = arg;
	unsigned seed = 7;
	while (!atomic_load(&r->stop)) {
		struct pollfd p = { r->l, POLLIN, 0 };
		if (poll(&p, 1, 100) != 1) /* a plain thread: libc's calls */
			continue;
		usleep((useconds_t)(rand_r(&seed) % 40));
		int fd = accept(r->l, NULL, NULL); /* blocks when the fiber won */
		if (fd < 0)
			break;
		race_took_one(r, fd, 0);
	}
	atomic_store(&r->thread_out, 1);
	return NULL;
}

static void *race_fiber_acceptor(void *arg)
{
	struct race *r = arg;
	while (!atomic_load(&r->stop)) {
		int fd = accept(r->l, NULL, NULL); /* hooked */
		if (fd < 0)
			break;
		race_took_one(r, fd, 1);
	}
	atomic_store(&r->fiber_out, 1);
	return NULL;
}

static void *race_echo(void *arg)
{
	struct race *r = arg;
	char c;
	while (read(r->ping[0], &c, 1) == 1 && c != 'q')
		if (write(r->ping[0], &c, 1) != 1)
			break;
	return NULL;
}

static void race_connect(struct race *r)
{
	struct sockaddr_in sa = local_addr(r->port);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
		close(fd);
	else if (fd >= 0)
		close(fd);
}

/* Plain thread: the rounds, then the connections that let both acceptors
 * see stop. */
static void *race_connector(void *arg)
{
	struct race *r = arg;
	for (int i = 0; i < r->rounds && !r->blocked; i++) {
		race_connect(r);
		for (int k = 0; k < 10000 && atomic_load(&r->accepted) <= i; k++)
			usleep(1000);
		char c = 'p';
		struct pollfd p = { r->ping[1], POLLIN, 0 };
		if (write(r->ping[1], &c, 1) != 1 || poll(&p, 1, 10000) != 1 ||
		    read(r->ping[1], &c, 1) != 1)
			r->blocked = i + 1;
	}
	atomic_store(&r->stop, 1);
	for (int k = 0; k < 100 && !(atomic_load(&r->fiber_out) && atomic_load(&r->thread_out)); k++) {
		race_connect(r);
		usleep(10000);
	}
	ssize_t w = write(r->done[1], "x", 1);
	(void)w;
	return NULL;
}

static void *accept_race_main(void *arg)
{
	struct race *r = arg;
	zk_fiber_t *fa, *echo;
	ck_assert_int_eq(zk_spawn(&echo, race_echo, r), 0);
	ck_assert_int_eq(zk_spawn(&fa, race_fiber_acceptor, r), 0);
	pthread_t ta, tc;
	ck_assert_int_eq(pthread_create(&ta, NULL, race_thread_acceptor, r), 0);
	ck_assert_int_eq(pthread_create(&tc, NULL, race_connector, r), 0);
	char c;
	ck_assert_int_eq(read(r->done[0], &c, 1), 1); /* parks until the connector ends */
	ck_assert_int_eq(write(r->ping[1], "q", 1), 1);
	zk_join(echo, NULL);
	zk_join(fa, NULL);
	pthread_join(tc, NULL); /* both threads have ended by now */
	pthread_join(ta, NULL);
	return (void *)1;
}

START_TEST(test_accept_racing_a_plain_thread_never_blocks_the_worker)
{
	struct race r;
	memset(&r, 0, sizeof(r));
	r.rounds = 1000;
	r.l = listen_local(&r.port);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, r.ping), 0);
	ck_assert_int_eq(pipe(r.done), 0);
	void *ran = run_on(_i, 1, accept_race_main, &r);
	close(r.l);
	close(r.ping[0]);
	close(r.ping[1]);
	close(r.done[0]);
	close(r.done[1]);
	if (!ran)
		return;
	fprintf(stderr, "test_hook: %s: accept race: %d of %d connections taken by the fiber\n",
		backend_names[_i], atomic_load(&r.by_fiber), atomic_load(&r.accepted));
	ck_assert_msg(!r.blocked, "round %d: the worker was blocked in accept", r.blocked);
	ck_assert_int_eq(atomic_load(&r.fiber_out), 1);
	ck_assert_int_eq(atomic_load(&r.thread_out), 1);
}
END_TEST

/* ---- pass-through on plain threads ----------------------------------------- */

static void *thread_writer(void *arg)
{
	int fd = *(int *)arg;
	struct timespec ts = { 0, 30 * 1000000 };
	nanosleep(&ts, NULL);
	ssize_t r = write(fd, "x", 1);
	(void)r;
	return NULL;
}

START_TEST(test_plain_threads_get_libc_unchanged)
{
	ck_assert_int_eq(zk_hook_enabled(), 0);
	ck_assert_int_eq(zk_hook_enable(1), -EPERM);
	int pf[2];
	ck_assert_int_eq(pipe(pf), 0);
	pthread_t th;
	/* t0 before the writer starts its 30 ms sleep: taken after, a slow
	 * (sanitized, loaded) start could make the wait look short */
	int64_t t0 = zk_now_ns();
	pthread_create(&th, NULL, thread_writer, &pf[1]);
	char c;
	ck_assert_int_eq(read(pf[0], &c, 1), 1); /* blocks the thread */
	ck_assert_int_ge(ms_since(t0), 25);
	pthread_join(th, NULL);
	int sv[2];
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	set_rcvtimeo(sv[0], 50, SO_RCVTIMEO);
	t0 = zk_now_ns();
	ck_assert_int_eq(recv(sv[0], &c, 1, 0), -1);
	ck_assert_int_eq(errno, EAGAIN);
	ck_assert_int_ge(ms_since(t0), 45);
	struct pollfd p = { sv[0], POLLIN, 0 };
	t0 = zk_now_ns();
	ck_assert_int_eq(poll(&p, 1, 30), 0);
	ck_assert_int_ge(ms_since(t0), 28);
	ck_assert_int_eq(usleep(1000), 0);
	close(sv[0]);
	close(sv[1]);
	close(pf[0]);
	close(pf[1]);
}
END_TEST

/* ---- (b) libcurl, unmodified ------------------------------------------------ */

#ifdef HAVE_CURL
struct fetch {
	int port, id;
	int ok;
	char body[128];
	size_t len;
};

static size_t on_body(char *p, size_t sz, size_t n, void *ud)
{
	struct fetch *f = ud;
	size_t k = sz * n;
	if (f->len + k < sizeof(f->body)) {
		memcpy(f->body + f->len, p, k);
		f->len += k;
	}
	return k;
}

static void *curl_fetch(void *arg)
{
	struct fetch *f = arg;
	char url[64];
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/r%d", f->port, f->id);
	CURL *c = curl_easy_init();
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, f);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
	CURLcode rc = curl_easy_perform(c);
	long code = 0;
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
	curl_easy_cleanup(c);
	char want[64];
	snprintf(want, sizeof(want), "hello /r%d\n", f->id);
	f->ok = rc == CURLE_OK && code == 200 && f->len == strlen(want) &&
		memcmp(f->body, want, f->len) == 0;
	if (!f->ok)
		fprintf(stderr, "test_hook: curl %d: %s, HTTP %ld, body '%.*s'\n", f->id,
			curl_easy_strerror(rc), code, (int)f->len, f->body);
	return NULL;
}

struct curl_run {
	int port, n, hook;
	int64_t ms;
	int ok;
};

static void *curl_fiber(void *arg)
{
	struct fetch *f = arg;
	zk_hook_enable(f->ok); /* ok carries the switch in */
	f->ok = 0;
	return curl_fetch(f);
}

static void *curl_main(void *arg)
{
	struct curl_run *cr = arg;
	struct fetch *f = calloc((size_t)cr->n, sizeof(*f));
	zk_fiber_t **h = calloc((size_t)cr->n, sizeof(*h));
	int64_t t0 = zk_now_ns();
	for (int i = 0; i < cr->n; i++) {
		f[i].port = cr->port;
		f[i].id = i;
		f[i].ok = cr->hook;
		ck_assert_int_eq(zk_spawn(&h[i], curl_fiber, &f[i]), 0);
	}
	cr->ok = 0;
	for (int i = 0; i < cr->n; i++) {
		zk_join(h[i], NULL);
		cr->ok += f[i].ok;
	}
	cr->ms = ms_since(t0);
	free(f);
	free(h);
	return (void *)1;
}

START_TEST(test_curl_easy_from_twenty_fibers_on_one_worker_runs_concurrently)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
	int port;
	pid_t srv = http_server_start(100, &port);
	struct curl_run cr = { port, 20, 1, 0, 0 };
	void *ran = run_on(_i, 1, curl_main, &cr);
	child_stop(srv);
	if (!ran)
		return;
	fprintf(stderr, "test_hook: %s: 20 curl requests (100 ms each) on one worker: %lld ms\n",
		backend_names[_i], (long long)cr.ms);
	ck_assert_int_eq(cr.ok, 20);
	ck_assert_msg(cr.ms < 1000, "20 requests took %lld ms: not concurrent (2 s in series)",
		      (long long)cr.ms);
	curl_global_cleanup();
}
END_TEST

START_TEST(test_curl_with_hooking_off_is_serial)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
	int port;
	pid_t srv = http_server_start(100, &port);
	struct curl_run cr = { port, 5, 0, 0, 0 };
	run_on(1, 1, curl_main, &cr);
	child_stop(srv);
	ck_assert_int_eq(cr.ok, 5);
	ck_assert_msg(cr.ms >= 490, "5 requests with hooking off took only %lld ms", (long long)cr.ms);
	curl_global_cleanup();
}
END_TEST
#endif

/* ---- (c) hiredis, unmodified, against redis-server ------------------------ */

#ifdef HAVE_HIREDIS
static const char *redis_server_path(void)
{
	static const char *paths[] = { "/usr/bin/redis-server", "/usr/local/bin/redis-server",
				       "/usr/sbin/redis-server" };
	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
		if (access(paths[i], X_OK) == 0)
			return paths[i];
	return NULL;
}

static pid_t redis_start(int *port)
{
	const char *bin = redis_server_path();
	if (!bin)
		return 0;
	*port = dead_port();
	char ports[16];
	snprintf(ports, sizeof(ports), "%d", *port);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		signal(SIGTERM, SIG_DFL);
		int null = open("/dev/null", O_RDWR);
		dup2(null, 1);
		dup2(null, 2);
		execl(bin, bin, "--port", ports, "--bind", "127.0.0.1", "--save", "", "--appendonly",
		      "no", "--daemonize", "no", "--protected-mode", "no", (char *)NULL);
		_exit(127);
	}
	/* Ready once it accepts a connection (plain thread: plain calls). */
	struct sockaddr_in sa = local_addr(*port);
	for (int i = 0; i < 500; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		int r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
		close(fd);
		if (r == 0)
			return pid;
		usleep(10000);
	}
	child_stop(pid);
	ck_abort_msg("redis-server did not start on port %d", *port);
	return 0;
}

struct rjob {
	int port, id, ok;
};

static void *redis_client(void *arg)
{
	struct rjob *j = arg;
	redisContext *c = redisConnect("127.0.0.1", j->port);
	if (!c || c->err) {
		fprintf(stderr, "test_hook: redisConnect: %s\n", c ? c->errstr : "no memory");
		return NULL;
	}
	char key[32], val[32];
	snprintf(key, sizeof(key), "k%d", j->id);
	snprintf(val, sizeof(val), "value-%d", j->id);
	redisReply *r = redisCommand(c, "SET %s %s", key, val);
	int ok = r && r->type == REDIS_REPLY_STATUS;
	freeReplyObject(r);
	r = redisCommand(c, "GET %s", key);
	ok = ok && r && r->type == REDIS_REPLY_STRING && strcmp(r->str, val) == 0;
	freeReplyObject(r);
	/* Blocks this client 100 ms in the server, not the server itself. */
	r = redisCommand(c, "BLPOP empty%d 0.1", j->id);
	ok = ok && r && r->type == REDIS_REPLY_NIL;
	freeReplyObject(r);
	redisFree(c);
	j->ok = ok;
	return NULL;
}

struct redis_run {
	int port;
	int ok;
	int64_t ms;
	int pushed_ok;
};

static void *redis_pusher(void *arg)
{
	struct rjob *j = arg;
	usleep(50000);
	redisContext *c = redisConnect("127.0.0.1", j->port);
	redisReply *r = redisCommand(c, "RPUSH queue hello");
	j->ok = r && r->type == REDIS_REPLY_INTEGER;
	freeReplyObject(r);
	redisFree(c);
	return NULL;
}

static void *redis_main(void *arg)
{
	enum { N = 20 };
	struct redis_run *rr = arg;
	struct rjob jobs[N];
	zk_fiber_t *h[N];
	int64_t t0 = zk_now_ns();
	for (int i = 0; i < N; i++) {
		jobs[i] = (struct rjob){ rr->port, i, 0 };
		ck_assert_int_eq(zk_spawn(&h[i], redis_client, &jobs[i]), 0);
	}
	rr->ok = 0;
	for (int i = 0; i < N; i++) {
		zk_join(h[i], NULL);
		rr->ok += jobs[i].ok;
	}
	rr->ms = ms_since(t0);

	/* One fiber waits in BLPOP while another, on the same worker, pushes. */
	struct rjob pj = { rr->port, 0, 0 };
	zk_fiber_t *p;
	ck_assert_int_eq(zk_spawn(&p, redis_pusher, &pj), 0);
	redisContext *c = redisConnect("127.0.0.1", rr->port);
	ck_assert(c && !c->err);
	redisReply *r = redisCommand(c, "BLPOP queue 5");
	rr->pushed_ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
			strcmp(r->element[1]->str, "hello") == 0;
	freeReplyObject(r);
	redisFree(c);
	zk_join(p, NULL);
	rr->pushed_ok = rr->pushed_ok && pj.ok;
	return (void *)1;
}

START_TEST(test_hiredis_from_twenty_fibers_on_one_worker_runs_concurrently)
{
	int port;
	pid_t srv = redis_start(&port);
	if (!srv) {
		fprintf(stderr, "test_hook: redis-server not installed (Debian: redis-server): "
				"hiredis test skipped\n");
		return;
	}
	struct redis_run rr = { port, 0, 0, 0 };
	void *ran = run_on(_i, 1, redis_main, &rr);
	child_stop(srv);
	if (!ran)
		return;
	fprintf(stderr, "test_hook: %s: 20 hiredis clients (BLPOP 100 ms each) on one worker: %lld ms\n",
		backend_names[_i], (long long)rr.ms);
	ck_assert_int_eq(rr.ok, 20);
	ck_assert_msg(rr.ms < 1000, "20 clients took %lld ms: not concurrent (2 s in series)",
		      (long long)rr.ms);
	ck_assert(rr.pushed_ok);
}
END_TEST
#endif

/* ---- (d) LD_PRELOAD into programs that never heard of Zokio --------------- */

struct outcome {
	int status;
	char out[8192];
	size_t len;
};

static void slurp(int fd, struct outcome *o)
{
	lseek(fd, 0, SEEK_SET);
	ssize_t r;
	o->len = 0;
	while ((r = read(fd, o->out + o->len, sizeof(o->out) - 1 - o->len)) > 0)
		o->len += (size_t)r;
	o->out[o->len] = 0;
	close(fd);
}

/* Run argv with stdout and stderr in one file, with or without the hook
 * preloaded. */
static void run_prog(char *const argv[], int preload, struct outcome *o)
{
	char path[] = "/tmp/zk_hook_out_XXXXXX";
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	unlink(path);
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		signal(SIGTERM, SIG_DFL);
		dup2(fd, 1);
		dup2(fd, 2);
		setenv("LD_LIBRARY_PATH", ZK_BUILD_LIBDIR, 1);
		if (preload)
			setenv("LD_PRELOAD", ZK_BUILD_LIBDIR "/libzokio_hook.so", 1);
		else
			unsetenv("LD_PRELOAD");
		execvp(argv[0], argv);
		_exit(127);
	}
	int st;
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	o->status = st;
	slurp(fd, o);
}

static void same_with_and_without(char *const argv[], const char *expect)
{
	static struct outcome plain, hooked;
	run_prog(argv, 0, &plain);
	run_prog(argv, 1, &hooked);
	ck_assert_msg(plain.status == hooked.status, "%s: status %#x without the hook, %#x with it",
		      argv[0], plain.status, hooked.status);
	ck_assert_msg(plain.len == hooked.len && memcmp(plain.out, hooked.out, plain.len) == 0,
		      "%s: output differs:\n--- without\n%s\n--- with\n%s", argv[0], plain.out,
		      hooked.out);
	if (expect)
		ck_assert_str_eq(hooked.out, expect);
}

START_TEST(test_preloaded_into_system_programs_changes_nothing)
{
#ifdef ZK_ASAN
	fprintf(stderr, "test_hook: AddressSanitizer build: an instrumented libzokio_hook.so cannot "
			"be preloaded into uninstrumented programs; preload test skipped\n");
	return;
#endif
	char *sh[] = { "sh", "-c",
		       "printf 'line1\\nline2\\n' | cat; echo to-stderr >&2; sleep 0.05; "
		       "head -c 100000 /dev/zero | wc -c; exit 7",
		       NULL };
	same_with_and_without(sh, "line1\nline2\nto-stderr\n100000\n");
	char *cat[] = { "cat", "/etc/hostname", "/nonexistent-file", NULL };
	same_with_and_without(cat, NULL);
	if (access("/usr/bin/curl", X_OK) == 0) {
		int port;
		pid_t srv = http_server_start(0, &port);
		char url[64];
		snprintf(url, sizeof(url), "http://127.0.0.1:%d/preload", port);
		char *curl[] = { "curl", "-sS", "--max-time", "10", url, NULL };
		same_with_and_without(curl, "hello /preload\n");
		snprintf(url, sizeof(url), "http://127.0.0.1:%d/", dead_port());
		char *refused[] = { "curl", "-s", "--max-time", "10", url, NULL };
		same_with_and_without(refused, "");
		child_stop(srv);
	} else {
		fprintf(stderr, "test_hook: no curl binary: its preload check skipped\n");
	}
	/* A Zokio program with the runtime linked in statically: the hook
	 * cannot see that runtime, so it changes nothing - silently. */
	char *pipeline[] = { ZK_BUILD_LIBDIR "/../examples/pipeline", "2000", "2", NULL };
	if (access(pipeline[0], X_OK) == 0) {
		static struct outcome o;
		run_prog(pipeline, 1, &o);
		ck_assert_msg(WIFEXITED(o.status) && WEXITSTATUS(o.status) == 0, "pipeline: status %#x",
			      o.status);
		ck_assert_msg(strncmp(o.out, "sink: 1000 items", 16) == 0 && !strstr(o.out, "libzokio_hook"),
			      "pipeline with the hook preloaded:\n%s", o.out);
	}
}
END_TEST

static Suite *hook_suite(void)
{
	Suite *s = suite_create("hook");
	TCase *tc = tcase_create("posix");
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_plain_threads_get_libc_unchanged);
	tcase_add_loop_test(tc, test_blocking_read_on_socket_parks_the_fiber_not_the_worker, 0, 2);
	tcase_add_loop_test(tc, test_blocking_read_on_pipe_parks_the_fiber_not_the_worker, 0, 2);
	tcase_add_loop_test(tc, test_nonblocking_fds_stay_nonblocking, 0, 2);
	tcase_add_loop_test(tc, test_so_rcvtimeo_and_so_sndtimeo_give_eagain_after_the_timeout, 0, 2);
	tcase_add_loop_test(tc, test_blocking_write_and_recv_waitall_move_every_byte, 0, 2);
	tcase_add_loop_test(tc, test_connect_blocking_parks_and_nonblocking_keeps_einprogress, 0, 2);
	tcase_add_loop_test(tc, test_errors_are_minus_one_and_errno, 0, 2);
	tcase_add_loop_test(tc, test_errno_is_right_after_resuming_on_another_worker, 0, 2);
	tcase_add_loop_test(tc, test_cancel_and_fiber_deadline_end_a_parked_call, 0, 2);
	tcase_add_loop_test(tc, test_poll_select_ppoll_park_until_ready_or_timeout, 0, 2);
	tcase_add_loop_test(tc, test_poll_keeps_one_set_per_fiber_and_follows_fd_changes, 0, 2);
	tcase_add_loop_test(tc, test_ppoll_with_a_mask_parks_and_lets_its_signals_interrupt, 0, 2);
	tcase_add_loop_test(tc, test_sleeps_park_concurrently, 0, 2);
	tcase_add_loop_test(tc, test_per_fiber_switch_turns_hooking_off, 0, 2);
	tcase_add_loop_test(tc, test_files_and_getaddrinfo_in_a_fiber, 0, 2);
	tcase_add_loop_test(tc, test_blocking_pipe_write_larger_than_free_space_parks, 0, 2);
	tcase_add_loop_test(tc, test_blocking_pipe_writes_up_to_pipe_buf_stay_atomic, 0, 2);
	tcase_add_loop_test(tc, test_accept_racing_a_plain_thread_never_blocks_the_worker, 0, 2);
	suite_add_tcase(s, tc);
	TCase *libs = tcase_create("libraries");
	tcase_set_timeout(libs, 60);
#ifdef HAVE_CURL
	tcase_add_loop_test(libs, test_curl_easy_from_twenty_fibers_on_one_worker_runs_concurrently, 0, 2);
	tcase_add_test(libs, test_curl_with_hooking_off_is_serial);
#else
	fprintf(stderr, "test_hook: built without libcurl (Debian: libcurl4-openssl-dev): curl tests skipped\n");
#endif
#ifdef HAVE_HIREDIS
	tcase_add_loop_test(libs, test_hiredis_from_twenty_fibers_on_one_worker_runs_concurrently, 0, 2);
#else
	fprintf(stderr, "test_hook: built without hiredis (Debian: libhiredis-dev): hiredis test skipped\n");
#endif
	tcase_add_test(libs, test_preloaded_into_system_programs_changes_nothing);
	suite_add_tcase(s, libs);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(hook_suite());
	srunner_run_all(sr, CK_NORMAL);
	int failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
