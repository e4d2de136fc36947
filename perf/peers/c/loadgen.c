/*
 * perf/peers/c/loadgen.c - our echo load generator: C connections to
 * 127.0.0.1:port, each ping-pongs one fixed-size message at a time (send,
 * wait for the whole echo, send again) for a warm-up and then a measured
 * window.
 *
 *     loadgen echo port=P [conns=1] [size=64] [warmup_ms=1000]
 *                         [duration_ms=3000] [server_pid=PID] [quick=1]
 *
 * Prints, for the measured window only:
 *     RESULT echo rt_per_sec <round trips per second> rt/s
 *     RESULT echo p50_us / p99_us <latency of one round trip> us
 *     RESULT echo server_cpu_us_per_rt <server user+system CPU / round trip> us
 *       (only with server_pid=, read from /proc/PID/stat at the window's
 *       two ends, so it covers all the server's threads and nothing of ours)
 *     RESULT echo client_cpu_us_per_rt <our own user+system CPU / round trip> us
 *       (the same window; on loopback a send also delivers the data into
 *       the peer's socket, so work moves between the two figures and
 *       their sum is the whole cost of a round trip)
 *
 * One thread, no allocation after setup. Two engines (engine=0|1):
 *   epoll     level-triggered; per round trip one write, one read and a
 *             share of one epoll_wait - about what an epoll server pays;
 *   io_uring  (default where built with LOADGEN_URING) all sends and recvs
 *             of a batch of completions go to the kernel in one
 *             io_uring_enter, successful sends post no completion; this
 *             keeps the generator cheaper per round trip than the servers
 *             it drives, so that with the two on separate CPUs the server
 *             is the bottleneck.
 * Latencies go into a fixed histogram of 100 ns buckets (1 ms buckets above
 * 10 ms), so recording is O(1); percentiles are bucket upper edges.
 */
#include "../../bench.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>

#define MAX_SIZE 65536
#define FINE_NS 100                /* fine bucket width */
#define FINE_BUCKETS 100000        /* fine range: 0 .. 10 ms */
#define COARSE_NS 1000000          /* coarse bucket width: 1 ms */
#define COARSE_BUCKETS 10000       /* coarse range: 10 ms .. ~10 s */

struct conn {
	int fd;
	size_t got;        /* bytes of the current echo received */
	uint64_t sent_ns;  /* when the current message went out */
};

static uint32_t fine_hist[FINE_BUCKETS];
static uint32_t coarse_hist[COARSE_BUCKETS + 1];
static uint64_t samples;

static void record(uint64_t ns)
{
	if (ns < (uint64_t)FINE_NS * FINE_BUCKETS) {
		fine_hist[ns / FINE_NS]++;
	} else {
		uint64_t b = ns / COARSE_NS;
		coarse_hist[b > COARSE_BUCKETS ? COARSE_BUCKETS : b]++;
	}
	samples++;
}

/* Upper edge (in µs) of the bucket holding the p-th percentile sample. */
static double hist_percentile_us(double p)
{
	if (samples == 0)
		return 0;
	uint64_t rank = (uint64_t)((p / 100.0) * (double)samples + 0.999999);
	if (rank < 1)
		rank = 1;
	uint64_t seen = 0;
	for (size_t i = 0; i < FINE_BUCKETS; i++) {
		seen += fine_hist[i];
		if (seen >= rank)
			return (double)((i + 1) * FINE_NS) / 1000.0;
	}
	for (size_t i = 0; i <= COARSE_BUCKETS; i++) {
		seen += coarse_hist[i];
		if (seen >= rank)
			return (double)((i + 1) * (uint64_t)COARSE_NS) / 1000.0;
	}
	return 0;
}

