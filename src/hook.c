/*
 * hook.c - libzokio_hook: libc's blocking calls, made fiber-aware.
 *
 * Every interposed function starts with one question: is this call hooked?
 * Only if it comes from a fiber whose hooking is on, and not from libzokio
 * itself (the runtime makes its own system calls through the same libc
 * names; they must reach libc untouched, or the scheduler would park inside
 * its own wake-up path).  Everything else goes straight to the original,
 * found with dlsym(RTLD_NEXT).
 *
 * A hooked call never changes an fd's file status flags for longer than one
 * system call (connect), so the application's own O_NONBLOCK, FIONBIO and
 * SO_RCVTIMEO/SO_SNDTIMEO settings are read back from the kernel when they
 * matter - on the slow path, after EAGAIN, when the fiber is about to park
 * anyway - and need no tracking.  The real call is never allowed to block:
 * sockets are driven with MSG_DONTWAIT, pipes and other pollable fds with
 * RWF_NOWAIT, and accept through io_uring (see accept_nowait).
 *
 * errno and migration: a fiber that parked may resume on another worker
 * thread, and __errno_location() is a const function whose result a
 * compiler may keep across a call.  errno is therefore read and written
 * here only through two functions the optimiser may not look into.
 *
 * Bootstrap: the originals are resolved in a constructor, or at the first
 * interposed call if that comes earlier (another library's constructor).
 * Until then - and on a thread that is resolving, should dlsym ever call
 * one of these names - each pointer holds a raw syscall(2) stand-in, so
 * there is no recursion.  Nothing here allocates before resolution.
 */
#include "config.h"
#include "zokio.h"
#include "zokio_hook.h"
#include "msghdr.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#ifdef HAVE_LIBURING
#include <liburing.h>
#endif

#define HOOK_API __attribute__((visibility("default")))
#define RA() __builtin_return_address(0)

#if defined(__has_attribute)
#if __has_attribute(noipa)
#define OPAQUE __attribute__((noinline, noipa))
#endif
#endif
#ifndef OPAQUE
#define OPAQUE __attribute__((noinline))
#endif

/* The soname of the shared runtime, whose calls pass through. */
#define ZK_CORE_SONAME "libzokio.so.0"

/* ---- errno, safe across a migration -------------------------------------- */

static OPAQUE int get_errno(void)
{
	return errno;
}

static OPAQUE void set_errno(int e)
{
	errno = e;
}

/* -1 with errno = e. */
static long fail(int e)
{
	set_errno(e);
	return -1;
}

/* ---- the originals --------------------------------------------------------- */

/* Stand-ins used before dlsym has answered: the bare system calls. */
static ssize_t raw_read(int fd, void *b, size_t n) { return syscall(SYS_read, fd, b, n); }
static ssize_t raw_write(int fd, const void *b, size_t n) { return syscall(SYS_write, fd, b, n); }
static ssize_t raw_readv(int fd, const struct iovec *v, int c) { return syscall(SYS_readv, fd, v, c); }
static ssize_t raw_writev(int fd, const struct iovec *v, int c) { return syscall(SYS_writev, fd, v, c); }
static ssize_t raw_recv(int fd, void *b, size_t n, int f)
{
	return syscall(SYS_recvfrom, fd, b, n, f, NULL, NULL);
}
static ssize_t raw_recvfrom(int fd, void *b, size_t n, int f, struct sockaddr *a, socklen_t *l)
{
	return syscall(SYS_recvfrom, fd, b, n, f, a, l);
}
static ssize_t raw_recvmsg(int fd, struct msghdr *m, int f) { return syscall(SYS_recvmsg, fd, m, f); }
static ssize_t raw_send(int fd, const void *b, size_t n, int f)
{
	return syscall(SYS_sendto, fd, b, n, f, NULL, 0);
}
static ssize_t raw_sendto(int fd, const void *b, size_t n, int f, const struct sockaddr *a, socklen_t l)
{
	return syscall(SYS_sendto, fd, b, n, f, a, l);
}
static ssize_t raw_sendmsg(int fd, const struct msghdr *m, int f) { return syscall(SYS_sendmsg, fd, m, f); }
static int raw_accept(int fd, struct sockaddr *a, socklen_t *l) { return (int)syscall(SYS_accept4, fd, a, l, 0); }
static int raw_accept4(int fd, struct sockaddr *a, socklen_t *l, int f)
{
	return (int)syscall(SYS_accept4, fd, a, l, f);
}
static int raw_connect(int fd, const struct sockaddr *a, socklen_t l) { return (int)syscall(SYS_connect, fd, a, l); }
static int raw_close(int fd) { return (int)syscall(SYS_close, fd); }
static int raw_ppoll(struct pollfd *p, nfds_t n, const struct timespec *t, const sigset_t *s)
{
	return (int)syscall(SYS_ppoll, p, n, t, s, (size_t)(_NSIG / 8));
}
static int raw_poll(struct pollfd *p, nfds_t n, int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
	return raw_ppoll(p, n, ms < 0 ? NULL : &ts, NULL);
}
static int raw_select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
	struct timespec ts, *tp = NULL;
	if (tv) {
		ts.tv_sec = tv->tv_sec;
		ts.tv_nsec = tv->tv_usec * 1000;
		tp = &ts;
	}
	return (int)syscall(SYS_pselect6, n, r, w, e, tp, NULL);
}
static int raw_nanosleep(const struct timespec *q, struct timespec *m) { return (int)syscall(SYS_nanosleep, q, m); }
static int raw_clock_nanosleep(clockid_t c, int f, const struct timespec *q, struct timespec *m)
{
	return syscall(SYS_clock_nanosleep, c, f, q, m) < 0 ? get_errno() : 0;
}
static int raw_usleep(useconds_t us)
{
	struct timespec ts = { us / 1000000, (long)(us % 1000000) * 1000 };
	return raw_nanosleep(&ts, NULL);
}
static unsigned raw_sleep(unsigned s)
{
	struct timespec ts = { s, 0 }, rem = { 0, 0 };
	return raw_nanosleep(&ts, &rem) ? (unsigned)rem.tv_sec : 0;
}
static ssize_t raw_pread(int fd, void *b, size_t n, off_t o) { return syscall(SYS_pread64, fd, b, n, o); }
static ssize_t raw_pwrite(int fd, const void *b, size_t n, off_t o) { return syscall(SYS_pwrite64, fd, b, n, o); }
static int raw_fsync(int fd) { return (int)syscall(SYS_fsync, fd); }
static int raw_getaddrinfo(const char *n, const char *s, const struct addrinfo *h, struct addrinfo **r)
{
	set_errno(ENOSYS);
	return EAI_SYSTEM;
}

