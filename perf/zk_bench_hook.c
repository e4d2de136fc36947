/*
 * perf/zk_bench_hook.c - an unmodified blocking client library (libcurl's
 * easy interface) from 1,000 fibers on one worker through libzokio_hook,
 * against the same library with one OS thread per client.
 *
 *     zk_bench_hook hook_http [mode=fibers|threads] [n=1000] [reqs=20]
 *                             [delay_ms=0] [quick=1]
 *
 * n clients each make reqs keep-alive GET requests (one easy handle per
 * client) to a local HTTP server: a Zokio server in a forked child on its
 * own core, the same for both modes, whose responses wait delay_ms.
 * Prints requests_per_sec, the client process's memory growth (peak RSS
 * minus RSS before the clients started, per client too) and the client's
 * CPU time (user + system, all its threads, not the server's) per request:
 * on a machine where the server or the load of others decides the
 * request rate, that is where a cheaper hook shows.
 * Fibers: one worker, 256 KiB stacks (only touched pages count).  Threads:
 * default pthread attributes, as a program that knows nothing of Zokio
 * would create them.
 */
#include "config.h"
#include "bench.h"
#include "zokio.h"
#include "zokio_hook.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define BENCH "hook_http"

static int port, reqs;
static atomic_long ok_reqs, bad_reqs;

/* ---- the server (native Zokio API, in a child process) ------------------ */

static int delay_ms;

static void *serve_conn(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[4096];
	size_t have = 0;
	static const char resp[] =
		"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!";
	for (;;) {
		char *end = have >= 4 ? memmem(buf, have, "\r\n\r\n", 4) : NULL;
		if (!end) {
			if (have == sizeof(buf))
				break;
			ssize_t r = zk_recv(fd, buf + have, sizeof(buf) - have, 0);
			if (r <= 0)
				break;
			have += (size_t)r;
			continue;
		}
		if (delay_ms)
			zk_sleep_ns((int64_t)delay_ms * 1000000);
		if (zk_send(fd, resp, sizeof(resp) - 1, 0) != (ssize_t)sizeof(resp) - 1)
			break;
		size_t used = (size_t)(end + 4 - buf);
		memmove(buf, buf + used, have - used);
		have -= used;
	}
	zk_close(fd);
	return NULL;
}

static void *serve(void *arg)
{
	int l = (int)(intptr_t)arg;
	for (;;) {
		int fd = zk_accept(l, NULL, NULL, SOCK_CLOEXEC);
		if (fd >= 0)
			zk_spawn(NULL, serve_conn, (void *)(intptr_t)fd);
		else if (fd != -EINTR)
			zk_sleep_ns(1000000); /* EMFILE and friends: back off */
	}
	return NULL;
}

static pid_t server_start(void)
{
	int l = zk_tcp_listen("127.0.0.1", 0, 4096, 0);
	if (l < 0)
		return -1;
	struct sockaddr_in sa;
	socklen_t len = sizeof(sa);
	getsockname(l, (struct sockaddr *)&sa, &len);
	port = ntohs(sa.sin_port);
	pid_t pid = fork();
	if (pid == 0) {
		zk_runtime_opts_t o;
		zk_runtime_opts_init(&o);
		o.workers = 1;
		zk_runtime_t *rt;
		if (zk_runtime_create(&rt, &o) || zk_spawn_ex(rt, NULL, serve, (void *)(intptr_t)l, NULL))
			_exit(1);
		zk_runtime_run(rt);
		_exit(0);
	}
	close(l);
	return pid;
}

/* ---- the client: plain blocking libcurl ------------------------------------- */

static size_t sink(char *p, size_t sz, size_t n, void *ud)
{
	size_t *got = ud;
	*got += sz * n;
	return sz * n;
}

static void *client(void *arg)
{
	char url[64];
	snprintf(url, sizeof(url), "http://127.0.0.1:%d/", port);
	CURL *c = curl_easy_init();
	size_t got = 0;
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &got);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 60000L);
	for (int i = 0; i < reqs; i++) {
		got = 0;
		long code = 0;
		CURLcode rc = curl_easy_perform(c);
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
		if (rc == CURLE_OK && code == 200 && got == 13) {
			atomic_fetch_add(&ok_reqs, 1);
		} else {
			if (atomic_fetch_add(&bad_reqs, 1) < 3)
				fprintf(stderr, "zk_bench_hook: request failed: %s (HTTP %ld)\n",
					curl_easy_strerror(rc), code);
		}
	}
	curl_easy_cleanup(c);
	return NULL;
}

struct fibers {
	int n;
};

