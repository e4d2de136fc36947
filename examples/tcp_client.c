/*
 * tcp_client - connect by host name, send a line, print the reply.
 *
 *     tcp_client [host] [port] [message]     (default localhost 7000 hello)
 *
 * The name is resolved on the blocking pool; the connect, send and receive
 * park the fiber.  A 5 s deadline covers the whole exchange.
 */
#include <zokio.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct args {
	const char *host;
	int port;
	const char *msg;
	int rc;
};

static void *client(void *arg)
{
	struct args *a = arg;
	zk_deadline_set(zk_now_ns() + 5 * 1000000000LL);
	int fd = zk_tcp_connect(a->host, a->port);
	if (fd < 0) {
		fprintf(stderr, "tcp_client: connect %s:%d: %s\n", a->host, a->port, strerror(-fd));
		a->rc = 1;
		return NULL;
	}
	size_t len = strlen(a->msg);
	if (zk_send(fd, a->msg, len, 0) != (ssize_t)len || zk_send(fd, "\n", 1, 0) != 1) {
		a->rc = 1;
		zk_close(fd);
		return NULL;
	}
	zk_shutdown(fd, SHUT_WR);
	char buf[4096];
	ssize_t n;
	while ((n = zk_recv(fd, buf, sizeof(buf), 0)) > 0)
		fwrite(buf, 1, (size_t)n, stdout);
	if (n < 0) {
		fprintf(stderr, "tcp_client: recv: %s\n", strerror((int)-n));
		a->rc = 1;
	}
	zk_close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	struct args a = { argc > 1 ? argv[1] : "localhost", argc > 2 ? atoi(argv[2]) : 7000,
			  argc > 3 ? argv[3] : "hello", 0 };
	int rc = zk_run(client, &a, NULL);
	return rc || a.rc;
}