static struct {
	ssize_t (*read)(int, void *, size_t);
	ssize_t (*write)(int, const void *, size_t);
	ssize_t (*readv)(int, const struct iovec *, int);
	ssize_t (*writev)(int, const struct iovec *, int);
	ssize_t (*recv)(int, void *, size_t, int);
	ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
	ssize_t (*recvmsg)(int, struct msghdr *, int);
	ssize_t (*send)(int, const void *, size_t, int);
	ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
	ssize_t (*sendmsg)(int, const struct msghdr *, int);
	int (*accept)(int, struct sockaddr *, socklen_t *);
	int (*accept4)(int, struct sockaddr *, socklen_t *, int);
	int (*connect)(int, const struct sockaddr *, socklen_t);
	int (*close)(int);
	int (*poll)(struct pollfd *, nfds_t, int);
	int (*ppoll)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);
	int (*select)(int, fd_set *, fd_set *, fd_set *, struct timeval *);
	int (*nanosleep)(const struct timespec *, struct timespec *);
	int (*clock_nanosleep)(clockid_t, int, const struct timespec *, struct timespec *);
	int (*usleep)(useconds_t);
	unsigned (*sleep)(unsigned);
	ssize_t (*pread)(int, void *, size_t, off_t);
	ssize_t (*pwrite)(int, const void *, size_t, off_t);
	ssize_t (*pread64)(int, void *, size_t, off_t);
	ssize_t (*pwrite64)(int, const void *, size_t, off_t);
	int (*fsync)(int);
	int (*getaddrinfo)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
	/* _FORTIFY_SOURCE entry points; NULL where libc has none. */
	ssize_t (*read_chk)(int, void *, size_t, size_t);
	ssize_t (*recv_chk)(int, void *, size_t, size_t, int);
	ssize_t (*recvfrom_chk)(int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *);
	ssize_t (*pread_chk)(int, void *, size_t, off_t, size_t);
	int (*poll_chk)(struct pollfd *, nfds_t, int, size_t);
	int (*ppoll_chk)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *, size_t);
} real = {
	raw_read, raw_write, raw_readv, raw_writev, raw_recv, raw_recvfrom, raw_recvmsg,
	raw_send, raw_sendto, raw_sendmsg, raw_accept, raw_accept4, raw_connect, raw_close,
	raw_poll, raw_ppoll, raw_select, raw_nanosleep, raw_clock_nanosleep, raw_usleep,
	raw_sleep, raw_pread, raw_pwrite, raw_pread, raw_pwrite, raw_fsync, raw_getaddrinfo,
	NULL, NULL, NULL, NULL, NULL, NULL,
};

static void ring_key_init(void);
static void set_free(void *p);
static zk_key_t set_key;
static int set_key_ok;

static _Atomic int resolve_state;       /* 0 not yet, 1 in progress, 2 done */
static __thread int resolving;          /* this thread is inside resolve() */
static int hook_on;                     /* ZOKIO_HOOK != 0 and resolved */
static int static_runtime;              /* off: the program has its own runtime */
static uintptr_t core_lo, core_hi;      /* libzokio.so's code */
static zk_key_t off_key;                /* non-NULL value: hooking off in this fiber */
static int key_ok;

#define FIND(name, field)                                   \
	do {                                                \
		void *p_ = dlsym(RTLD_NEXT, name);          \
		if (p_)                                     \
			memcpy(&real.field, &p_, sizeof(p_)); \
	} while (0)

/* Find the executable segments of the object that holds addr. */
struct find_seg {
	uintptr_t addr, self;
	uintptr_t lo, hi;
	int has_self;
};

static int seg_cb(struct dl_phdr_info *info, size_t size, void *data)
{
	struct find_seg *f = data;
	int mine = 0;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
		if (ph->p_type == PT_LOAD && f->addr >= lo && f->addr < lo + ph->p_memsz)
			mine = 1;
	}
	if (!mine)
		return 0;
	f->lo = UINTPTR_MAX;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
		if (ph->p_type != PT_LOAD)
			continue;
		if (f->self >= lo && f->self < lo + ph->p_memsz)
			f->has_self = 1;
		if (!(ph->p_flags & PF_X))
			continue;
		if (lo < f->lo)
			f->lo = lo;
		if (lo + ph->p_memsz > f->hi)
			f->hi = lo + ph->p_memsz;
	}
	return 1;
}

/* Is sym (a definition dlsym found) only the executable's canonical PLT
 * entry for a function defined elsewhere?  (A non-PIE program that takes
 * a function's address has one; it is not a second copy.) */
static int is_plt_stub(void *sym)
{
	Dl_info info;
	const ElfW(Sym) *es = NULL;
	return dladdr1(sym, &info, (void **)&es, RTLD_DL_SYMENT) && es && es->st_shndx == SHN_UNDEF;
}

/* Where libzokio's own code lives.  dlsym on libzokio's own handle gives
 * the real address of one of its functions, not a canonical PLT entry of
 * the executable.
 *
 * Returns 0, or -1 when the runtime the hook's zk_ calls reach is not
 * libzokio.so's: the program carries its own copy (libzokio.a linked in,
 * or the runtime built into the same object as the hook).  Such a copy's
 * calls cannot be told apart from the program's by address - its code is
 * mixed with the program's, and nothing in the dynamic symbol table says
 * where it starts or ends - and hooking the runtime's own calls would park
 * the scheduler inside its own wake-up path.  See zokio_hook.h. */
static int find_core(void)
{
	void *h = dlopen(ZK_CORE_SONAME, RTLD_LAZY | RTLD_NOLOAD);
	void *p = h ? dlsym(h, "zk_yield") : NULL;
	void *bound = dlsym(RTLD_DEFAULT, "zk_yield"); /* what the hook's calls reach */
	int own_copy = !p || (bound && bound != p && !is_plt_stub(bound));
	if (!p)
		p = (void *)zk_yield;
	struct find_seg f = { (uintptr_t)p, (uintptr_t)find_core, 0, 0, 0 };
	dl_iterate_phdr(seg_cb, &f);
	if (h)
		dlclose(h);
	if (own_copy || f.has_self || f.lo >= f.hi)
		return -1;
	core_lo = f.lo;
	core_hi = f.hi;
	return 0;
}

static void resolve(void)
{
	int expected = 0;
	if (!atomic_compare_exchange_strong(&resolve_state, &expected, 1))
		return; /* done, or another thread is at it: stand-ins meanwhile */
	resolving = 1;
	FIND("read", read);
	FIND("write", write);
	FIND("readv", readv);
	FIND("writev", writev);
	FIND("recv", recv);
	FIND("recvfrom", recvfrom);
	FIND("recvmsg", recvmsg);
	FIND("send", send);
	FIND("sendto", sendto);
	FIND("sendmsg", sendmsg);
	FIND("accept", accept);
	FIND("accept4", accept4);
	FIND("connect", connect);
	FIND("close", close);
	FIND("poll", poll);
	FIND("ppoll", ppoll);
	FIND("select", select);
	FIND("nanosleep", nanosleep);
	FIND("clock_nanosleep", clock_nanosleep);
	FIND("usleep", usleep);
	FIND("sleep", sleep);
	FIND("pread", pread);
	FIND("pwrite", pwrite);
	FIND("pread64", pread64);
	FIND("pwrite64", pwrite64);
	FIND("fsync", fsync);
	FIND("getaddrinfo", getaddrinfo);
	FIND("__read_chk", read_chk);
	FIND("__recv_chk", recv_chk);
	FIND("__recvfrom_chk", recvfrom_chk);
	FIND("__pread_chk", pread_chk);
	FIND("__poll_chk", poll_chk);
	FIND("__ppoll_chk", ppoll_chk);
	int shared = find_core() == 0;
	ring_key_init();
	key_ok = zk_key_create(&off_key, NULL) == 0;
	set_key_ok = zk_key_create(&set_key, set_free) == 0;
	const char *e = getenv("ZOKIO_HOOK");
	hook_on = !(e && e[0] == '0' && e[1] == 0);
	if (hook_on && !shared) {
		static const char msg[] =
			"libzokio_hook: this program carries its own copy of the Zokio runtime "
			"(libzokio linked statically); the hook cannot tell that copy's own libc "
			"calls from the program's, so it stays off: every call is libc's. Link "
			"libzokio shared (-lzokio) to use libzokio_hook.\n";
		raw_write(2, msg, sizeof(msg) - 1);
		hook_on = 0;
		static_runtime = 1;
	}
	resolving = 0;
	atomic_store(&resolve_state, 2);
}

__attribute__((constructor)) static void hook_init(void)
{
	resolve();
}

/* Is a call with return address ra to be hooked? */
static int hooked(void *ra)
{
	if (atomic_load_explicit(&resolve_state, memory_order_acquire) != 2) {
		if (resolving)
			return 0;
		resolve();
		if (atomic_load_explicit(&resolve_state, memory_order_acquire) != 2)
			return 0;
	}
	if (!hook_on)
		return 0;
	if ((uintptr_t)ra - core_lo < core_hi - core_lo)
		return 0;
	if (!zk_self())
		return 0;
	return !key_ok || zk_key_get(off_key) == NULL;
}

