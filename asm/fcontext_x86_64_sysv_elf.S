/*
 * Context switch for x86_64, System V ABI, ELF (GNU as, AT&T syntax).
 *
 * Saved frame, lowest address first (the context pointer points at it):
 *
 *   0x00  MXCSR (32 bits) | x87 control word (16 bits) | unused
 *   0x08  r12
 *   0x10  r13
 *   0x18  r14
 *   0x20  r15
 *   0x28  rbx
 *   0x30  rbp
 *   0x38  return address (where the context resumes)
 *
 * These are exactly the registers the ABI calls callee-saved; the status
 * bits of MXCSR and the x87 status word are caller-saved and not kept, the
 * control bits (rounding mode, exception masks) are.
 *
 * A zk_transfer_t (two pointers) comes back in rax:rdx; passed to a fresh
 * context's entry function it goes in rdi:rsi.
 *
 * Two ways to resume, one frame: zk_jump_fcontext ends with an indirect
 * jump to the resume address (as Boost.Context does), zk_jump_fcontext_ret
 * with a ret.  The call into either pushed an entry on the CPU's return
 * stack buffer; ret pops it, the jump leaves it behind.
 *   - ret predicts the resume address only when the target was suspended
 *     from the same call site as the caller's, but then every return the
 *     resumed code makes up its call chain is predicted right.  That is the
 *     scheduler: all fibers suspend in the same function.
 *   - the jump is predicted by the indirect-branch predictor whatever the
 *     site, but the entry left behind shifts the return stack by one, and
 *     the resumed code's returns are mispredicted until it drains.  Best
 *     for two contexts that switch from different places in a tight loop.
 * Either may resume a context the other saved.
 *
 * IBT: every global entry and the trampoline start with endbr64.  A jump
 * to a resume address (a return address, with no landing pad by
 * construction) is marked notrack; ret is not checked by IBT.
 *
 * Shadow stacks (SHSTK) are not supported: a switch would have to switch
 * shadow stacks too (rstorssp/saveprevssp).  So the property note at the end
 * claims IBT only, never SHSTK, even under -fcf-protection=full (which is
 * why this file does not use <cet.h>: it would claim both), and the linker
 * leaves SHSTK off for any program that links this object.
 */
#if defined(__CET__) && (__CET__ & 1)
# define ZK_IBT 1
# define ZK_ENDBR endbr64
# define ZK_NOTRACK notrack
#else
# define ZK_IBT 0
# define ZK_ENDBR
# define ZK_NOTRACK
#endif

	.file	"fcontext_x86_64_sysv_elf.S"
	.text

/* The switch all three entries share: save the caller's registers below
 * its return address, switch to to's stack and restore to's registers.
 * Leaves rsp at to's resume address and the transfer in rax:rdx (and in
 * rdi:rsi for a fresh context's entry or an ontop function). */
.macro ZK_SWITCH
	leaq	-0x38(%rsp), %rsp	/* the return address is already at 0x38 */
	stmxcsr	(%rsp)
	fnstcw	0x4(%rsp)
	movq	%r12, 0x08(%rsp)
	movq	%r13, 0x10(%rsp)
	movq	%r14, 0x18(%rsp)
	movq	%r15, 0x20(%rsp)
	movq	%rbx, 0x28(%rsp)
	movq	%rbp, 0x30(%rsp)

	movq	%rsp, %rax		/* from = the frame just saved */
	movq	%rdi, %rsp		/* switch stacks */

	ldmxcsr	(%rsp)
	fldcw	0x4(%rsp)
	movq	0x08(%rsp), %r12
	movq	0x10(%rsp), %r13
	movq	0x18(%rsp), %r14
	movq	0x20(%rsp), %r15
	movq	0x28(%rsp), %rbx
	movq	0x30(%rsp), %rbp
	leaq	0x38(%rsp), %rsp

	movq	%rsi, %rdx		/* transfer = {from, data} in rax:rdx */
	movq	%rax, %rdi		/* and in rdi:rsi for a fresh context */
.endm

/* zk_transfer_t zk_jump_fcontext(zk_fcontext_t to (rdi), void *data (rsi))
 * Resumes to by an indirect jump. */
	.globl	zk_jump_fcontext
	.hidden	zk_jump_fcontext
	.type	zk_jump_fcontext, @function
	.align	16