/* utime+stime of a process in clock ticks, or -1. */
static long long proc_cpu_ticks(long pid)
{
	char path[64], buf[1024];
	snprintf(path, sizeof path, "/proc/%ld/stat", pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	size_t n = fread(buf, 1, sizeof buf - 1, f);
	fclose(f);
	buf[n] = 0;
	/* Fields after the ")" that ends comm; utime and stime are the 14th
	 * and 15th fields of the line, i.e. the 12th and 13th after it. */
	char *p = strrchr(buf, ')');
	if (!p)
		return -1;
	unsigned long long ut, st;
	if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
		   &ut, &st) != 2)
		return -1;
	return (long long)(ut + st);
}

static char msg[MAX_SIZE];
static char sink[MAX_SIZE];

static int send_msg(struct conn *c, size_t size)
{
	c->got = 0;
	c->sent_ns = bench_now_ns();
	size_t off = 0;
	while (off < size) {
		ssize_t n = write(c->fd, msg + off, size - off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				continue; /* cannot happen with one small message in flight */
			return -1;
		}
		off += (size_t)n;
	}
	return 0;
}

static int connect_all(struct conn *cs, long conns, int port)
{
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	for (long i = 0; i < conns; i++) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			perror("loadgen: socket");
			return -1;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		/* Blocking connect: on loopback it completes as soon as the
		 * server's backlog holds it, whether or not it has accepted. */
		if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
			fprintf(stderr, "loadgen: connect #%ld: %s\n", i, strerror(errno));
			close(fd);
			return -1;
		}
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
		cs[i].fd = fd;
	}
	return 0;
}

static void raise_nofile(long need)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)need) {
		rl.rlim_cur = rl.rlim_max < (rlim_t)need ? rl.rlim_max : (rlim_t)need;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}


/* ---- the run: shared by both engines ----------------------------------- */

static struct conn *cs;
static long nconns;
static size_t msg_size;
static long server_pid;
static uint64_t measure_at, end_at, t_begin, t_end, rts;
static int measuring;
static long long cpu_begin = -1;
static int64_t self_cpu_begin = -1;

/* This process's user+system CPU time in ns, or -1. */
static int64_t self_cpu_ns(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts) != 0)
		return -1;
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
static long dead;

/* Called once per loop turn; starts the window after warm-up, returns 1
 * when the window is over. */
static int tick(uint64_t now)
{
	if (!measuring && now >= measure_at) {
		measuring = 1;
		t_begin = now;
		if (server_pid)
			cpu_begin = proc_cpu_ticks(server_pid);
		self_cpu_begin = self_cpu_ns();
	}
	if (now >= end_at) {
		t_end = now;
		return 1;
	}
	return 0;
}

/* r bytes of echo arrived on c: 1 = the whole message is back (send the
 * next), 0 = partial, -1 = protocol error. */
static int on_bytes(struct conn *c, size_t r, uint64_t now)
{
	c->got += r;
	if (c->got < msg_size)
		return 0;
	if (c->got > msg_size) {
		fprintf(stderr, "loadgen: server sent more than it got\n");
		return -1;
	}
	if (measuring) {
		record(now - c->sent_ns);
		rts++;
	}
	return 1;
}

/* A connection failed: report it; fatal once all are gone. */
static int on_dead(struct conn *c, int err)
{
	fprintf(stderr, "loadgen: connection %ld %s\n", (long)(c - cs),
		err == 0 ? "closed by server" : strerror(err));
	return ++dead == nconns ? -1 : 0;
}

/* ---- engine: level-triggered epoll, one read + one write per round trip */

static int run_epoll(void)
{
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0) {
		perror("loadgen: epoll_create1");
		return -1;
	}
	for (long i = 0; i < nconns; i++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &cs[i] };
		if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev) < 0) {
			perror("loadgen: epoll_ctl");
			return -1;
		}
	}
	for (long i = 0; i < nconns; i++) {
		if (send_msg(&cs[i], msg_size) < 0) {
			perror("loadgen: write");
			return -1;
		}
	}
	struct epoll_event evs[1024];
	for (;;) {
		int n = epoll_wait(ep, evs, 1024, 100);
		if (n < 0 && errno != EINTR) {
			perror("loadgen: epoll_wait");
			return -1;
		}
		uint64_t now = bench_now_ns();
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			ssize_t r = read(c->fd, sink, sizeof sink);
			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (r <= 0) {
				epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
				if (on_dead(c, r == 0 ? 0 : errno) < 0)
					return -1;
				continue;
			}
			int done = on_bytes(c, (size_t)r, now);
			if (done < 0)
				return -1;
			if (done && send_msg(c, msg_size) < 0) {
				perror("loadgen: write");
				return -1;
			}
		}
		if (tick(now))
			return 0;
	}
}

