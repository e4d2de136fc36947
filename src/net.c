/*
 * net.c - address parsing and formatting, name resolution on the blocking
 * pool, and the TCP / UDP / Unix socket helpers users expect.  Everything
 * here is built on the calls of io.c, so it parks where they park.
 */
#include "config.h"
#include "zokio.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <net/if.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int parse_port(const char *s, in_port_t *out)
{
	if (!*s)
		return -EINVAL;
	long v = 0;
	for (const char *p = s; *p; p++) {
		if (*p < '0' || *p > '9')
			return -EINVAL;
		v = v * 10 + (*p - '0');
		if (v > 65535)
			return -EINVAL;
	}
	*out = htons((in_port_t)v);
	return 0;
}

int zk_addr_parse(zk_addr_t *out, const char *text)
{
	if (!out || !text)
		return -EINVAL;
	memset(out, 0, sizeof(*out));
	if (!strncmp(text, "unix:", 5)) {
		const char *path = text + 5;
		size_t n = strlen(path);
		if (n == 0 || n >= sizeof(out->u.un.sun_path))
			return -EINVAL;
		out->u.un.sun_family = AF_UNIX;
		memcpy(out->u.un.sun_path, path, n + 1);
		out->len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
		return 0;
	}
	char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
	const char *port;
	if (text[0] == '[') {
		const char *end = strchr(text, ']');
		if (!end || end[1] != ':' || (size_t)(end - text - 1) >= sizeof(host))
			return -EINVAL;
		memcpy(host, text + 1, (size_t)(end - text - 1));
		host[end - text - 1] = 0;
		port = end + 2;
		char *scope = strchr(host, '%');
		unsigned scope_id = 0;
		if (scope) {
			*scope++ = 0;
			scope_id = if_nametoindex(scope);
			if (!scope_id) {
				char *e;
				unsigned long v = strtoul(scope, &e, 10);
				if (*e || !*scope || v > UINT_MAX)
					return -EINVAL;
				scope_id = (unsigned)v;
			}
		}
		if (inet_pton(AF_INET6, host, &out->u.in6.sin6_addr) != 1 ||
		    parse_port(port, &out->u.in6.sin6_port))
			return -EINVAL;
		out->u.in6.sin6_family = AF_INET6;
		out->u.in6.sin6_scope_id = scope_id;
		out->len = sizeof(struct sockaddr_in6);
		return 0;
	}
	const char *colon = strrchr(text, ':');
	if (!colon || (size_t)(colon - text) >= sizeof(host) || strchr(text, ':') != colon)
		return -EINVAL;
	memcpy(host, text, (size_t)(colon - text));
	host[colon - text] = 0;
	if (inet_pton(AF_INET, host, &out->u.in.sin_addr) != 1 || parse_port(colon + 1, &out->u.in.sin_port))
		return -EINVAL;
	out->u.in.sin_family = AF_INET;
	out->len = sizeof(struct sockaddr_in);
	return 0;
}

int zk_addr_format(const zk_addr_t *a, char *buf, size_t size)
{
	if (!a || !buf)
		return -EINVAL;
	char host[INET6_ADDRSTRLEN];
	int n;
	switch (a->u.sa.sa_family) {
	case AF_INET:
		inet_ntop(AF_INET, &a->u.in.sin_addr, host, sizeof(host));
		n = snprintf(buf, size, "%s:%u", host, ntohs(a->u.in.sin_port));
		break;
	case AF_INET6:
		inet_ntop(AF_INET6, &a->u.in6.sin6_addr, host, sizeof(host));
		if (a->u.in6.sin6_scope_id)
			n = snprintf(buf, size, "[%s%%%u]:%u", host, a->u.in6.sin6_scope_id,
				     ntohs(a->u.in6.sin6_port));
		else
			n = snprintf(buf, size, "[%s]:%u", host, ntohs(a->u.in6.sin6_port));
		break;
	case AF_UNIX:
		n = snprintf(buf, size, "unix:%.*s", (int)sizeof(a->u.un.sun_path), a->u.un.sun_path);
		break;
	default:
		return -EAFNOSUPPORT;
	}
	if (n < 0)
		return -EINVAL;
	return (size_t)n >= size ? -ENOSPC : n;
}

/* ---- resolution ----------------------------------------------------------- */

struct resolve {
	const char *host;
	char port[8];
	int socktype;
	int passive;
	zk_addr_t *out;
	int n;          /* addresses wanted / found */
	int err;
};

static void *resolve_fn(void *arg)
{
	struct resolve *r = arg;
	struct addrinfo hints, *res = NULL;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = r->socktype;
	hints.ai_flags = AI_NUMERICSERV | (r->passive ? AI_PASSIVE : AI_ADDRCONFIG);
	int rc = getaddrinfo(r->host, r->port, &hints, &res);
	if (rc) {
		r->err = rc == EAI_SYSTEM ? -errno : rc == EAI_MEMORY ? -ENOMEM : -ENOENT;
		r->n = 0;
		return NULL;
	}
	int i = 0;
	for (struct addrinfo *ai = res; ai && i < r->n; ai = ai->ai_next) {
		if (ai->ai_addrlen > sizeof(r->out[i].u))
			continue;
		memset(&r->out[i], 0, sizeof(r->out[i]));
		memcpy(&r->out[i].u, ai->ai_addr, ai->ai_addrlen);
		r->out[i].len = ai->ai_addrlen;
		i++;
	}
	freeaddrinfo(res);
	r->n = i;
	r->err = i ? 0 : -ENOENT;
	return NULL;
}