/* ---- what kind of fd ------------------------------------------------------- */

/* FD_POLL: a pipe, FIFO, eventfd, terminal... that takes RWF_NOWAIT
 * (most do); FD_POLL_WAIT: one that refused it (EOPNOTSUPP), which is
 * waited for with poll before the real call.  FD_HOOK_SET marks the
 * hook's own epoll sets (see wait_any). */
enum { FD_UNKNOWN, FD_SOCK, FD_POLL, FD_FILE, FD_POLL_WAIT, FD_HOOK_SET };

/* Sockets and other pollable fds are remembered by number until close();
 * files are looked at every time, so a stale entry can only ever send a
 * call down a path that waits (and then copes: ENOTSOCK, or poll). */
#define KINDS_MAX 65536
static _Atomic uint8_t kinds[KINDS_MAX];

static int fd_kind(int fd)
{
	if (fd >= 0 && fd < KINDS_MAX) {
		int k = atomic_load_explicit(&kinds[fd], memory_order_relaxed);
		if (k)
			return k;
	}
	struct stat st;
	if (fstat(fd, &st) < 0)
		return FD_FILE; /* the real call reports EBADF */
	int k = S_ISSOCK(st.st_mode) ? FD_SOCK
		: S_ISREG(st.st_mode) || S_ISDIR(st.st_mode) || S_ISBLK(st.st_mode) ? FD_FILE
		: FD_POLL;
	if (k != FD_FILE && fd >= 0 && fd < KINDS_MAX)
		atomic_store_explicit(&kinds[fd], (uint8_t)k, memory_order_relaxed);
	return k;
}

static void fd_forget(int fd)
{
	if (fd >= 0 && fd < KINDS_MAX)
		atomic_store_explicit(&kinds[fd], FD_UNKNOWN, memory_order_relaxed);
}

/* Did the application make fd non-blocking?  (An fd we cannot ask about is
 * treated as non-blocking: the real call then reports the error.) */
static int fd_nonblocking(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	return fl < 0 || (fl & O_NONBLOCK);
}

/* ---- parking --------------------------------------------------------------- */

#define NOT_YET INT64_MIN
#define OWN_TIMEOUT 1

/* Park until fd is ready for events (POLLIN or POLLOUT) or the call's own
 * deadline (< 0: none) passes.  0 ready, OWN_TIMEOUT, or -ETIMEDOUT (the
 * fiber's deadline) / -ECANCELED. */
static int park_fd(int fd, int events, int64_t deadline)
{
	int rc = (events & POLLOUT) ? zk_wait_writable(fd, deadline) : zk_wait_readable(fd, deadline);
	if (rc == -ETIMEDOUT && deadline >= 0 && zk_now_ns() >= deadline)
		return OWN_TIMEOUT;
	return rc;
}

/* The deadline a socket timeout option (SO_RCVTIMEO / SO_SNDTIMEO) gives a
 * call that starts waiting now; -1 for none. */
static int64_t sock_deadline(int fd, int opt)
{
	struct timeval tv;
	socklen_t len = sizeof(tv);
	if (getsockopt(fd, SOL_SOCKET, opt, &tv, &len) < 0 || (tv.tv_sec == 0 && tv.tv_usec == 0))
		return -1;
	return zk_now_ns() + (int64_t)tv.tv_sec * 1000000000 + (int64_t)tv.tv_usec * 1000;
}

/* A blocking fd that refused RWF_NOWAIT: park until it is ready.  0 to go
 * on with the real call, or -1 with errno.  The call is made at once when
 * it cannot wait: a non-blocking fd, or one not open for that direction
 * (the read end of a pipe never becomes writable: write says EBADF). */
static int other_wait(int fd, int events)
{
	struct pollfd p = { .fd = fd, .events = (short)events };
	if (real.poll(&p, 1, 0) != 0)
		return 0;
	int fl = fcntl(fd, F_GETFL);
	int mode = fl & O_ACCMODE;
	if (fl < 0 || (fl & O_NONBLOCK) || (events == POLLOUT && mode == O_RDONLY) ||
	    (events == POLLIN && mode == O_WRONLY))
		return 0;
	int rc = park_fd(fd, events, -1);
	return rc == 0 ? 0 : (int)fail(-rc);
}

/* ---- sockets ------------------------------------------------------------- */

static size_t iov_total(const struct iovec *iov, size_t n)
{
	size_t t = 0;
	for (size_t i = 0; i < n; i++)
		t += iov[i].iov_len;
	return t;
}

/* Drop the first n bytes of a (copied) iovec array. */
static void iov_advance(struct iovec **iov, size_t *cnt, size_t n)
{
	while (*cnt && n >= (*iov)->iov_len) {
		n -= (*iov)->iov_len;
		(*iov)++;
		(*cnt)--;
	}
	if (*cnt && n) {
		(*iov)->iov_base = (char *)(*iov)->iov_base + n;
		(*iov)->iov_len -= n;
	}
}

static int sock_is_stream(int fd)
{
	int type = 0;
	socklen_t len = sizeof(type);
	return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM;
}

/* recvmsg (out = 0) or sendmsg (out = 1) with the semantics of a blocking
 * socket, on a socket fd.  A blocking send moves every byte, and so does a
 * receive with MSG_WAITALL on a stream socket; when one of them stops early
 * (error, timeout, end of stream) the count moved so far is returned. */
static ssize_t sock_io(int fd, struct msghdr *m, int flags, int out)
{
	if (flags & MSG_DONTWAIT) /* the caller asked not to wait */
		return out ? real.sendmsg(fd, m, flags) : real.recvmsg(fd, m, flags);
	struct msghdr w = *m;
	struct iovec small[8], *copy = NULL;
	size_t want = iov_total(m->msg_iov, m->msg_iovlen), done = 0;
	int all = out || (flags & MSG_WAITALL);
	int64_t deadline = NOT_YET;
	ssize_t res;
	for (;;) {
		ssize_t r = out ? real.sendmsg(fd, &w, flags | MSG_DONTWAIT)
				: real.recvmsg(fd, &w, flags | MSG_DONTWAIT);
		if (r >= 0) {
			if (!out && done == 0) {
				m->msg_namelen = w.msg_namelen;
				m->msg_controllen = w.msg_controllen;
				m->msg_flags = w.msg_flags;
			}
			done += (size_t)r;
			if (!all || done >= want || (!out && r == 0) || (!out && !sock_is_stream(fd))) {
				res = (ssize_t)done;
				break;
			}
			/* Partial: go on with the rest, on a private iovec copy. */
			if (!copy) {
				size_t n = w.msg_iovlen;
				copy = n <= 8 ? small : malloc(n * sizeof(*copy));
				if (!copy) {
					res = (ssize_t)done;
					break;
				}
				memcpy(copy, w.msg_iov, n * sizeof(*copy));
				w.msg_iov = copy;
			}
			iov_advance(&w.msg_iov, &w.msg_iovlen, (size_t)r);
			w.msg_name = NULL; /* a stream: the address and the */
			w.msg_namelen = 0; /* ancillary data went with the first part */
			w.msg_control = NULL;
			w.msg_controllen = 0;
			continue;
		}
		int e = get_errno();
		if (e == EINTR)
			continue;
		if (e != EAGAIN && e != EWOULDBLOCK) {
			res = done ? (ssize_t)done : fail(e);
			break;
		}
		if (deadline == NOT_YET) {
			if (fd_nonblocking(fd)) {
				res = done ? (ssize_t)done : fail(e);
				break;
			}
			deadline = sock_deadline(fd, out ? SO_SNDTIMEO : SO_RCVTIMEO);
		}
		int rc = park_fd(fd, out ? POLLOUT : POLLIN, deadline);
		if (rc) {
			res = done ? (ssize_t)done : fail(rc == OWN_TIMEOUT ? EAGAIN : -rc);
			break;
		}
	}
	if (copy && copy != small)
		free(copy);
	return res;
}

