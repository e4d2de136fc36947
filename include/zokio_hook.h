/*
 * zokio_hook.h - libzokio_hook: unmodified blocking code parks the fiber
 * instead of blocking the worker.
 *
 * libzokio_hook interposes libc's blocking calls.  Load it either way:
 *
 *     LD_PRELOAD=libzokio_hook.so ./program          (program links libzokio.so)
 *     cc ... $(pkg-config --libs zokio-hook)         (links it in explicitly)
 *
 * The program must use the shared libzokio (libzokio.so): the hook finds
 * the runtime's own calls by their address inside libzokio.so and lets them
 * through untouched (hooked, the scheduler would park inside its own
 * wake-up path).  A program that links libzokio statically (libzokio.a)
 * carries its own copy of the runtime, whose code is mixed with the
 * program's and cannot be told apart from it, so the hook does not work
 * with it.  What happens then:
 *   - linked in explicitly (-lzokio_hook next to libzokio.a): the hook's
 *     calls reach the program's copy; the hook notices that this is not
 *     libzokio.so's runtime, says so in one line on stderr at start-up and
 *     stays off: every call is libc's (fibers block their workers as
 *     without the hook), zk_hook_enabled() returns 0 and zk_hook_enable()
 *     -ENOTSUP;
 *   - LD_PRELOADed: the program's copy is not in its dynamic symbol table,
 *     so the hook cannot even see it; it finds no running fiber and every
 *     call is libc's, silently - exactly as without the hook.
 * Either way nothing breaks; link libzokio shared to use the hook.
 *
 * Interposed: read, write, readv, writev, recv, recvfrom, recvmsg, send,
 * sendto, sendmsg, accept, accept4, connect, close, poll, ppoll, select,
 * nanosleep, clock_nanosleep, usleep, sleep, pread, pwrite (and their *64
 * names), fsync, getaddrinfo, and the _FORTIFY_SOURCE variants __read_chk,
 * __recv_chk, __recvfrom_chk, __pread_chk, __poll_chk, __ppoll_chk.
 *
 * Where a call is hooked: only inside a fiber whose hooking is on (the
 * default; see zk_hook_enable).  On a plain thread - any thread that is not
 * running a fiber, including the blocking pool's - every interposed call is
 * libc's own, unchanged, so preloading the library into a program that
 * does not use Zokio changes nothing.
 *
 * What a hooked call does (POSIX semantics are kept; return -1 and errno,
 * set on the thread the fiber runs on when it returns):
 *   - Sockets: the call is made with MSG_DONTWAIT; on EAGAIN the fiber parks
 *     until the socket is ready (zk_wait_readable / zk_wait_writable) and
 *     the call is made again.  The socket's own file status flags are never
 *     changed, so the application's view of them is exact:
 *       - a socket the application made non-blocking (O_NONBLOCK, FIONBIO,
 *         SOCK_NONBLOCK) stays non-blocking: EAGAIN as usual;
 *       - SO_RCVTIMEO / SO_SNDTIMEO are honoured: when the timeout passes
 *         the call fails with EAGAIN (or returns the bytes moved so far),
 *         as the kernel does; a connect whose SO_SNDTIMEO passes fails with
 *         EINPROGRESS, as Linux's does;
 *       - a blocking send/write/sendmsg moves all its bytes before it
 *         returns (or fails/times out, returning the count moved so far),
 *         and recv with MSG_WAITALL waits for the whole length;
 *       - connect on a non-blocking socket says EINPROGRESS as usual; on a
 *         blocking one the fiber parks until the connection is made or
 *         refused (the socket is non-blocking only during the connect call
 *         itself, restored before the fiber parks);
 *       - accept on a blocking listener takes a queued connection at once,
 *         else parks until the listener is readable and tries again.  The
 *         attempt never blocks (io_uring's accept, tried without waiting,
 *         on a private ring per worker thread), so a listener may be shared
 *         with plain threads and other processes: when one of them takes
 *         the connection first, the fiber just waits on.  Where io_uring is
 *         refused (seccomp, kernel.io_uring_disabled, a build without
 *         liburing) accept is libc's once the listener was seen readable,
 *         and can then lose that race and block its worker until the next
 *         connection;
 *   - Pipes, FIFOs, eventfds and other pollable fds that are blocking: the
 *     call is made with RWF_NOWAIT (preadv2/pwritev2 at the file position;
 *     the fd's flags are not touched) and the fiber parks until the fd is
 *     ready when it would wait.  A read returns what is there; a blocking
 *     write moves every byte - what fits, then the rest as room appears -
 *     or stops at an error with the count moved so far; a write of up to
 *     PIPE_BUF bytes goes in whole or not at all, so it stays atomic.  An
 *     fd that refuses RWF_NOWAIT (older kernels, some terminals and
 *     devices) is waited for with poll and then given to libc's call,
 *     which can still block when the room is smaller than the write.
 *   - Regular files, directories and block devices: read/write are libc's;
 *     pread, pwrite and fsync run as zk_pread / zk_pwrite / zk_fsync
 *     (io_uring, or the blocking pool under epoll).
 *   - poll, ppoll, select: tried at once; if nothing is ready and the
 *     timeout is not 0, the fiber parks until an fd is ready or the
 *     timeout passes.  Several fds are waited for through an epoll set
 *     that each fiber keeps for its next call (so polling the same fds
 *     again costs no set-up): one extra fd per fiber that has polled
 *     several fds, closed when the fiber ends.
 *   - ppoll with a signal mask: the mask is applied, atomically, at every
 *     look at the fds (libc's ppoll with a zero timeout), not while the
 *     fiber is parked - its worker runs other fibers then.  While parked,
 *     the fiber also waits for the signals the mask lets in that the
 *     thread blocks (a signalfd); when one becomes pending the fiber wakes
 *     and the next look runs its handler and fails with EINTR.  So a
 *     signal every thread blocks outside ppoll interrupts it as it would
 *     interrupt ppoll.  Not preserved: a signal sent to one thread
 *     (pthread_kill) interrupts the call only while the fiber is on that
 *     thread, and a signal the mask blocks but the thread does not may be
 *     handled on the worker while the fiber is parked (as on any other
 *     thread that does not block it).
 *   - nanosleep, clock_nanosleep, usleep, sleep: zk_sleep_ns / zk_sleep_until
 *     (CLOCK_REALTIME absolute sleeps are converted once, at the call).
 *   - getaddrinfo runs on the blocking pool (zk_blocking).
 *   - close forgets what the hook knew about the fd, then closes it.
 *
 * EINTR: a parked call is not interrupted by a signal (the signal runs on
 * whatever thread the kernel picks; the call resumes waiting, as if
 * SA_RESTART were set - also for poll, select and the sleeps, which the
 * kernel would fail with EINTR), except ppoll with a signal mask (above).  Instead, a hooked call that would wait
 * fails with ECANCELED once its fiber is cancelled (zk_cancel), and with
 * ETIMEDOUT once the fiber's deadline (zk_deadline_set) has passed; the
 * sleeps then fill in the time remaining, as for EINTR.
 *
 * errno and migration: errno is set on the thread the fiber runs on when
 * the call returns.  Code that took errno's address before the call (a
 * compiler may keep &errno across a call, e.g. for `errno = 0; read(...);
 * if (errno)`) can read another thread's errno once its fiber has moved to
 * another worker.  Run such libraries in pinned fibers (zk_spawn_opts_t
 * .pinned) or with zk_runtime_opts_t.no_migration = 1; on a one-worker
 * runtime the question does not arise.
 *
 * Set ZOKIO_HOOK=0 in the environment to turn the hook off for the whole
 * process (every call is then libc's).
 */
#ifndef ZOKIO_HOOK_H
#define ZOKIO_HOOK_H

#include "zokio.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Turn hooking on (on != 0) or off for the calling fiber; it starts on.
 * With hooking off, the fiber's interposed calls are libc's: they block
 * the worker thread (for code that must really block, e.g. while holding
 * an OS mutex).  Returns the previous setting (1 or 0), or -EPERM on a
 * plain thread, -ENOMEM, -ENOTSUP when the program links libzokio
 * statically (see above). */
ZK_API int zk_hook_enable(int on);

/* 1 if the calling fiber's libc calls are hooked now, else 0 (hooking
 * off, a plain thread, the hook disabled by ZOKIO_HOOK=0, or a program
 * with libzokio linked statically). */
ZK_API int zk_hook_enabled(void);

#ifdef __cplusplus
}
#endif
#endif /* ZOKIO_HOOK_H */