/* Up to n addresses for host:port; numeric addresses skip the pool. */
static int resolve(zk_addr_t *out, int n, const char *host, int port, int socktype, int passive)
{
	if (port < 0 || port > 65535 || n < 1)
		return -EINVAL;
	if (host && *host) {
		char text[INET6_ADDRSTRLEN + 16];
		const char *fmt = strchr(host, ':') ? "[%s]:%d" : "%s:%d";
		if (snprintf(text, sizeof(text), fmt, host, port) < (int)sizeof(text) &&
		    zk_addr_parse(out, text) == 0)
			return 1;
	} else {
		memset(out, 0, sizeof(*out));
		out->u.in.sin_family = AF_INET;
		out->u.in.sin_port = htons((in_port_t)port);
		out->u.in.sin_addr.s_addr = htonl(passive ? INADDR_ANY : INADDR_LOOPBACK);
		out->len = sizeof(struct sockaddr_in);
		return 1;
	}
	struct resolve r = { host, "", socktype, passive, out, n, 0 };
	snprintf(r.port, sizeof(r.port), "%d", port);
	int rc = zk_blocking(resolve_fn, &r, NULL);
	if (rc)
		return rc;
	return r.err ? r.err : r.n;
}

int zk_addr_resolve(zk_addr_t *out, const char *host, int port, int socktype)
{
	if (!out)
		return -EINVAL;
	int n = resolve(out, 1, host, port, socktype ? socktype : SOCK_STREAM, 0);
	return n < 0 ? n : 0;
}

/* ---- sockets --------------------------------------------------------------- */

int zk_listen_addr(const zk_addr_t *a, int type, int backlog, int flags)
{
	if (!a)
		return -EINVAL;
	int fd = zk_socket(a->u.sa.sa_family, type, 0);
	if (fd < 0)
		return fd;
	int one = 1, rc = 0;
	if (a->u.sa.sa_family != AF_UNIX) {
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if ((flags & ZK_NET_REUSEPORT) &&
		    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
			rc = -errno;
		if (a->u.sa.sa_family == AF_INET6) {
			int v6only = (flags & ZK_NET_V6ONLY) ? 1 : 0;
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
		}
	}
	if (!rc && bind(fd, &a->u.sa, a->len) < 0)
		rc = -errno;
	if (!rc && type == SOCK_STREAM && listen(fd, backlog > 0 ? backlog : SOMAXCONN) < 0)
		rc = -errno;
	if (rc) {
		zk_close(fd);
		return rc;
	}
	return fd;
}

int zk_connect_addr(const zk_addr_t *a, int type)
{
	if (!a)
		return -EINVAL;
	int fd = zk_socket(a->u.sa.sa_family, type, 0);
	if (fd < 0)
		return fd;
	int rc = zk_connect(fd, &a->u.sa, a->len);
	if (rc) {
		zk_close(fd);
		return rc;
	}
	return fd;
}

int zk_tcp_listen(const char *host, int port, int backlog, int flags)
{
	zk_addr_t a;
	int n = resolve(&a, 1, host, port, SOCK_STREAM, 1);
	if (n < 0)
		return n;
	return zk_listen_addr(&a, SOCK_STREAM, backlog, flags);
}

static int connect_any(const char *host, int port, int type)
{
	zk_addr_t a[8];
	int n = resolve(a, 8, host, port, type, 0);
	if (n < 0)
		return n;
	int rc = -ECONNREFUSED;
	for (int i = 0; i < n; i++) {
		rc = zk_connect_addr(&a[i], type);
		if (rc >= 0 || rc == -ECANCELED || rc == -ETIMEDOUT)
			return rc;
	}
	return rc;
}

int zk_tcp_connect(const char *host, int port)
{
	return connect_any(host, port, SOCK_STREAM);
}

int zk_udp_bind(const char *host, int port, int flags)
{
	zk_addr_t a;
	int n = resolve(&a, 1, host, port, SOCK_DGRAM, 1);
	if (n < 0)
		return n;
	return zk_listen_addr(&a, SOCK_DGRAM, 0, flags);
}

int zk_udp_connect(const char *host, int port)
{
	return connect_any(host, port, SOCK_DGRAM);
}

static int unix_addr(zk_addr_t *a, const char *path)
{
	if (!path)
		return -EINVAL;
	size_t n = strlen(path);
	memset(a, 0, sizeof(*a));
	if (n == 0 || n >= sizeof(a->u.un.sun_path))
		return -EINVAL;
	a->u.un.sun_family = AF_UNIX;
	memcpy(a->u.un.sun_path, path, n + 1);
	a->len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
	return 0;
}

int zk_unix_listen(const char *path, int backlog)
{
	zk_addr_t a;
	int rc = unix_addr(&a, path);
	if (rc)
		return rc;
	unlink(path);
	return zk_listen_addr(&a, SOCK_STREAM, backlog, 0);
}

int zk_unix_connect(const char *path)
{
	zk_addr_t a;
	int rc = unix_addr(&a, path);
	if (rc)
		return rc;
	return zk_connect_addr(&a, SOCK_STREAM);
}