static void *fibers_main(void *arg)
{
	struct fibers *fs = arg;
	if (!zk_hook_enabled()) { /* libzokio_hook missing, or ZOKIO_HOOK=0 */
		fprintf(stderr, "zk_bench_hook: libc calls are not hooked in fibers\n");
		fs->n = 0;
		return NULL;
	}
	zk_fiber_t **h = calloc((size_t)fs->n, sizeof(*h));
	for (int i = 0; i < fs->n; i++)
		if (zk_spawn(&h[i], client, NULL) != 0)
			h[i] = NULL;
	for (int i = 0; i < fs->n; i++)
		if (h[i])
			zk_join(h[i], NULL);
	free(h);
	return NULL;
}

/* User + system CPU time of this process (all threads), in microseconds. */
static double cpu_us(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e6 +
	       (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static long status_kb(const char *key)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long v = -1;
	size_t k = strlen(key);
	while (f && fgets(line, sizeof(line), f))
		if (strncmp(line, key, k) == 0)
			v = strtol(line + k + 1, NULL, 10);
	if (f)
		fclose(f);
	return v;
}

static void raise_nofile(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], BENCH) != 0) {
		bench_na(argc > 1 ? argv[1] : "?", "zk_bench_hook implements only " BENCH);
		return 0;
	}
	int quick = (int)bench_arg(argc, argv, "quick", 0);
	int n = (int)bench_arg(argc, argv, "n", quick ? 100 : 1000);
	reqs = (int)bench_arg(argc, argv, "reqs", quick ? 5 : 20);
	delay_ms = (int)bench_arg(argc, argv, "delay_ms", 0);
	const char *mode = "fibers";
	for (int i = 2; i < argc; i++)
		if (strncmp(argv[i], "mode=", 5) == 0)
			mode = argv[i] + 5;
	int threads = strcmp(mode, "threads") == 0;
	if (!threads && strcmp(mode, "fibers") != 0) {
		fprintf(stderr, "zk_bench_hook: mode=fibers or mode=threads\n");
		return 2;
	}
	raise_nofile();
	signal(SIGPIPE, SIG_IGN);
	pid_t srv = server_start(); /* before any thread exists */
	if (srv < 0) {
		bench_na(BENCH, "cannot listen on 127.0.0.1");
		return 0;
	}
	curl_global_init(CURL_GLOBAL_DEFAULT);
	zk_runtime_t *rt = NULL;
	struct fibers fs = { n };
	if (!threads) {
		zk_runtime_opts_t o;
		zk_runtime_opts_init(&o);
		o.workers = 1;
		o.stack_size = 256 * 1024;
		if (zk_runtime_create(&rt, &o) != 0) {
			bench_na(BENCH, "zk_runtime_create failed");
			return 0;
		}
	}
	long rss0 = status_kb("VmRSS:");
	double cpu0 = cpu_us();
	uint64_t t0 = bench_now_ns();
	if (threads) {
		pthread_t *t = calloc((size_t)n, sizeof(*t));
		int started = 0;
		for (int i = 0; i < n; i++)
			if (pthread_create(&t[i], NULL, client, NULL) == 0)
				started++;
			else
				t[i] = 0;
		if (started < n)
			fprintf(stderr, "zk_bench_hook: only %d of %d threads started\n", started, n);
		for (int i = 0; i < n; i++)
			if (t[i])
				pthread_join(t[i], NULL);
		free(t);
	} else {
		zk_spawn_ex(rt, NULL, fibers_main, &fs, NULL);
		zk_runtime_run(rt);
	}
	double secs = (double)(bench_now_ns() - t0) / 1e9;
	double cpu = cpu_us() - cpu0;
	long hwm = status_kb("VmHWM:");
	if (rt)
		zk_runtime_destroy(rt);
	kill(srv, SIGTERM);
	waitpid(srv, NULL, 0);
	long ok = atomic_load(&ok_reqs), bad = atomic_load(&bad_reqs);
	fprintf(stderr, "zk_bench_hook: %s: %d clients x %d requests (delay %d ms): %ld ok, %ld failed, "
			"%.3f s, hooked=%s\n",
		mode, n, reqs, delay_ms, ok, bad, secs, threads ? "no (threads)" : "yes");
	if (!threads && fs.n == 0) {
		bench_na(BENCH, "libzokio_hook not active");
		return 0;
	}
	if (bad) {
		bench_na(BENCH, "requests failed");
		return 0;
	}
	bench_result(BENCH, "requests_per_sec", (double)ok / secs, "req/s");
	bench_result(BENCH, "rss_growth_kb", (double)(hwm - rss0), "KiB");
	bench_result(BENCH, "bytes_per_client", (double)(hwm - rss0) * 1024.0 / n, "B");
	if (ok)
		bench_result(BENCH, "client_cpu_us_per_req", cpu / (double)ok, "us");
	curl_global_cleanup();
	return 0;
}
