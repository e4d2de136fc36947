/*
 * perf/peers/c/common.h - pieces shared by the plain C reference servers
 * (echo_epoll.c, echo_uring.c): listening socket and SIGTERM flag; the
 * HTTP response and request counter are ../../http_hello.h, which Zokio's
 * server shares. Header-only; include once per program.
 */
#ifndef ZK_PERF_PEERS_C_COMMON_H
#define ZK_PERF_PEERS_C_COMMON_H

#include "../../bench.h"
#include "../../http_hello.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <sys/socket.h>

static volatile sig_atomic_t stop_requested;

static void on_sigterm(int sig)
{
	(void)sig;
	stop_requested = 1;
}

/* SIGTERM/SIGINT set stop_requested and interrupt the blocking wait (no
 * SA_RESTART), so the loop notices and exits 0. */
static void install_sigterm(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_sigterm;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

/* A TCP listener on 127.0.0.1:port, or -1 with a message on stderr. */
static int listen_loopback(int port, int nonblocking)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC |
			(nonblocking ? SOCK_NONBLOCK : 0), 0);
	if (fd < 0) {
		perror("socket");
		return -1;
	}
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in sa;
	memset(&sa, 0, sizeof sa);
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    listen(fd, 4096) < 0) {
		perror("bind/listen");
		close(fd);
		return -1;
	}
	return fd;
}

/* "echo_server" or "http_server" -> 0 / 1; -1 for anything else. */
static int server_mode(const char *bench)
{
	if (strcmp(bench, "echo_server") == 0)
		return 0;
	if (strcmp(bench, "http_server") == 0)
		return 1;
	return -1;
}

static void announce_ready(void)
{
	printf("READY\n");
	fflush(stdout);
}

#endif /* ZK_PERF_PEERS_C_COMMON_H */
