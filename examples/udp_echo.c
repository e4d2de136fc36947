/*
 * udp_echo - a UDP echo server and a client that talks to it, in one
 * runtime: the server fiber answers each datagram to its sender.
 *
 *     udp_echo [count]            (default 5 datagrams)
 */
#include <zokio.h>

#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void *server(void *arg)
{
	int fd = (int)(intptr_t)arg;
	char buf[2048];
	for (;;) {
		zk_addr_t from;
		from.len = sizeof(from.u);
		ssize_t n = zk_recvfrom(fd, buf, sizeof(buf), 0, &from.u.sa, &from.len);
		if (n < 0)
			break; /* cancelled */
		zk_sendto(fd, buf, (size_t)n, 0, &from.u.sa, from.len);
	}
	return NULL;
}

static void *run(void *arg)
{
	int count = (int)(intptr_t)arg;
	int sfd = zk_udp_bind("127.0.0.1", 0, 0);
	if (sfd < 0) {
		fprintf(stderr, "udp_echo: bind: %s\n", strerror(-sfd));
		return NULL;
	}
	zk_addr_t a;
	a.len = sizeof(a.u);
	getsockname(sfd, &a.u.sa, &a.len);
	char text[ZK_ADDR_STRLEN];
	zk_addr_format(&a, text, sizeof(text));
	printf("server on %s\n", text);
	zk_fiber_t *srv;
	zk_spawn(&srv, server, (void *)(intptr_t)sfd);

	int cfd = zk_udp_connect("127.0.0.1", ntohs(a.u.in.sin_port));
	for (int i = 0; i < count; i++) {
		char msg[64], reply[64];
		int len = snprintf(msg, sizeof(msg), "datagram %d", i);
		zk_send(cfd, msg, (size_t)len, 0);
		/* a lost datagram must not hang us: wait at most 1 s */
		if (zk_wait_readable(cfd, zk_now_ns() + 1000000000LL) != 0) {
			printf("no reply to %d\n", i);
			continue;
		}
		ssize_t n = zk_recv(cfd, reply, sizeof(reply) - 1, 0);
		if (n > 0) {
			reply[n] = 0;
			printf("reply: %s\n", reply);
		}
	}
	zk_cancel(srv);
	zk_join(srv, NULL);
	zk_close(cfd);
	zk_close(sfd);
	return NULL;
}

int main(int argc, char **argv)
{
	int count = argc > 1 ? atoi(argv[1]) : 5;
	return zk_run(run, (void *)(intptr_t)count, NULL) ? 1 : 0;
}
