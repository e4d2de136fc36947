/*
 * Context switch for AArch64, AAPCS64, ELF (GNU as).
 *
 * Saved frame, lowest address first (the context pointer points at it):
 *
 *   0x00  d8   | d9
 *   0x10  d10  | d11
 *   0x20  d12  | d13
 *   0x30  d14  | d15
 *   0x40  x19  | x20
 *   0x50  x21  | x22
 *   0x60  x23  | x24
 *   0x70  x25  | x26
 *   0x80  x27  | x28
 *   0x90  x29 (fp) | x30 (lr: where the context resumes)
 *   0xa0  FPCR | unused
 *   0xb0  (the suspended code's sp: the frame is popped on resume)
 *
 * These are exactly the registers AAPCS64 calls callee-saved: x19-x29, sp,
 * and the low 64 bits of v8-v15.  FPCR (rounding mode, flush-to-zero,
 * trap enables) is control state that a C caller expects to survive a call,
 * so it is kept too; FPSR only holds sticky status flags and is not.
 * The frame is a multiple of 16 bytes: sp stays 16-byte aligned throughout,
 * as the architecture (SCTLR_EL1.SA0 on Linux) requires.
 *
 * A zk_transfer_t (two pointers) comes back in x0:x1; passed to a fresh
 * context's entry function it goes in x0:x1 as well.
 *
 * BTI: the global entries begin with "bti c" (reached by bl, or by br x16/x17
 * from a PLT).  A context resumes by "ret" to its saved lr and ret is never
 * checked by BTI, so resume addresses (ordinary return addresses and the
 * trampoline) need no landing pad.  ontop enters the user's fn with br, which
 * only a "bti c" pad accepts when the register is x16 or x17: hence x16.
 * The hint encodings assemble with any -march; they are NOPs without BTI.
 */
#if defined(__ARM_FEATURE_BTI_DEFAULT) && __ARM_FEATURE_BTI_DEFAULT
# define ZK_BTI_C	hint	#34	/* bti c */
#else
# define ZK_BTI_C
#endif

#define ZK_FRAME	0xb0

	.file	"fcontext_arm64_aapcs_elf.S"
	.text

/* zk_transfer_t zk_jump_fcontext(zk_fcontext_t to (x0), void *data (x1)) */
	.globl	zk_jump_fcontext
	.hidden	zk_jump_fcontext
	.type	zk_jump_fcontext, %function
/* The x86_64 file's zk_jump_fcontext_ret; here both resume by ret. */
	.globl	zk_jump_fcontext_ret
	.hidden	zk_jump_fcontext_ret
	.type	zk_jump_fcontext_ret, %function
	.p2align 4
