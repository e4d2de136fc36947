/*
 * fcontext.h - the context-switch primitives implemented in asm/.
 *
 * A context is an opaque pointer to the registers a suspended execution
 * saved on its own stack.  The contract (the "fcontext" shape):
 *
 *   zk_make_fcontext(top, size, fn)  prepares a context on the stack whose
 *       highest address is top; the first jump to it calls fn(transfer) on
 *       that stack with the ABI's alignment.  fn must never return.
 *   zk_jump_fcontext(to, data)  saves the caller's callee-saved registers
 *       (integer and floating point control state) on its stack, switches to
 *       to, and returns in the resumed context {from, data}: from is the
 *       context just suspended, data the pointer given by whoever jumped.
 *   zk_jump_fcontext_ret(to, data)  the same switch; it resumes to by a
 *       return instead of an indirect jump, which keeps the CPU's return
 *       predictions right when to was suspended from the caller's own call
 *       site (the scheduler's case; asm/fcontext_x86_64_sysv_elf.S).
 *   zk_ontop_fcontext(to, data, fn)  like jump, but runs fn({from, data}) on
 *       to's stack first; what fn returns is what to's jump returns.
 *
 * A context is single-use: once resumed, its pointer is stale.
 */
#ifndef ZK_FCONTEXT_H
#define ZK_FCONTEXT_H

#include <stddef.h>

typedef void *zk_fcontext_t;

typedef struct {
	zk_fcontext_t fctx;
	void *data;
} zk_transfer_t;

zk_transfer_t zk_jump_fcontext(zk_fcontext_t const to, void *data);
zk_transfer_t zk_jump_fcontext_ret(zk_fcontext_t const to, void *data);
zk_fcontext_t zk_make_fcontext(void *top, size_t size, void (*fn)(zk_transfer_t));
zk_transfer_t zk_ontop_fcontext(zk_fcontext_t const to, void *data,
				zk_transfer_t (*fn)(zk_transfer_t));

#endif