/* ---- read, write, readv, writev --------------------------------------------- */

enum { RW_READ, RW_WRITE, RW_READV, RW_WRITEV };

static ssize_t rw_real(int op, int fd, const struct iovec *iov, int cnt)
{
	switch (op) {
	case RW_READ: return real.read(fd, iov->iov_base, iov->iov_len);
	case RW_WRITE: return real.write(fd, iov->iov_base, iov->iov_len);
	case RW_READV: return real.readv(fd, iov, cnt);
	default: return real.writev(fd, iov, cnt);
	}
}

/* One attempt that never waits, at the file position, with the fd's own
 * flags untouched: RWF_NOWAIT makes a pipe answer as an O_NONBLOCK one
 * would (a write of up to PIPE_BUF bytes goes in whole or not at all). */
static ssize_t nowait_rw(int out, int fd, const struct iovec *iov, size_t cnt)
{
	return out ? pwritev2(fd, iov, (int)cnt, -1, RWF_NOWAIT)
		   : preadv2(fd, iov, (int)cnt, -1, RWF_NOWAIT);
}

/* read/write/readv/writev on a pipe, FIFO, eventfd... with the semantics
 * of the fd's own mode, and without ever letting the real call block:
 *   - a read returns what is there, parking first while nothing is;
 *   - a blocking write moves every byte: what fits now, then the fiber
 *     parks until the fd is writable and goes on with the rest (writes of
 *     up to PIPE_BUF bytes stay atomic); stopped by an error it returns
 *     the count moved so far, as the kernel does;
 *   - on an fd the application made O_NONBLOCK, the first answer stands.
 * Returns -2 (errno untouched) when the fd refuses RWF_NOWAIT before
 * anything moved: the caller then waits for readiness the old way. */
static ssize_t pipe_io(int out, int fd, const struct iovec *iov, int cnt)
{
	struct iovec small[8], *copy = NULL, *w = (struct iovec *)iov;
	size_t wn = (size_t)cnt, want = iov_total(iov, (size_t)cnt), done = 0;
	int nb = -1; /* the application's O_NONBLOCK, asked once, when it matters */
	ssize_t res;
	for (;;) {
		ssize_t r = nowait_rw(out, fd, w, wn);
		if (r >= 0) {
			done += (size_t)r;
			if (!out || done >= want) {
				res = (ssize_t)done;
				break;
			}
		} else {
			int e = get_errno();
			if (e == EINTR)
				continue;
			if ((e == EOPNOTSUPP || e == ENOSYS) && done == 0) {
				res = -2;
				break;
			}
			if (e != EAGAIN) {
				res = done ? (ssize_t)done : fail(e);
				break;
			}
		}
		if (nb < 0)
			nb = fd_nonblocking(fd);
		if (nb) {
			res = done ? (ssize_t)done : fail(EAGAIN);
			break;
		}
		if (r > 0) { /* a partial write: the rest, from a private iovec copy */
			if (!copy) {
				copy = wn <= 8 ? small : malloc(wn * sizeof(*copy));
				if (!copy) {
					res = (ssize_t)done;
					break;
				}
				memcpy(copy, w, wn * sizeof(*copy));
				w = copy;
			}
			iov_advance(&w, &wn, (size_t)r);
		}
		int rc = park_fd(fd, out ? POLLOUT : POLLIN, -1);
		if (rc) {
			res = done ? (ssize_t)done : fail(-rc);
			break;
		}
	}
	if (copy && copy != small)
		free(copy);
	return res;
}

static ssize_t rw_hooked(int op, int fd, const struct iovec *iov, int cnt)
{
	int out = op == RW_WRITE || op == RW_WRITEV;
	if (cnt < 0 || cnt > IOV_MAX)
		return rw_real(op, fd, iov, cnt); /* EINVAL, as libc says it */
	for (;;) {
		switch (fd_kind(fd)) {
		case FD_SOCK: {
			struct msghdr m;
			memset(&m, 0, sizeof(m));
			m.msg_iov = (struct iovec *)iov;
			m.msg_iovlen = (size_t)cnt;
			ssize_t r = sock_io(fd, &m, 0, out);
			if (r < 0 && get_errno() == ENOTSOCK) {
				fd_forget(fd); /* the number was reused: look again */
				continue;
			}
			return r;
		}
		case FD_POLL: {
			ssize_t r = pipe_io(out, fd, iov, cnt);
			if (r != -2)
				return r;
			if (fd >= 0 && fd < KINDS_MAX)
				atomic_store_explicit(&kinds[fd], FD_POLL_WAIT, memory_order_relaxed);
		}
			/* fall through */
		case FD_POLL_WAIT:
			if (other_wait(fd, out ? POLLOUT : POLLIN) < 0)
				return -1;
			return rw_real(op, fd, iov, cnt);
		default:
			return rw_real(op, fd, iov, cnt);
		}
	}
}

HOOK_API ssize_t read(int fd, void *buf, size_t n)
{
	if (!hooked(RA()))
		return real.read(fd, buf, n);
	struct iovec v = { buf, n };
	return rw_hooked(RW_READ, fd, &v, 1);
}

HOOK_API ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
	if (!hooked(RA()) || n > buflen) {
		if (real.read_chk)
			return real.read_chk(fd, buf, n, buflen);
		if (n > buflen)
			abort();
		return real.read(fd, buf, n);
	}
	struct iovec v = { buf, n };
	return rw_hooked(RW_READ, fd, &v, 1);
}

HOOK_API ssize_t write(int fd, const void *buf, size_t n)
{
	if (!hooked(RA()))
		return real.write(fd, buf, n);
	struct iovec v = { (void *)buf, n };
	return rw_hooked(RW_WRITE, fd, &v, 1);
}

HOOK_API ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
	if (!hooked(RA()))
		return real.readv(fd, iov, cnt);
	return rw_hooked(RW_READV, fd, iov, cnt);
}

HOOK_API ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	if (!hooked(RA()))
		return real.writev(fd, iov, cnt);
	return rw_hooked(RW_WRITEV, fd, iov, cnt);
}

/* ---- recv and send families ------------------------------------------------- */

static ssize_t recvfrom_hooked(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
			       socklen_t *addrlen)
{
	if (fd_kind(fd) != FD_SOCK)
		return real.recvfrom(fd, buf, n, flags, addr, addrlen); /* ENOTSOCK, EBADF */
	struct iovec v;
	struct msghdr m;
	zk__msghdr_one(&m, &v, buf, n, addrlen ? addr : NULL, addrlen ? *addrlen : 0);
	ssize_t r = sock_io(fd, &m, flags, 0);
	if (r >= 0 && addr && addrlen)
		*addrlen = m.msg_namelen;
	return r;
}

HOOK_API ssize_t recv(int fd, void *buf, size_t n, int flags)
{
	if (!hooked(RA()))
		return real.recv(fd, buf, n, flags);
	return recvfrom_hooked(fd, buf, n, flags, NULL, NULL);
}

HOOK_API ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
	if (!hooked(RA()) || n > buflen) {
		if (real.recv_chk)
			return real.recv_chk(fd, buf, n, buflen, flags);
		if (n > buflen)
			abort();
		return real.recv(fd, buf, n, flags);
	}
	return recvfrom_hooked(fd, buf, n, flags, NULL, NULL);
}

HOOK_API ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
			  socklen_t *addrlen)
{
	if (!hooked(RA()))
		return real.recvfrom(fd, buf, n, flags, addr, addrlen);
	return recvfrom_hooked(fd, buf, n, flags, addr, addrlen);
}

