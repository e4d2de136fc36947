/*
 * echo_server - a TCP echo server: one fiber per connection, written as
 * plain blocking code.
 *
 *     echo_server [port]          (default 7000, listens on 127.0.0.1)
 *
 * Try it with: nc 127.0.0.1 7000
 */
#include <zokio.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *serve(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[16384];
	for (;;) {
		ssize_t n = zk_recv(fd, buf, sizeof(buf), 0);
		if (n <= 0)
			break;
		/* zk_send may write less than asked: loop */
		for (ssize_t off = 0; off < n;) {
			ssize_t w = zk_send(fd, buf + off, (size_t)(n - off), 0);
			if (w < 0)
				goto out;
			off += w;
		}
	}
out:
	zk_close(fd);
	return NULL;
}

static void *accept_loop(void *arg)
{
	int port = (int)(intptr_t)arg;
	int lfd = zk_tcp_listen("127.0.0.1", port, 1024, 0);
	if (lfd < 0) {
		fprintf(stderr, "echo_server: listen: %s\n", strerror(-lfd));
		return NULL;
	}
	printf("echo_server: listening on 127.0.0.1:%d (%s)\n", port,
	       zk_runtime_backend(zk_runtime_current()));
	fflush(stdout);
	for (;;) {
		int fd = zk_accept(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd == -ECANCELED)
			break;
		if (fd < 0) {
			fprintf(stderr, "echo_server: accept: %s\n", strerror(-fd));
			zk_sleep_ns(10 * 1000000); /* e.g. EMFILE: let fds free up */
			continue;
		}
		zk_spawn(NULL, serve, (void *)(intptr_t)fd);
	}
	zk_close(lfd);
	return NULL;
}

int main(int argc, char **argv)
{
	int port = argc > 1 ? atoi(argv[1]) : 7000;
	int rc = zk_run(accept_loop, (void *)(intptr_t)port, NULL);
	return rc ? 1 : 0;
}