zk_jump_fcontext:
	.cfi_startproc
	ZK_ENDBR
	ZK_SWITCH
	popq	%r8			/* resume address */
	ZK_NOTRACK jmp	*%r8
	.cfi_endproc
	.size	zk_jump_fcontext, .-zk_jump_fcontext

/* zk_transfer_t zk_jump_fcontext_ret(zk_fcontext_t to, void *data)
 * The same switch, resuming to by ret. */
	.globl	zk_jump_fcontext_ret
	.hidden	zk_jump_fcontext_ret
	.type	zk_jump_fcontext_ret, @function
	.align	16
zk_jump_fcontext_ret:
	.cfi_startproc
	ZK_ENDBR
	ZK_SWITCH
	ret
	.cfi_endproc
	.size	zk_jump_fcontext_ret, .-zk_jump_fcontext_ret

/* zk_transfer_t zk_ontop_fcontext(to (rdi), data (rsi), fn (rdx))
 * Restores to's registers, then enters fn with to's resume address left on
 * the stack as fn's return address: fn runs on to's stack, and its return
 * value is what to's suspended jump returns. */
	.globl	zk_ontop_fcontext
	.hidden	zk_ontop_fcontext
	.type	zk_ontop_fcontext, @function
	.align	16
zk_ontop_fcontext:
	.cfi_startproc
	ZK_ENDBR
	movq	%rdx, %r8		/* fn survives the register restore */
	ZK_SWITCH			/* leaves the resume address as fn's return
					 * address, fn's {from, data} in rdi:rsi */
	jmp	*%r8
	.cfi_endproc
	.size	zk_ontop_fcontext, .-zk_ontop_fcontext

/* zk_fcontext_t zk_make_fcontext(void *top (rdi), size_t size (rsi), fn (rdx))
 * Builds a frame below top whose resume address is the trampoline and whose
 * r12 slot holds fn.  The frame sits so that the trampoline starts with rsp
 * 16-byte aligned, and its call to fn then gives fn the ABI's entry alignment
 * (rsp + 8 a multiple of 16). */
	.globl	zk_make_fcontext
	.hidden	zk_make_fcontext
	.type	zk_make_fcontext, @function
	.align	16
zk_make_fcontext:
	.cfi_startproc
	ZK_ENDBR
	movq	%rdi, %rax
	andq	$-16, %rax		/* align top down to 16 */
	leaq	-0x50(%rax), %rax	/* frame; frame + 0x40 is 16-aligned */

	stmxcsr	(%rax)			/* start with the creator's FP control state */
	fnstcw	0x4(%rax)
	movq	%rdx, 0x08(%rax)	/* r12 = fn */
	movq	$0, 0x30(%rax)		/* rbp = 0 ends frame-pointer walks */
	leaq	zk__fcontext_trampoline(%rip), %rcx
	movq	%rcx, 0x38(%rax)
	ret
	.cfi_endproc
	.size	zk_make_fcontext, .-zk_make_fcontext

/* First code of every fresh context.  Entered by jump (transfer in rax:rdx)
 * or as the return of an ontop function (transfer in rax:rdx as well). */
	.type	zk__fcontext_trampoline, @function
	.align	16
zk__fcontext_trampoline:
	.cfi_startproc
	.cfi_undefined rip		/* outermost frame for unwinders */
	ZK_ENDBR
	movq	%rax, %rdi
	movq	%rdx, %rsi
	call	*%r12
	/* the entry function must not return: that is a broken invariant */
	ud2
	.cfi_endproc
	.size	zk__fcontext_trampoline, .-zk__fcontext_trampoline

#if ZK_IBT
	.pushsection .note.gnu.property, "a"
	.p2align 3
	.long	4			/* name size */
	.long	16			/* descriptor size */
	.long	5			/* NT_GNU_PROPERTY_TYPE_0 */
	.asciz	"GNU"
	.long	0xc0000002		/* GNU_PROPERTY_X86_FEATURE_1_AND */
	.long	4			/* property data size */
	.long	1			/* GNU_PROPERTY_X86_FEATURE_1_IBT */
	.long	0			/* pad to 8 */
	.popsection
#endif

	.section .note.GNU-stack,"",%progbits