/* ---- engine: io_uring, every send and recv of a batch in one syscall --- */

#ifdef LOADGEN_URING
#include <liburing.h>

static struct io_uring ring;
static unsigned send_flags; /* IOSQE_CQE_SKIP_SUCCESS where supported */

enum { OP_SEND = 1, OP_RECV = 2 };

static struct io_uring_sqe *get_sqe(void)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
	while (!sqe) {
		io_uring_submit(&ring);
		sqe = io_uring_get_sqe(&ring);
	}
	return sqe;
}

/* Queue the next message and the recv for its echo. The send time is
 * taken when the batch is prepared, a few hundred ns before it is
 * submitted at the end of the batch. */
static void queue_round_trip(struct conn *c, uint64_t now)
{
	c->got = 0;
	c->sent_ns = now;
	struct io_uring_sqe *sqe = get_sqe();
	io_uring_prep_send(sqe, c->fd, msg, msg_size, MSG_NOSIGNAL);
	io_uring_sqe_set_flags(sqe, send_flags);
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | OP_SEND);
	sqe = get_sqe();
	io_uring_prep_recv(sqe, c->fd, sink, sizeof sink, 0);
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | OP_RECV);
}

static void queue_recv(struct conn *c)
{
	struct io_uring_sqe *sqe = get_sqe();
	io_uring_prep_recv(sqe, c->fd, sink, sizeof sink, 0);
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)c | OP_RECV);
}

/* 0 on success, -1 when io_uring cannot be used here (caller falls back). */
static int uring_init(void)
{
	unsigned entries = 64;
	while (entries < 2 * (unsigned long)nconns + 16 && entries < 32768)
		entries *= 2;
	unsigned want[] = {
#if defined(IORING_SETUP_DEFER_TASKRUN) && defined(IORING_SETUP_SINGLE_ISSUER)
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
#endif
#ifdef IORING_SETUP_COOP_TASKRUN
		IORING_SETUP_COOP_TASKRUN,
#endif
		0,
	};
	for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
		struct io_uring_params p;
		memset(&p, 0, sizeof p);
		p.flags = want[i];
		if (io_uring_queue_init_params(entries, &ring, &p) == 0) {
#ifdef IORING_FEAT_CQE_SKIP
			if (p.features & IORING_FEAT_CQE_SKIP)
				send_flags = IOSQE_CQE_SKIP_SUCCESS;
#endif
			return 0;
		}
	}
	return -1;
}

static int run_uring(void)
{
	uint64_t now = bench_now_ns();
	for (long i = 0; i < nconns; i++)
		queue_round_trip(&cs[i], now);
	struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = 100000000 };
	for (;;) {
		struct io_uring_cqe *cqe;
		int ret = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, NULL);
		if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN &&
		    ret != -EBUSY) {
			fprintf(stderr, "loadgen: io_uring wait: %s\n", strerror(-ret));
			return -1;
		}
		now = bench_now_ns();
		unsigned head, seen = 0;
		io_uring_for_each_cqe(&ring, head, cqe) {
			uint64_t ud = io_uring_cqe_get_data64(cqe);
			struct conn *c = (struct conn *)(uintptr_t)(ud & ~(uint64_t)3);
			int res = cqe->res;
			seen++;
			if (c->fd < 0)
				continue; /* already dead */
			if ((ud & 3) == OP_SEND) {
				if (res >= 0 && (size_t)res == msg_size)
					continue;
				/* A failed or short send: the ping-pong cannot go on. */
				if (on_dead(c, res < 0 ? -res : EPROTO) < 0)
					return -1;
				c->fd = -1;
				continue;
			}
			if (res <= 0) {
				if (on_dead(c, -res) < 0)
					return -1;
				c->fd = -1;
				continue;
			}
			int done = on_bytes(c, (size_t)res, now);
			if (done < 0)
				return -1;
			if (done)
				queue_round_trip(c, now);
			else
				queue_recv(c);
		}
		io_uring_cq_advance(&ring, seen);
		if (tick(now))
			return 0;
	}
}
#endif /* LOADGEN_URING */

