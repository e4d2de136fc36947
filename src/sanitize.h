/*
 * sanitize.h - how a context switch announces itself to AddressSanitizer,
 * ThreadSanitizer and Valgrind.  Every hook compiles to nothing in a plain
 * build.
 *
 * ASan keeps a "fake stack" per stack for use-after-return detection and must
 * know which stack is live: __sanitizer_start_switch_fiber() goes right
 * before the jump (naming the stack we go to), and
 * __sanitizer_finish_switch_fiber() must be the first thing to run after the
 * jump returns, in the resumed context (it hands back that context's saved
 * fake stack).  A context that will never be resumed passes NULL as its
 * save slot, which frees its fake stack.
 *
 * TSan follows each fiber as if it were a thread: create when a stack is
 * bound, switch right before the jump, destroy after it ended (from another
 * context).
 */
#ifndef ZK_SANITIZE_H
#define ZK_SANITIZE_H

#include "config.h"
#include <stddef.h>

/* zk__asan_forget: before unmapping memory that served as a stack.  The
 * frames a fiber never returned from (its last switch away) leave their
 * redzones poisoned in ASan's shadow, and whatever the kernel maps there
 * next (a later runtime's io_uring rings, say) would read as a stack
 * buffer underflow. */
#ifdef ZK_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define zk__asan_start(save, bottom, size) __sanitizer_start_switch_fiber((save), (bottom), (size))
#define zk__asan_finish(save) __sanitizer_finish_switch_fiber((save), NULL, NULL)
#define zk__asan_forget(addr, size) __asan_unpoison_memory_region((addr), (size))
#else
#define zk__asan_start(save, bottom, size) ((void)(save), (void)(bottom), (void)(size))
#define zk__asan_finish(save) ((void)(save))
#define zk__asan_forget(addr, size) ((void)(addr), (void)(size))
#endif

#ifdef ZK_TSAN
#include <sanitizer/tsan_interface.h>
#define zk__tsan_current() __tsan_get_current_fiber()
#define zk__tsan_create() __tsan_create_fiber(0)
#define zk__tsan_switch(f) __tsan_switch_to_fiber((f), 0)
#define zk__tsan_destroy(f) __tsan_destroy_fiber(f)
#define zk__tsan_acquire(addr) __tsan_acquire(addr)
#define zk__tsan_release(addr) __tsan_release(addr)
#else
#define zk__tsan_current() ((void *)0)
#define zk__tsan_create() ((void *)0)
#define zk__tsan_switch(f) ((void)(f))
#define zk__tsan_destroy(f) ((void)(f))
#define zk__tsan_acquire(addr) ((void)(addr))
#define zk__tsan_release(addr) ((void)(addr))
#endif

#ifdef ZK_VALGRIND
#include <valgrind/valgrind.h>
#define zk__vg_stack_register(lo, hi) VALGRIND_STACK_REGISTER((lo), (hi))
#define zk__vg_stack_deregister(id) VALGRIND_STACK_DEREGISTER(id)
#else
#define zk__vg_stack_register(lo, hi) ((void)(lo), (void)(hi), 0u)
#define zk__vg_stack_deregister(id) ((void)(id))
#endif

/* Full memory barrier between a store and a later load of another variable
 * (the Dekker pattern of parking and deque take).  ThreadSanitizer does not
 * model atomic_thread_fence, so under TSan the callers use seq_cst
 * operations on the variables themselves and this barrier is kept only for
 * the hardware. */
#ifdef ZK_TSAN
#include <stdatomic.h>
extern _Atomic int zk__tsan_fence_word;
#define zk__fence_seq_cst() ((void)atomic_fetch_add_explicit(&zk__tsan_fence_word, 0, memory_order_seq_cst))
#else
#define zk__fence_seq_cst() atomic_thread_fence(memory_order_seq_cst)
#endif

#endif