HOOK_API ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
				struct sockaddr *addr, socklen_t *addrlen)
{
	if (!hooked(RA()) || n > buflen) {
		if (real.recvfrom_chk)
			return real.recvfrom_chk(fd, buf, n, buflen, flags, addr, addrlen);
		if (n > buflen)
			abort();
		return real.recvfrom(fd, buf, n, flags, addr, addrlen);
	}
	return recvfrom_hooked(fd, buf, n, flags, addr, addrlen);
}

HOOK_API ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
	if (!hooked(RA()) || !msg || fd_kind(fd) != FD_SOCK)
		return real.recvmsg(fd, msg, flags);
	return sock_io(fd, msg, flags, 0);
}

static ssize_t sendto_hooked(int fd, const void *buf, size_t n, int flags,
			     const struct sockaddr *addr, socklen_t addrlen)
{
	if (fd_kind(fd) != FD_SOCK)
		return real.sendto(fd, buf, n, flags, addr, addrlen);
	struct iovec v;
	struct msghdr m;
	zk__msghdr_one(&m, &v, (void *)buf, n, (void *)addr, addrlen);
	return sock_io(fd, &m, flags, 1);
}

HOOK_API ssize_t send(int fd, const void *buf, size_t n, int flags)
{
	if (!hooked(RA()))
		return real.send(fd, buf, n, flags);
	return sendto_hooked(fd, buf, n, flags, NULL, 0);
}

HOOK_API ssize_t sendto(int fd, const void *buf, size_t n, int flags,
			const struct sockaddr *addr, socklen_t addrlen)
{
	if (!hooked(RA()))
		return real.sendto(fd, buf, n, flags, addr, addrlen);
	return sendto_hooked(fd, buf, n, flags, addr, addrlen);
}

HOOK_API ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	if (!hooked(RA()) || !msg || fd_kind(fd) != FD_SOCK)
		return real.sendmsg(fd, msg, flags);
	return sock_io(fd, (struct msghdr *)msg, flags, 1);
}

/* ---- accept, connect, close ------------------------------------------------- */

/* accept4 has no per-call "don't wait" flag (SOCK_NONBLOCK is for the new
 * socket; the listener's O_NONBLOCK is shared with every thread and
 * process that holds it, so it cannot be flipped for one call without
 * making another thread's blocking accept fail with EAGAIN).  io_uring's
 * accept can be made not to wait: it is tried at once, without blocking,
 * and when nothing is queued it only arms an internal poll, which is then
 * cancelled.  Each worker thread gets a private two-entry ring for this,
 * used only between submit and completion inside one call (never across a
 * park), and closed when the thread exits. */
#ifdef HAVE_LIBURING
static pthread_key_t ring_key;
static int ring_key_ok;
static __thread struct io_uring *tl_ring;
static __thread int tl_ring_refused;

static void ring_free(void *p)
{
	io_uring_queue_exit(p);
	free(p);
}

static void ring_key_init(void)
{
	ring_key_ok = pthread_key_create(&ring_key, ring_free) == 0;
}

/* This thread's ring; NULL where io_uring is refused (seccomp, disabled,
 * RLIMIT_MEMLOCK) or no key could hold it. */
static struct io_uring *my_ring(void)
{
	if (tl_ring || tl_ring_refused)
		return tl_ring;
	struct io_uring *r = ring_key_ok ? malloc(sizeof(*r)) : NULL;
	if (!r || io_uring_queue_init(2, r, 0) < 0) {
		free(r);
		tl_ring_refused = 1;
		return NULL;
	}
	pthread_setspecific(ring_key, r);
	tl_ring = r;
	return r;
}

/* A ring that failed to take a submission is given up for good on this
 * thread (accept falls back to libc's).  Tearing it down cancels whatever
 * it still holds, so no armed accept is left behind. */
static void ring_give_up(void)
{
	struct io_uring *r = tl_ring;
	tl_ring = NULL;
	tl_ring_refused = 1;
	if (r) {
		pthread_setspecific(ring_key, NULL);
		ring_free(r);
	}
}

/* Wait for the completion of the operation tagged tag; its result. */
static int ring_result(struct io_uring *r, uint64_t tag, int *other)
{
	for (;;) {
		struct io_uring_cqe *cqe;
		int rc = io_uring_wait_cqe(r, &cqe);
		if (rc == -EINTR)
			continue;
		if (rc < 0)
			return rc;
		uint64_t t = cqe->user_data;
		int res = cqe->res;
		io_uring_cqe_seen(r, cqe);
		if (t == tag)
			return res;
		*other = 1;
	}
}

/* One accept4 that never waits.  The new fd, -EAGAIN when nothing is
 * queued, another negative errno, or -ENOSYS without a ring.  OPAQUE: the
 * thread-local ring is looked up anew on every call, never kept across
 * the caller's parks (the fiber may resume on another thread). */
static OPAQUE int accept_nowait(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
	struct io_uring *r = my_ring();
	if (!r)
		return -ENOSYS;
	struct io_uring_sqe *sqe = io_uring_get_sqe(r);
	if (!sqe)
		return -ENOSYS;
	io_uring_prep_accept(sqe, fd, addr, addrlen, flags);
	io_uring_sqe_set_data64(sqe, 1);
	if (io_uring_submit(r) != 1) {
		ring_give_up();
		return -ENOSYS;
	}
	struct io_uring_cqe *cqe;
	if (io_uring_peek_cqe(r, &cqe) == 0) { /* done at once: the usual case */
		int res = cqe->res;
		io_uring_cqe_seen(r, cqe);
		return res;
	}
	/* Nothing queued: the accept waits on an internal poll.  Cancel it;
	 * a connection that arrived meanwhile is still accepted (the result
	 * then is its fd, not -ECANCELED), so none is lost.  Both completions
	 * are reaped before the ring is used again. */
	sqe = io_uring_get_sqe(r);
	if (!sqe) {
		ring_give_up();
		return -ENOSYS;
	}
	io_uring_prep_cancel64(sqe, 1, 0);
	io_uring_sqe_set_data64(sqe, 2);
	if (io_uring_submit(r) != 1) {
		ring_give_up();
		return -ENOSYS;
	}
	int cancel_seen = 0;
	int res = ring_result(r, 1, &cancel_seen);
	if (!cancel_seen) {
		int dummy = 0;
		ring_result(r, 2, &dummy);
	}
	return res == -ECANCELED || res == -EINTR ? -EAGAIN : res;
}
#else
static void ring_key_init(void)
{
}

static int accept_nowait(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
	return -ENOSYS;
}
#endif

/* A blocking listener: accept what is queued, else park until the
 * listener is readable and try again.  Another thread that takes the
 * connection first only sends the fiber back to wait.  Without io_uring
 * the accept is libc's once the listener was seen readable, and can then
 * lose that race and block (see zokio_hook.h). */
static int accept_hooked(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
	if (fd_kind(fd) != FD_SOCK || (flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC)))
		return real.accept4(fd, addr, addrlen, flags);
	int64_t deadline = NOT_YET;
	for (;;) {
		int r = accept_nowait(fd, addr, addrlen, flags);
		if (r >= 0)
			return r;
		if (r == -ENOSYS) {
			struct pollfd p = { .fd = fd, .events = POLLIN };
			if (real.poll(&p, 1, 0) != 0)
				return real.accept4(fd, addr, addrlen, flags);
		} else if (r == -EINTR) {
			continue;
		} else if (r != -EAGAIN) {
			return (int)fail(-r);
		}
		if (deadline == NOT_YET) {
			if (fd_nonblocking(fd))
				return r == -ENOSYS ? real.accept4(fd, addr, addrlen, flags) : (int)fail(EAGAIN);
			deadline = sock_deadline(fd, SO_RCVTIMEO);
		}
		int rc = park_fd(fd, POLLIN, deadline);
		if (rc)
			return (int)fail(rc == OWN_TIMEOUT ? EAGAIN : -rc);
	}
}