int main(int argc, char **argv)
{
	const char *bench = argc > 1 ? argv[1] : "";
	if (strcmp(bench, "echo") != 0) {
		bench_na(bench, "loadgen implements only echo");
		return 0;
	}
	int quick = bench_arg(argc, argv, "quick", 0) != 0;
	long port = bench_arg(argc, argv, "port", 0);
	long size = bench_arg(argc, argv, "size", 64);
	long warmup_ms = bench_arg(argc, argv, "warmup_ms", quick ? 100 : 1000);
	long duration_ms = bench_arg(argc, argv, "duration_ms", quick ? 300 : 3000);
	/* engine=0: epoll; engine=1 (default where built): io_uring */
	long engine = bench_arg(argc, argv, "engine", 1);
	(void)engine;
	nconns = bench_arg(argc, argv, "conns", 1);
	server_pid = bench_arg(argc, argv, "server_pid", 0);
	if (port <= 0 || port > 65535 || nconns < 1 || size < 1 || size > MAX_SIZE ||
	    duration_ms < 1 || warmup_ms < 0) {
		fprintf(stderr, "loadgen: bad arguments (port=P required; conns>=1; "
				"1<=size<=%d; duration_ms>=1)\n", MAX_SIZE);
		return 2;
	}
	msg_size = (size_t)size;
	signal(SIGPIPE, SIG_IGN);
	raise_nofile(nconns + 64);
	memset(msg, 'x', msg_size);

	cs = calloc((size_t)nconns, sizeof *cs);
	if (!cs || connect_all(cs, nconns, (int)port) < 0)
		return 1;

	uint64_t start = bench_now_ns();
	measure_at = start + (uint64_t)warmup_ms * 1000000u;
	end_at = measure_at + (uint64_t)duration_ms * 1000000u;
	tick(start);

	int ret;
#ifdef LOADGEN_URING
	if (engine && uring_init() == 0) {
		fprintf(stderr, "loadgen: engine io_uring\n");
		ret = run_uring();
	} else
#endif
	{
		fprintf(stderr, "loadgen: engine epoll\n");
		ret = run_epoll();
	}
	if (ret < 0)
		return 1;
	long long cpu_end = server_pid ? proc_cpu_ticks(server_pid) : -1;
	int64_t self_cpu_end = self_cpu_ns();
	if (dead)
		fprintf(stderr, "loadgen: %ld of %ld connections were lost\n", dead, nconns);

	double secs = (double)(t_end - t_begin) / 1e9;
	bench_result("echo", "rt_per_sec", (double)rts / secs, "rt/s");
	bench_result("echo", "p50_us", hist_percentile_us(50), "us");
	bench_result("echo", "p99_us", hist_percentile_us(99), "us");
	if (server_pid && cpu_begin >= 0 && cpu_end >= 0 && rts > 0) {
		double cpu_us = (double)(cpu_end - cpu_begin) * 1e6 /
				(double)sysconf(_SC_CLK_TCK);
		bench_result("echo", "server_cpu_us_per_rt", cpu_us / (double)rts, "us");
	}
	if (self_cpu_begin >= 0 && self_cpu_end >= 0 && rts > 0)
		bench_result("echo", "client_cpu_us_per_rt",
			     (double)(self_cpu_end - self_cpu_begin) / 1e3 / (double)rts, "us");
	return rts > 0 ? 0 : 1;
}