zk_jump_fcontext:
zk_jump_fcontext_ret:
	.cfi_startproc
	ZK_BTI_C
	sub	sp, sp, #ZK_FRAME
	stp	d8,  d9,  [sp, #0x00]
	stp	d10, d11, [sp, #0x10]
	stp	d12, d13, [sp, #0x20]
	stp	d14, d15, [sp, #0x30]
	stp	x19, x20, [sp, #0x40]
	stp	x21, x22, [sp, #0x50]
	stp	x23, x24, [sp, #0x60]
	stp	x25, x26, [sp, #0x70]
	stp	x27, x28, [sp, #0x80]
	stp	x29, x30, [sp, #0x90]
	mrs	x9, fpcr
	str	x9, [sp, #0xa0]

	mov	x9, sp			/* from = the frame just saved */
	mov	sp, x0			/* switch stacks */

	ldp	d8,  d9,  [sp, #0x00]
	ldp	d10, d11, [sp, #0x10]
	ldp	d12, d13, [sp, #0x20]
	ldp	d14, d15, [sp, #0x30]
	ldp	x19, x20, [sp, #0x40]
	ldp	x21, x22, [sp, #0x50]
	ldp	x23, x24, [sp, #0x60]
	ldp	x25, x26, [sp, #0x70]
	ldp	x27, x28, [sp, #0x80]
	ldp	x29, x30, [sp, #0x90]
	/* Writing FPCR can stall the pipeline on some cores; reading is
	 * cheap, and two contexts almost always share one FP mode. */
	ldr	x10, [sp, #0xa0]
	mrs	x11, fpcr
	cmp	x10, x11
	b.eq	1f
	msr	fpcr, x10
1:	add	sp, sp, #ZK_FRAME

	mov	x0, x9			/* transfer = {from, data} in x0:x1 */
	/* x1 already holds data */
	ret				/* to the resume address in x30 */
	.cfi_endproc
	.size	zk_jump_fcontext, .-zk_jump_fcontext
	.size	zk_jump_fcontext_ret, .-zk_jump_fcontext_ret

/* zk_transfer_t zk_ontop_fcontext(to (x0), data (x1), fn (x2))
 * Restores to's registers, including its resume address in x30, then
 * enters fn: fn runs on to's stack, and when it returns, its result in
 * x0:x1 is what to's suspended jump returns (or, for a fresh context, what
 * the trampoline hands the entry function). */
	.globl	zk_ontop_fcontext
	.hidden	zk_ontop_fcontext
	.type	zk_ontop_fcontext, %function
	.p2align 4
zk_ontop_fcontext:
	.cfi_startproc
	ZK_BTI_C
	sub	sp, sp, #ZK_FRAME
	stp	d8,  d9,  [sp, #0x00]
	stp	d10, d11, [sp, #0x10]
	stp	d12, d13, [sp, #0x20]
	stp	d14, d15, [sp, #0x30]
	stp	x19, x20, [sp, #0x40]
	stp	x21, x22, [sp, #0x50]
	stp	x23, x24, [sp, #0x60]
	stp	x25, x26, [sp, #0x70]
	stp	x27, x28, [sp, #0x80]
	stp	x29, x30, [sp, #0x90]
	mrs	x9, fpcr
	str	x9, [sp, #0xa0]

	mov	x9, sp
	mov	sp, x0

	ldp	d8,  d9,  [sp, #0x00]
	ldp	d10, d11, [sp, #0x10]
	ldp	d12, d13, [sp, #0x20]
	ldp	d14, d15, [sp, #0x30]
	ldp	x19, x20, [sp, #0x40]
	ldp	x21, x22, [sp, #0x50]
	ldp	x23, x24, [sp, #0x60]
	ldp	x25, x26, [sp, #0x70]
	ldp	x27, x28, [sp, #0x80]
	ldp	x29, x30, [sp, #0x90]	/* fn returns to to's resume address */
	ldr	x10, [sp, #0xa0]
	mrs	x11, fpcr
	cmp	x10, x11
	b.eq	1f
	msr	fpcr, x10
1:	add	sp, sp, #ZK_FRAME

	mov	x0, x9			/* fn({from, data}) */
	/* x1 already holds data */
	mov	x16, x2			/* br x16 lands on fn's "bti c" */
	br	x16
	.cfi_endproc
	.size	zk_ontop_fcontext, .-zk_ontop_fcontext

/* zk_fcontext_t zk_make_fcontext(void *top (x0), size_t size (x1), fn (x2))
 * Builds a frame just below top (aligned down to 16) whose resume address
 * is the trampoline and whose x19 slot holds fn.  Popping the frame leaves
 * sp at the aligned top, so fn starts with sp 16-byte aligned as the ABI
 * requires.  The other register slots are left as they are: the trampoline
 * reads none of them. */
	.globl	zk_make_fcontext
	.hidden	zk_make_fcontext
	.type	zk_make_fcontext, %function
	.p2align 4
zk_make_fcontext:
	.cfi_startproc
	ZK_BTI_C
	and	x0, x0, #~0xf		/* align top down to 16 */
	sub	x0, x0, #ZK_FRAME

	str	x2, [x0, #0x40]		/* x19 = fn */
	adr	x9, zk__fcontext_trampoline
	stp	xzr, x9, [x0, #0x90]	/* x29 = 0 ends frame-pointer walks; lr */
	mrs	x9, fpcr		/* start with the creator's FP mode */
	str	x9, [x0, #0xa0]
	ret
	.cfi_endproc
	.size	zk_make_fcontext, .-zk_make_fcontext

/* First code of every fresh context, reached by ret from a jump (transfer
 * in x0:x1) or as the return of an ontop function (transfer in x0:x1 too),
 * which is exactly where the entry function wants its argument. */
	.type	zk__fcontext_trampoline, %function
	.p2align 4
zk__fcontext_trampoline:
	.cfi_startproc
	.cfi_undefined x30		/* outermost frame for unwinders */
	blr	x19
	/* the entry function must not return: that is a broken invariant */
	udf	#0
	.cfi_endproc
	.size	zk__fcontext_trampoline, .-zk__fcontext_trampoline

/* GNU property note: tells the linker (which ANDs the bits of all inputs)
 * that this object is BTI- and PAC-compatible when the C code is built so,
 * without which one assembly file would turn BTI off for the whole binary.
 * The code signs nothing, so it is PAC-compatible as it stands. */
#if defined(__ARM_FEATURE_BTI_DEFAULT) && __ARM_FEATURE_BTI_DEFAULT
# define ZK_PROP_BTI	1
#else
# define ZK_PROP_BTI	0
#endif
#if defined(__ARM_FEATURE_PAC_DEFAULT) && __ARM_FEATURE_PAC_DEFAULT
# define ZK_PROP_PAC	2
#else
# define ZK_PROP_PAC	0
#endif
#if ZK_PROP_BTI || ZK_PROP_PAC
	.pushsection .note.gnu.property, "a"
	.p2align 3
	.long	4			/* name size */
	.long	16			/* descriptor size */
	.long	5			/* NT_GNU_PROPERTY_TYPE_0 */
	.asciz	"GNU"
	.long	0xc0000000		/* GNU_PROPERTY_AARCH64_FEATURE_1_AND */
	.long	4			/* property data size */
	.long	ZK_PROP_BTI | ZK_PROP_PAC
	.long	0			/* pad to 8 */
	.popsection
#endif

	.section .note.GNU-stack,"",%progbits