HOOK_API int accept(int fd, struct sockaddr *addr, socklen_t *addrlen)
{
	if (!hooked(RA()))
		return real.accept(fd, addr, addrlen);
	return accept_hooked(fd, addr, addrlen, 0);
}

HOOK_API int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
	if (!hooked(RA()))
		return real.accept4(fd, addr, addrlen, flags);
	return accept_hooked(fd, addr, addrlen, flags);
}

/* A blocking connect: made non-blocking for the connect call alone (the
 * flags are restored before the fiber parks), then the fiber waits for the
 * outcome.  SO_SNDTIMEO expiring gives EINPROGRESS, as on Linux. */
static int connect_hooked(int fd, const struct sockaddr *addr, socklen_t len)
{
	if (fd_kind(fd) != FD_SOCK)
		return real.connect(fd, addr, len);
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (fl & O_NONBLOCK) || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return real.connect(fd, addr, len);
	int r = real.connect(fd, addr, len);
	int e = get_errno();
	fcntl(fd, F_SETFL, fl);
	if (r == 0)
		return 0;
	if (e != EINPROGRESS)
		return (int)fail(e);
	int rc = park_fd(fd, POLLOUT, sock_deadline(fd, SO_SNDTIMEO));
	if (rc)
		return (int)fail(rc == OWN_TIMEOUT ? EINPROGRESS : -rc);
	int err = 0;
	socklen_t elen = sizeof(err);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
		return -1;
	return err ? (int)fail(err) : 0;
}

HOOK_API int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	if (!hooked(RA()))
		return real.connect(fd, addr, len);
	return connect_hooked(fd, addr, len);
}

HOOK_API int close(int fd)
{
	/* Forget on every thread: the number may come back as anything. */
	fd_forget(fd);
	return real.close(fd);
}

/* ---- poll, ppoll, select ------------------------------------------------- */

#define POLL_RD (POLLIN | POLLPRI | POLLRDNORM | POLLRDBAND | POLLRDHUP)
#define POLL_WR (POLLOUT | POLLWRNORM | POLLWRBAND)

/* Several fds, or one in both directions, are waited for through an epoll
 * set that holds them: the set is readable as soon as one of them is
 * ready, and that is one fd for the runtime to wait on.  Each fiber keeps
 * its set (fiber-local; closed when the fiber ends), so a loop that polls
 * the same fds again and again - libcurl polls its socket and its wake-up
 * pipe for every response - pays no epoll_create1/close per call, and the
 * runtime's backend sees the same fd each time.
 *
 * The set is brought in line with each call's fds with EPOLL_CTL_MOD (ADD
 * when the fd's current file is not in the set), never trusted blindly: a
 * number closed behind the hook's back (fclose, close_range, an io_uring
 * close) and reused for another file must not leave the new file
 * unwatched.  fds of the previous call not in this one are deleted.  The
 * opposite case - a registration of a file that has since lost its number
 * but is still open elsewhere - can only make the set look ready when
 * nothing polled is: a wake that finds nothing ready therefore has the
 * set rebuilt from scratch before the next wait. */
struct pollset {
	int ep;      /* -1: none */
	int stale;   /* rebuild before the next wait */
	size_t n, cap;
	int *fds;    /* what the last call registered */
};

/* Is ep (still) one of the hook's sets?  An application that closes every
 * fd (close() loops after fork, say) may close it under us. */
static int set_is_ours(int ep)
{
	return ep < 0 || ep >= KINDS_MAX ||
	       atomic_load_explicit(&kinds[ep], memory_order_relaxed) == FD_HOOK_SET;
}

static void set_drop(struct pollset *s)
{
	if (s->ep >= 0 && set_is_ours(s->ep)) {
		fd_forget(s->ep);
		real.close(s->ep);
	}
	s->ep = -1;
	s->n = 0;
	s->stale = 0;
}

static void set_free(void *p)
{
	struct pollset *s = p;
	set_drop(s);
	free(s->fds);
	free(s);
}

/* The calling fiber's set (NULL: none could be made; the caller then uses
 * a set of its own for the one call). */
static struct pollset *my_set(void)
{
	if (!set_key_ok)
		return NULL;
	struct pollset *s = zk_key_get(set_key);
	if (s)
		return s;
	s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->ep = -1;
	if (zk_key_set(set_key, s) != 0) {
		free(s);
		return NULL;
	}
	return s;
}

static int fd_in(const struct pollfd *fds, nfds_t n, int fd)
{
	for (nfds_t i = 0; i < n; i++)
		if (fds[i].fd == fd)
			return 1;
	return 0;
}

/* Make s hold exactly the interests of fds (fd < 0 ignored, duplicates
 * merged).  0 or a negative errno. */
static int set_sync(struct pollset *s, const struct pollfd *fds, nfds_t n)
{
	if (s->stale || (s->ep >= 0 && !set_is_ours(s->ep)))
		set_drop(s);
	if (s->ep < 0) {
		s->ep = epoll_create1(EPOLL_CLOEXEC);
		if (s->ep < 0)
			return -get_errno();
		if (s->ep < KINDS_MAX)
			atomic_store_explicit(&kinds[s->ep], FD_HOOK_SET, memory_order_relaxed);
		s->n = 0;
	}
	for (size_t i = 0; i < s->n; i++) /* the last call's fds this one lacks */
		if (!fd_in(fds, n, s->fds[i]))
			epoll_ctl(s->ep, EPOLL_CTL_DEL, s->fds[i], NULL); /* gone already: fine */
	if (n > s->cap) {
		int *p = realloc(s->fds, n * sizeof(*p));
		if (!p)
			return -ENOMEM;
		s->fds = p;
		s->cap = n;
	}
	s->n = 0;
	for (nfds_t i = 0; i < n; i++) {
		int fd = fds[i].fd;
		if (fd < 0 || fd_in(fds, i, fd))
			continue;
		uint32_t want = 0;
		for (nfds_t j = i; j < n; j++)
			if (fds[j].fd == fd)
				want |= (uint16_t)fds[j].events;
		struct epoll_event e = { .events = want & (POLL_RD | POLL_WR), .data.fd = fd };
		int rc = epoll_ctl(s->ep, EPOLL_CTL_MOD, fd, &e);
		if (rc < 0 && get_errno() == ENOENT)
			rc = epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &e);
		/* EPERM: a file epoll refuses is always ready for what poll can
		 * report on it; since it was not, it never will be. */
		if (rc < 0 && get_errno() != EPERM) {
			rc = -get_errno();
			set_drop(s); /* the set no longer matches its list */
			return rc;
		}
		s->fds[s->n++] = fd;
	}
	return 0;
}

/* Park until one of fds may be ready (nothing was when this is called) or
 * deadline passes.  empty_wake: the previous wait of this call woke, yet
 * nothing was ready.  0 (look again), OWN_TIMEOUT, -ETIMEDOUT, -ECANCELED. */
static int wait_any(const struct pollfd *fds, nfds_t n, int64_t deadline, int empty_wake)
{
	nfds_t used = 0, at = 0;
	for (nfds_t i = 0; i < n; i++)
		if (fds[i].fd >= 0) {
			used++;
			at = i;
		}
	if (used == 0) {
		int rc = zk_sleep_until(deadline < 0 ? INT64_MAX : deadline);
		return rc == 0 ? OWN_TIMEOUT : rc;
	}
	short ev = fds[at].events;
	if (used == 1 && ev && (!(ev & ~POLL_RD) || !(ev & ~POLL_WR)) && !(ev & POLLPRI))
		return park_fd(fds[at].fd, (ev & POLL_RD) ? POLLIN : POLLOUT, deadline);
	struct pollset own = { .ep = -1 }, *s = my_set();
	if (!s)
		s = &own;
	if (empty_wake)
		s->stale = 1;
	int rc = set_sync(s, fds, n);
	if (rc == 0)
		rc = park_fd(s->ep, POLLIN, deadline);
	if (s == &own) {
		set_drop(&own);
		free(own.fds);
	}
	return rc;
}

