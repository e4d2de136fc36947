/*
 * msghdr.h - the one-buffer msghdr that recvfrom/sendto become.
 *
 * Internal, header-only, and free of runtime internals, so that both the
 * runtime (io.c) and libzokio_hook (hook.c, which sees public headers
 * only) can build their recvfrom and sendto on recvmsg and sendmsg.
 */
#ifndef ZK_MSGHDR_H
#define ZK_MSGHDR_H

#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* Fill *m to move len bytes at buf through the caller's *v, with name /
 * namelen as the peer address (NULL / 0: none). */
static inline void zk__msghdr_one(struct msghdr *m, struct iovec *v, void *buf, size_t len,
				  void *name, socklen_t namelen)
{
	v->iov_base = buf;
	v->iov_len = len;
	memset(m, 0, sizeof(*m));
	m->msg_iov = v;
	m->msg_iovlen = 1;
	m->msg_name = name;
	m->msg_namelen = name ? namelen : 0;
}

#endif /* ZK_MSGHDR_H */
