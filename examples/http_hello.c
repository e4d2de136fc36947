/*
 * http_hello - an HTTP/1.1 keep-alive "Hello, World!" server.
 *
 *     http_hello [port]           (default 8080, listens on 127.0.0.1)
 *
 * Each connection is a fiber that reads requests (any request ends at an
 * empty line; bodies are not supported) and answers each with the same
 * response, keeping the connection open.  Benchmark it with
 *     wrk -t1 -c100 -d5s http://127.0.0.1:8080/
 */
#include <zokio.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char response[] =
	"HTTP/1.1 200 OK\r\n"
	"Content-Type: text/plain\r\n"
	"Content-Length: 13\r\n"
	"\r\n"
	"Hello, World!";

static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[8192];
	int matched = 0; /* bytes of "\r\n\r\n" seen so far */
	for (;;) {
		ssize_t n = zk_recv(fd, buf, sizeof(buf), 0);
		if (n <= 0)
			break;
		int requests = 0;
		for (ssize_t i = 0; i < n; i++) {
			char c = buf[i];
			if (c == (matched % 2 == 0 ? '\r' : '\n'))
				matched++;
			else
				matched = c == '\r' ? 1 : 0;
			if (matched == 4) {
				requests++;
				matched = 0;
			}
		}
		/* pipelined requests get their responses in one send */
		char out[sizeof(response) * 16];
		while (requests > 0) {
			int k = requests > 16 ? 16 : requests;
			for (int j = 0; j < k; j++)
				memcpy(out + j * (sizeof(response) - 1), response, sizeof(response) - 1);
			size_t len = (size_t)k * (sizeof(response) - 1);
			for (size_t off = 0; off < len;) {
				ssize_t w = zk_send(fd, out + off, len - off, 0);
				if (w < 0)
					goto out;
				off += (size_t)w;
			}
			requests -= k;
		}
	}
out:
	zk_close(fd);
	return NULL;
}

static void *accept_loop(void *arg)
{
	int port = (int)(intptr_t)arg;
	int lfd = zk_tcp_listen("127.0.0.1", port, 4096, 0);
	if (lfd < 0) {
		fprintf(stderr, "http_hello: listen: %s\n", strerror(-lfd));
		return NULL;
	}
	printf("http_hello: http://127.0.0.1:%d/ (%s)\n", port,
	       zk_runtime_backend(zk_runtime_current()));
	fflush(stdout);
	for (;;) {
		int fd = zk_accept(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd == -ECANCELED)
			break;
		if (fd < 0) {
			zk_sleep_ns(10 * 1000000);
			continue;
		}
		zk_spawn(NULL, serve, (void *)(intptr_t)fd);
	}
	zk_close(lfd);
	return NULL;
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 8080;
	return zk_run(accept_loop, (void *)(intptr_t)port, NULL) ? 1 : 0;
}