static int64_t ms_deadline(int ms)
{
	return ms < 0 ? -1 : zk_now_ns() + (int64_t)ms * 1000000;
}

static int64_t ts_deadline(const struct timespec *ts)
{
	if (!ts)
		return -1;
	return zk_now_ns() + (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

/* poll() in a fiber, with an absolute deadline (< 0: none). */
static int poll_hooked(struct pollfd *fds, nfds_t n, int64_t deadline)
{
	for (int woke = 0;; woke = 1) {
		int r = real.poll(fds, n, 0);
		if (r != 0)
			return r;
		int rc = wait_any(fds, n, deadline, woke);
		if (rc == OWN_TIMEOUT)
			return 0;
		if (rc < 0)
			return (int)fail(-rc);
	}
}

HOOK_API int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	if (!hooked(RA()) || timeout == 0)
		return real.poll(fds, n, timeout);
	return poll_hooked(fds, n, ms_deadline(timeout));
}

HOOK_API int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
	if (!hooked(RA()) || timeout == 0 || fdslen / sizeof(*fds) < n) {
		if (real.poll_chk)
			return real.poll_chk(fds, n, timeout, fdslen);
		if (fdslen / sizeof(*fds) < n)
			abort();
		return real.poll(fds, n, timeout);
	}
	return poll_hooked(fds, n, ms_deadline(timeout));
}

static int ppoll_bad_timeout(const struct timespec *t)
{
	return t && (t->tv_sec < 0 || t->tv_nsec < 0 || t->tv_nsec >= 1000000000);
}

/* ppoll with a signal mask, in a fiber.  What ppoll promises is that the
 * signals its mask lets in - usually ones the thread otherwise blocks, so
 * that a handler cannot run between checking a flag and waiting - are
 * delivered only during the wait, and make it fail with EINTR.  The mask
 * cannot stay applied to the worker while the fiber is parked (the worker
 * runs other fibers meanwhile), so:
 *   - every look at the fds is libc's ppoll with a zero timeout and the
 *     caller's mask, which applies the mask atomically for that instant:
 *     a signal the mask lets in that is pending then is handled right
 *     there, on this thread, and the call fails with EINTR;
 *   - while parked, the fiber also waits on a signalfd of the signals the
 *     mask lets in that the thread's own mask blocks: one becoming pending
 *     wakes the fiber, and the next look handles it (EINTR).
 * So a process-directed signal that every thread blocks outside ppoll
 * interrupts the call exactly as it would interrupt ppoll.  Not preserved:
 * a signal sent to one thread (pthread_kill, tgkill) interrupts the call
 * only while the fiber is on that thread; and signals the mask blocks but
 * the thread's mask does not may be handled on the worker while the fiber
 * is parked (as on any other thread of the process that does not block
 * them), where ppoll would have held them until it returned. */
static int ppoll_masked(struct pollfd *fds, nfds_t n, int64_t deadline, const sigset_t *mask)
{
	sigset_t cur, let_in;
	int sfd = -1;
	sigemptyset(&let_in);
	if (pthread_sigmask(SIG_SETMASK, NULL, &cur) == 0) {
		for (int sig = 1; sig < NSIG; sig++)
			if (sigismember(&cur, sig) == 1 && sigismember(mask, sig) == 0)
				sigaddset(&let_in, sig);
		if (!sigisemptyset(&let_in))
			sfd = signalfd(-1, &let_in, SFD_NONBLOCK | SFD_CLOEXEC);
	}
	struct pollfd *all = fds;
	nfds_t total = n;
	if (sfd >= 0) {
		all = malloc((n + 1) * sizeof(*all));
		if (!all) {
			real.close(sfd);
			return (int)fail(ENOMEM);
		}
		if (n)
			memcpy(all, fds, n * sizeof(*all));
		all[n] = (struct pollfd){ .fd = sfd, .events = POLLIN };
		total = n + 1;
	}
	const struct timespec zero = { 0, 0 };
	int res, e = 0;
	for (int woke = 0;; woke = 1) {
		res = real.ppoll(fds, n, &zero, mask);
		if (res != 0) {
			e = get_errno();
			break;
		}
		int rc = wait_any(all, total, deadline, woke);
		if (rc == OWN_TIMEOUT)
			break;
		if (rc < 0) {
			res = -1;
			e = -rc;
			break;
		}
	}
	if (all != fds)
		free(all);
	if (sfd >= 0)
		real.close(sfd);
	if (res < 0)
		set_errno(e);
	return res;
}

/* A ppoll that is libc's to make: nothing to park for (or EINVAL). */
static int ppoll_passes(const struct timespec *t)
{
	return ppoll_bad_timeout(t) || (t && t->tv_sec == 0 && t->tv_nsec == 0);
}

HOOK_API int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *t, const sigset_t *mask)
{
	if (!hooked(RA()) || ppoll_passes(t))
		return real.ppoll(fds, n, t, mask);
	if (mask)
		return ppoll_masked(fds, n, ts_deadline(t), mask);
	return poll_hooked(fds, n, ts_deadline(t));
}

HOOK_API int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *t,
			 const sigset_t *mask, size_t fdslen)
{
	if (!hooked(RA()) || ppoll_passes(t) || fdslen / sizeof(*fds) < n) {
		if (real.ppoll_chk)
			return real.ppoll_chk(fds, n, t, mask, fdslen);
		if (fdslen / sizeof(*fds) < n)
			abort();
		return real.ppoll(fds, n, t, mask);
	}
	if (mask)
		return ppoll_masked(fds, n, ts_deadline(t), mask);
	return poll_hooked(fds, n, ts_deadline(t));
}

/* select(): libc's select with a zero timeout decides what is ready; in
 * between the fiber waits on the same fds as a poll set. */
HOOK_API int select(int nfds, fd_set *rd, fd_set *wr, fd_set *ex, struct timeval *tv)
{
	if (!hooked(RA()) || nfds < 0 || nfds > FD_SETSIZE || (tv && tv->tv_sec == 0 && tv->tv_usec == 0) ||
	    (tv && (tv->tv_sec < 0 || tv->tv_usec < 0 || tv->tv_usec >= 1000000)))
		return real.select(nfds, rd, wr, ex, tv);
	int64_t deadline = tv ? zk_now_ns() + (int64_t)tv->tv_sec * 1000000000 + tv->tv_usec * 1000 : -1;
	struct pollfd *p = NULL;
	nfds_t n = 0;
	int res, woke = 0;
	for (;;) {
		fd_set r2, w2, e2;
		if (rd)
			r2 = *rd;
		if (wr)
			w2 = *wr;
		if (ex)
			e2 = *ex;
		struct timeval zero = { 0, 0 };
		res = real.select(nfds, rd ? &r2 : NULL, wr ? &w2 : NULL, ex ? &e2 : NULL, &zero);
		if (res != 0) {
			if (res > 0) {
				if (rd)
					*rd = r2;
				if (wr)
					*wr = w2;
				if (ex)
					*ex = e2;
			}
			break;
		}
		if (!p) {
			p = malloc(sizeof(*p) * (size_t)(nfds ? nfds : 1));
			if (!p) {
				res = (int)fail(ENOMEM);
				break;
			}
			for (int fd = 0; fd < nfds; fd++) {
				short ev = (short)((rd && FD_ISSET(fd, rd) ? POLLIN : 0) |
						   (wr && FD_ISSET(fd, wr) ? POLLOUT : 0) |
						   (ex && FD_ISSET(fd, ex) ? POLLPRI : 0));
				if (ev) {
					p[n].fd = fd;
					p[n].events = ev;
					p[n].revents = 0;
					n++;
				}
			}
		}
		int rc = wait_any(p, n, deadline, woke);
		woke = 1;
		if (rc == OWN_TIMEOUT) {
			if (rd)
				FD_ZERO(rd);
			if (wr)
				FD_ZERO(wr);
			if (ex)
				FD_ZERO(ex);
			res = 0;
			break;
		}
		if (rc < 0) {
			res = (int)fail(-rc);
			break;
		}
	}
	free(p);
	if (tv) { /* Linux reports the time not slept */
		int64_t left = deadline - zk_now_ns();
		if (left < 0)
			left = 0;
		tv->tv_sec = left / 1000000000;
		tv->tv_usec = (left % 1000000000) / 1000;
	}
	return res;
}

/* ---- sleeps ----------------------------------------------------------------- */

static int64_t ns_after(const struct timespec *ts)
{
	int64_t now = zk_now_ns();
	if (ts->tv_sec >= (INT64_MAX - now) / 1000000000 - 1)
		return INT64_MAX;
	return now + (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

static void remaining(int64_t deadline, struct timespec *rem)
{
	if (!rem)
		return;
	int64_t left = deadline == INT64_MAX ? INT64_MAX : deadline - zk_now_ns();
	if (left < 0)
		left = 0;
	rem->tv_sec = (time_t)(left / 1000000000);
	rem->tv_nsec = (long)(left % 1000000000);
}

static int bad_ts(const struct timespec *ts)
{
	return !ts || ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000 || ts->tv_sec < 0;
}

HOOK_API int nanosleep(const struct timespec *req, struct timespec *rem)
{
	if (!hooked(RA()) || bad_ts(req))
		return real.nanosleep(req, rem);
	int64_t d = ns_after(req);
	int rc = zk_sleep_until(d);
	if (rc == 0)
		return 0;
	remaining(d, rem);
	return (int)fail(-rc);
}

HOOK_API int clock_nanosleep(clockid_t clk, int flags, const struct timespec *req,
			     struct timespec *rem)
{
	int known = clk == CLOCK_MONOTONIC || clk == CLOCK_REALTIME || clk == CLOCK_BOOTTIME ||
		    clk == CLOCK_TAI;
	if (!hooked(RA()) || !known || bad_ts(req))
		return real.clock_nanosleep(clk, flags, req, rem);
	int64_t d;
	if (!(flags & TIMER_ABSTIME)) {
		d = ns_after(req);
	} else if (clk == CLOCK_MONOTONIC) {
		d = (int64_t)req->tv_sec * 1000000000 + req->tv_nsec;
	} else { /* another clock's absolute time: converted once, now */
		struct timespec now;
		clock_gettime(clk, &now);
		int64_t delta = ((int64_t)req->tv_sec - now.tv_sec) * 1000000000 +
				(req->tv_nsec - now.tv_nsec);
		d = zk_now_ns() + (delta > 0 ? delta : 0);
	}
	int rc = zk_sleep_until(d);
	if (rc == 0)
		return 0;
	if (!(flags & TIMER_ABSTIME))
		remaining(d, rem);
	return -rc; /* clock_nanosleep returns the error number */
}

HOOK_API int usleep(useconds_t us)
{
	if (!hooked(RA()))
		return real.usleep(us);
	int rc = zk_sleep_until(zk_now_ns() + (int64_t)us * 1000);
	return rc ? (int)fail(-rc) : 0;
}

HOOK_API unsigned sleep(unsigned s)
{
	if (!hooked(RA()))
		return real.sleep(s);
	int64_t d = zk_now_ns() + (int64_t)s * 1000000000;
	if (zk_sleep_until(d) == 0)
		return 0;
	int64_t left = d - zk_now_ns();
	return left > 0 ? (unsigned)((left + 999999999) / 1000000000) : 0;
}

/* ---- files --------------------------------------------------------------- */

/* pread/pwrite go to the runtime for files only: on a pipe or socket libc
 * says ESPIPE, where an io_uring read would just wait for data. */

static ssize_t zk_result(ssize_t r)
{
	return r < 0 ? fail((int)-r) : r;
}

HOOK_API ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
	if (!hooked(RA()) || fd_kind(fd) != FD_FILE)
		return real.pread(fd, buf, n, off);
	return zk_result(zk_pread(fd, buf, n, off));
}

HOOK_API ssize_t pread64(int fd, void *buf, size_t n, off_t off)
{
	if (!hooked(RA()) || fd_kind(fd) != FD_FILE)
		return real.pread64(fd, buf, n, off);
	return zk_result(zk_pread(fd, buf, n, off));
}

HOOK_API ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen)
{
	if (!hooked(RA()) || n > buflen || fd_kind(fd) != FD_FILE) {
		if (real.pread_chk)
			return real.pread_chk(fd, buf, n, off, buflen);
		if (n > buflen)
			abort();
		return real.pread(fd, buf, n, off);
	}
	return zk_result(zk_pread(fd, buf, n, off));
}

HOOK_API ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
	if (!hooked(RA()) || fd_kind(fd) != FD_FILE)
		return real.pwrite(fd, buf, n, off);
	return zk_result(zk_pwrite(fd, buf, n, off));
}

HOOK_API ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off)
{
	if (!hooked(RA()) || fd_kind(fd) != FD_FILE)
		return real.pwrite64(fd, buf, n, off);
	return zk_result(zk_pwrite(fd, buf, n, off));
}

HOOK_API int fsync(int fd)
{
	if (!hooked(RA()))
		return real.fsync(fd);
	return (int)zk_result(zk_fsync(fd));
}

/* ---- name resolution ---------------------------------------------------- */

#ifdef ZK_TSAN
/* ThreadSanitizer's own getaddrinfo interceptor, which runs before this
 * one, ignores the calling fiber's memory accesses until the call
 * returns.  Fibers and pool threads that first ran while a fiber was
 * parked in there had their lock operations go unseen, and TSan then
 * reported races on data every side accessed under one mutex (the
 * injector's, in test_hook).  Under TSan the lookup blocks the worker. */
HOOK_API int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
			 struct addrinfo **res)
{
	return real.getaddrinfo(node, service, hints, res);
}
#else
struct gai_job {
	const char *node, *service;
	const struct addrinfo *hints;
	struct addrinfo **res;
	int rc, err;
};

static void *gai_run(void *arg)
{
	struct gai_job *j = arg;
	j->rc = real.getaddrinfo(j->node, j->service, j->hints, j->res);
	j->err = get_errno(); /* for EAI_SYSTEM; the pool thread's errno */
	return NULL;
}

HOOK_API int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
			 struct addrinfo **res)
{
	if (!hooked(RA()))
		return real.getaddrinfo(node, service, hints, res);
	struct gai_job j = { node, service, hints, res, 0, 0 };
	if (zk_blocking(gai_run, &j, NULL) != 0)
		gai_run(&j); /* no pool thread could start: resolve right here */
	if (j.rc == EAI_SYSTEM)
		set_errno(j.err);
	return j.rc;
}
#endif

/* ---- the per-fiber switch ----------------------------------------------- */

int zk_hook_enable(int on)
{
	if (atomic_load(&resolve_state) != 2)
		resolve();
	if (static_runtime)
		return -ENOTSUP;
	if (!zk_self())
		return -EPERM;
	if (!key_ok)
		return -ENOMEM;
	int was = zk_key_get(off_key) == NULL;
	int rc = zk_key_set(off_key, on ? NULL : (void *)1);
	return rc < 0 ? rc : was;
}

int zk_hook_enabled(void)
{
	if (atomic_load(&resolve_state) != 2)
		resolve();
	return hook_on && key_ok && zk_self() && zk_key_get(off_key) == NULL;
}
