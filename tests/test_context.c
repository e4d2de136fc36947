/*
 * test_context.c - the context-switch layer (asm/fcontext_*.S) on its own.
 *
 * Every context here runs on a stack the test maps itself, with a PROT_NONE
 * guard page below it.  Entry functions never return (the contract): each
 * ends by jumping back for good, and the test unmaps the stack.  Checks that
 * need values from inside another context record them in a struct and
 * assert in the test's own context.
 *
 * The register tests use small assembly helpers (one per architecture,
 * under "architecture helpers") that load known patterns into every
 * callee-saved register, switch, and store what the registers hold when the
 * switch returns: C code cannot otherwise pin a value in, say, r13.
 *
 * ZK_TEST_SWITCHES sets the ping-pong test's switch count (default ten
 * million: about 0.1 s natively, 0.5 s under qemu, 3 s under valgrind).
 */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fcontext.h"

#if defined(__SANITIZE_ADDRESS__)
# define ZK_TEST_ASAN 1
#elif defined(__has_feature)
# if __has_feature(address_sanitizer)
#  define ZK_TEST_ASAN 1
# endif
#endif
#ifdef ZK_TEST_ASAN
# include <sanitizer/asan_interface.h>
#endif

/* ---- stacks ------------------------------------------------------------ */

struct test_stack {
	void *map;
	size_t map_size;
	char *lo;	/* lowest usable byte, just above the guard page */
	char *hi;	/* one past the highest byte: the "top" */
};

static void stack_init(struct test_stack *s, size_t size)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	s->map_size = size + page;
	s->map = mmap(NULL, s->map_size, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	ck_assert_ptr_ne(s->map, MAP_FAILED);
	ck_assert_int_eq(mprotect(s->map, page, PROT_NONE), 0);
	s->lo = (char *)s->map + page;
	s->hi = s->lo + size;
}

static void stack_fini(struct test_stack *s)
{
#ifdef ZK_TEST_ASAN
	/* Frames abandoned on this stack leave poisoned shadow behind. */
	__asan_unpoison_memory_region(s->lo, (size_t)(s->hi - s->lo));
#endif
	ck_assert_int_eq(munmap(s->map, s->map_size), 0);
}

static int on_stack(const struct test_stack *s, const void *p)
{
	return (const char *)p >= s->lo && (const char *)p < s->hi;
}

/* A stack pointer value: a fresh context's may equal hi, the empty stack. */
static int sp_on_stack(const struct test_stack *s, uintptr_t sp)
{
	return sp >= (uintptr_t)s->lo && sp <= (uintptr_t)s->hi;
}

/* The address of p, hidden from the optimiser so that it cannot fold
 * "the alignment of an _Alignas(16) object" to a constant. */
static uintptr_t opaque_addr(const void *p)
{
	uintptr_t a = (uintptr_t)p;

	__asm__ volatile("" : "+r"(a));
	return a;
}

/* ---- architecture helpers ---------------------------------------------- */

/* The real stack pointer.  Addresses of locals will not do: under
 * AddressSanitizer's detect_stack_use_after_return they live on the heap. */
static inline __attribute__((always_inline)) uintptr_t stack_pointer(void)
{
	uintptr_t sp;

#if defined(__x86_64__)
	__asm__ volatile("movq %%rsp, %0" : "=r"(sp));
#elif defined(__aarch64__)
	__asm__ volatile("mov %0, sp" : "=r"(sp));
#endif
	return sp;
}

/*
 * zk_test_int_switch(to, data, in, out, fn, how): load in[] into the
 * callee-saved integer registers, switch -- how 0: zk_jump_fcontext(to,
 * data), 1: zk_ontop_fcontext(to, data, fn), 2: zk_jump_fcontext_ret(to,
 * data) -- then store what
 * the registers hold into out[] and return the transfer.  zk_test_fp_switch
 * does the same for the callee-saved FP registers (AArch64 d8-d15; x86_64
 * has none, so there it only switches).
 */
typedef zk_transfer_t (*ontop_fn_t)(zk_transfer_t);
typedef zk_transfer_t (*switch_helper_t)(zk_fcontext_t to, void *data,
					 const uint64_t *in, uint64_t *out,
					 ontop_fn_t fn, long how);

zk_transfer_t zk_test_int_switch(zk_fcontext_t to, void *data,
				 const uint64_t *in, uint64_t *out,
				 ontop_fn_t fn, long how);

#if defined(__x86_64__)

#define INT_REGS 6	/* rbx, rbp, r12, r13, r14, r15 */

__asm__(
	"	.text\n"
	"	.globl	zk_test_int_switch\n"
	"	.hidden	zk_test_int_switch\n"
	"	.type	zk_test_int_switch, @function\n"
	"	.p2align 4\n"
	"zk_test_int_switch:\n"
	"	pushq	%rbx\n"
	"	pushq	%rbp\n"
	"	pushq	%r12\n"
	"	pushq	%r13\n"
	"	pushq	%r14\n"
	"	pushq	%r15\n"
	"	pushq	%rcx\n"		/* out; also makes rsp 16-aligned */
	"	movq	0x00(%rdx), %rbx\n"
	"	movq	0x08(%rdx), %rbp\n"
	"	movq	0x10(%rdx), %r12\n"
	"	movq	0x18(%rdx), %r13\n"
	"	movq	0x20(%rdx), %r14\n"
	"	movq	0x28(%rdx), %r15\n"
	"	movq	%r8, %rdx\n"	/* fn, the third argument of ontop */
	"	cmpq	$1, %r9\n"	/* how: 0 jump, 1 ontop, 2 jump_ret */
	"	je	1f\n"
	"	ja	3f\n"
	"	call	zk_jump_fcontext@PLT\n"
	"	jmp	2f\n"
	"1:	call	zk_ontop_fcontext@PLT\n"
	"	jmp	2f\n"
	"3:	call	zk_jump_fcontext_ret@PLT\n"
	"2:	movq	(%rsp), %rcx\n"	/* rax:rdx, the transfer, stay intact */
	"	movq	%rbx, 0x00(%rcx)\n"
	"	movq	%rbp, 0x08(%rcx)\n"
	"	movq	%r12, 0x10(%rcx)\n"
	"	movq	%r13, 0x18(%rcx)\n"
	"	movq	%r14, 0x20(%rcx)\n"
	"	movq	%r15, 0x28(%rcx)\n"
	"	addq	$8, %rsp\n"
	"	popq	%r15\n"
	"	popq	%r14\n"
	"	popq	%r13\n"
	"	popq	%r12\n"
	"	popq	%rbp\n"
	"	popq	%rbx\n"
	"	ret\n"
	"	.size	zk_test_int_switch, .-zk_test_int_switch\n");

#define FP_REGS 0

/* The FP control state a C caller may rely on across a call: the SSE
 * rounding/masking bits of MXCSR and the x87 control word. */
typedef struct {
	uint32_t mxcsr;
	uint16_t x87cw;
} fp_mode_t;

static fp_mode_t fp_mode_get(void)
{
	fp_mode_t m;

	__asm__ volatile("stmxcsr %0" : "=m"(m.mxcsr));
	__asm__ volatile("fnstcw %0" : "=m"(m.x87cw));
	m.mxcsr &= ~0x3fu;	/* drop the sticky exception flags */
	return m;
}

static void fp_mode_set(fp_mode_t m)
{
	__asm__ volatile("ldmxcsr %0" : : "m"(m.mxcsr));
	__asm__ volatile("fldcw %0" : : "m"(m.x87cw));
}

static int fp_mode_eq(fp_mode_t a, fp_mode_t b)
{
	return a.mxcsr == b.mxcsr && a.x87cw == b.x87cw;
}

/* Rounding modes only (main: SSE down, x87 up; other: SSE up, x87 toward
 * zero): valgrind emulates no other control bits, and a switch that drops
 * the control words loses these as surely as any. */
static const fp_mode_t fp_mode_main = { 0x3f80, 0x0b7f };
static const fp_mode_t fp_mode_other = { 0x5f80, 0x0f7f };

static zk_transfer_t zk_test_fp_switch(zk_fcontext_t to, void *data,
				       const uint64_t *in, uint64_t *out,
				       ontop_fn_t fn, long how)
{
	(void)in;
	(void)out;
	if (how == 1)
		return zk_ontop_fcontext(to, data, fn);
	return how == 2 ? zk_jump_fcontext_ret(to, data) : zk_jump_fcontext(to, data);
}

#elif defined(__aarch64__)

#define INT_REGS 11	/* x19-x28, x29 */

__asm__(
	"	.text\n"
	"	.globl	zk_test_int_switch\n"
	"	.hidden	zk_test_int_switch\n"
	"	.type	zk_test_int_switch, %function\n"
	"	.p2align 4\n"
	"zk_test_int_switch:\n"
	"	hint	#34\n"		/* bti c */
	"	stp	x29, x30, [sp, #-112]!\n"
	"	mov	x29, sp\n"
	"	stp	x19, x20, [sp, #16]\n"
	"	stp	x21, x22, [sp, #32]\n"
	"	stp	x23, x24, [sp, #48]\n"
	"	stp	x25, x26, [sp, #64]\n"
	"	stp	x27, x28, [sp, #80]\n"
	"	str	x3, [sp, #96]\n"	/* out */
	"	ldp	x19, x20, [x2, #0]\n"
	"	ldp	x21, x22, [x2, #16]\n"
	"	ldp	x23, x24, [x2, #32]\n"
	"	ldp	x25, x26, [x2, #48]\n"
	"	ldp	x27, x28, [x2, #64]\n"
	"	ldr	x29, [x2, #80]\n"
	"	mov	x2, x4\n"		/* fn, the third argument of ontop */
	"	cmp	x5, #1\n"		/* how: 0 jump, 1 ontop, 2 jump_ret */
	"	b.eq	1f\n"
	"	b.hi	3f\n"
	"	bl	zk_jump_fcontext\n"
	"	b	2f\n"
	"1:	bl	zk_ontop_fcontext\n"
	"	b	2f\n"
	"3:	bl	zk_jump_fcontext_ret\n"
	"2:	ldr	x3, [sp, #96]\n"	/* x0:x1, the transfer, stay intact */
	"	stp	x19, x20, [x3, #0]\n"
	"	stp	x21, x22, [x3, #16]\n"
	"	stp	x23, x24, [x3, #32]\n"
	"	stp	x25, x26, [x3, #48]\n"
	"	stp	x27, x28, [x3, #64]\n"
	"	str	x29, [x3, #80]\n"
	"	ldp	x19, x20, [sp, #16]\n"
	"	ldp	x21, x22, [sp, #32]\n"
	"	ldp	x23, x24, [sp, #48]\n"
	"	ldp	x25, x26, [sp, #64]\n"
	"	ldp	x27, x28, [sp, #80]\n"
	"	ldp	x29, x30, [sp], #112\n"
	"	ret\n"
	"	.size	zk_test_int_switch, .-zk_test_int_switch\n");

#define FP_REGS 8	/* d8-d15 */

zk_transfer_t zk_test_fp_switch(zk_fcontext_t to, void *data,
				const uint64_t *in, uint64_t *out,
				ontop_fn_t fn, long how);

__asm__(
	"	.text\n"
	"	.globl	zk_test_fp_switch\n"
	"	.hidden	zk_test_fp_switch\n"
	"	.type	zk_test_fp_switch, %function\n"
	"	.p2align 4\n"
	"zk_test_fp_switch:\n"
	"	hint	#34\n"		/* bti c */
	"	stp	x29, x30, [sp, #-96]!\n"
	"	mov	x29, sp\n"
	"	stp	d8, d9, [sp, #16]\n"
	"	stp	d10, d11, [sp, #32]\n"
	"	stp	d12, d13, [sp, #48]\n"
	"	stp	d14, d15, [sp, #64]\n"
	"	str	x3, [sp, #80]\n"	/* out */
	"	ldp	d8, d9, [x2, #0]\n"
	"	ldp	d10, d11, [x2, #16]\n"
	"	ldp	d12, d13, [x2, #32]\n"
	"	ldp	d14, d15, [x2, #48]\n"
	"	mov	x2, x4\n"
	"	cmp	x5, #1\n"		/* how: 0 jump, 1 ontop, 2 jump_ret */
	"	b.eq	1f\n"
	"	b.hi	3f\n"
	"	bl	zk_jump_fcontext\n"
	"	b	2f\n"
	"1:	bl	zk_ontop_fcontext\n"
	"	b	2f\n"
	"3:	bl	zk_jump_fcontext_ret\n"
	"2:	ldr	x3, [sp, #80]\n"
	"	stp	d8, d9, [x3, #0]\n"
	"	stp	d10, d11, [x3, #16]\n"
	"	stp	d12, d13, [x3, #32]\n"
	"	stp	d14, d15, [x3, #48]\n"
	"	ldp	d8, d9, [sp, #16]\n"
	"	ldp	d10, d11, [sp, #32]\n"
	"	ldp	d12, d13, [sp, #48]\n"
	"	ldp	d14, d15, [sp, #64]\n"
	"	ldp	x29, x30, [sp], #96\n"
	"	ret\n"
	"	.size	zk_test_fp_switch, .-zk_test_fp_switch\n");

/* FPCR: rounding mode (bits 23:22), flush-to-zero (bit 24) and friends. */
typedef struct {
	uint64_t fpcr;
} fp_mode_t;

static fp_mode_t fp_mode_get(void)
{
	fp_mode_t m;

	__asm__ volatile("mrs %0, fpcr" : "=r"(m.fpcr));
	return m;
}

static void fp_mode_set(fp_mode_t m)
{
	__asm__ volatile("msr fpcr, %0" : : "r"(m.fpcr));
}

static int fp_mode_eq(fp_mode_t a, fp_mode_t b)
{
	return a.fpcr == b.fpcr;
}

/* Rounding modes only (main: toward -inf; other: toward zero), as on
 * x86_64. */
static const fp_mode_t fp_mode_main = { 2u << 22 };
static const fp_mode_t fp_mode_other = { 3u << 22 };

#else
# error "test_context.c: no register helpers for this architecture"
#endif

/* A distinct, recognisable value per pattern set and register. */
static uint64_t pattern(unsigned set, unsigned reg)
{
	return 0xa5000000c3000000ull ^ ((uint64_t)(set + 1) << 48) ^
	       ((uint64_t)(reg + 1) << 40) ^ ((uint64_t)set << 8) ^ reg;
}

/* ---- jump / data round trip -------------------------------------------- */

#define ROUNDS 8

struct echo {
	void *seen[ROUNDS];	/* data the context received, per round */
	char token[ROUNDS];	/* what the test sends */
	char reply[ROUNDS];	/* what the context answers */
	void *from_seen;	/* the first from the context received */
};

static void echo_entry(zk_transfer_t t)
{
	struct echo *e = t.data;
	int i;

	e->seen[0] = t.data;
	e->from_seen = t.fctx;
	for (i = 0;; i = (i + 1) % ROUNDS) {
		t = zk_jump_fcontext(t.fctx, &e->reply[i]);
		e->seen[(i + 1) % ROUNDS] = t.data;
	}
}

START_TEST(test_jump_round_trips_data)
{
	struct test_stack st;
	struct echo e;
	zk_fcontext_t ctx;
	zk_transfer_t t;
	int i;

	memset(&e, 0, sizeof e);
	stack_init(&st, 64 * 1024);
	ctx = zk_make_fcontext(st.hi, (size_t)(st.hi - st.lo), echo_entry);
	ck_assert(on_stack(&st, ctx));

	t = zk_jump_fcontext(ctx, &e);
	ck_assert_ptr_eq(e.seen[0], &e);
	ck_assert(!on_stack(&st, e.from_seen));	/* from = the test's context */
	ck_assert_ptr_eq(t.data, &e.reply[0]);
	ck_assert(on_stack(&st, t.fctx));	/* from = the suspended context */

	for (i = 1; i < ROUNDS; i++) {
		/* the two resume styles answer each other (fcontext.h) */
		t = i % 2 ? zk_jump_fcontext_ret(t.fctx, &e.token[i])
			  : zk_jump_fcontext(t.fctx, &e.token[i]);
		ck_assert_ptr_eq(e.seen[i], &e.token[i]);
		ck_assert_ptr_eq(t.data, &e.reply[i]);
		ck_assert(on_stack(&st, t.fctx));
	}
	stack_fini(&st);
}
END_TEST

/* ---- ontop ------------------------------------------------------------- */

struct ontop {
	struct test_stack st;
	int fn_ran;
	int fn_on_target_stack;
	void *fn_from;		/* from as fn saw it */
	void *fn_data;		/* data as fn saw it */
	char fn_result;		/* fn returns &fn_result as data */
	void *target_got;	/* data the target's jump / entry received */
	void *target_from;
};

static zk_transfer_t ontop_fn(zk_transfer_t t)
{
	struct ontop *o = t.data;
	o->fn_ran = 1;
	o->fn_on_target_stack = sp_on_stack(&o->st, stack_pointer());
	o->fn_from = t.fctx;
	o->fn_data = t.data;
	return (zk_transfer_t){ t.fctx, &o->fn_result };
}

/* Parks once, then reports what its jump returned when resumed. */
static void ontop_parked_entry(zk_transfer_t t)
{
	struct ontop *o = t.data;

	t = zk_jump_fcontext(t.fctx, NULL);
	o->target_got = t.data;
	o->target_from = t.fctx;
	zk_jump_fcontext(t.fctx, o);
	abort();	/* never resumed again */
}

/* Reports the transfer it was started with. */
static void ontop_fresh_entry(zk_transfer_t t)
{
	/* t.data is what ontop_fn returned: &o->fn_result */
	struct ontop *o = (struct ontop *)((char *)t.data -
					   offsetof(struct ontop, fn_result));

	o->target_got = t.data;
	o->target_from = t.fctx;
	zk_jump_fcontext(t.fctx, o);
	abort();
}

START_TEST(test_ontop_runs_fn_on_target_stack_and_target_receives_its_result)
{
	struct ontop o;
	zk_fcontext_t ctx;
	zk_transfer_t t;

	memset(&o, 0, sizeof o);
	stack_init(&o.st, 64 * 1024);
	ctx = zk_make_fcontext(o.st.hi, (size_t)(o.st.hi - o.st.lo),
			       ontop_parked_entry);
	t = zk_jump_fcontext(ctx, &o);		/* target parks */
	ck_assert(on_stack(&o.st, t.fctx));

	t = zk_ontop_fcontext(t.fctx, &o, ontop_fn);
	ck_assert_int_eq(o.fn_ran, 1);
	ck_assert_int_eq(o.fn_on_target_stack, 1);
	ck_assert_ptr_eq(o.fn_data, &o);
	ck_assert(!on_stack(&o.st, o.fn_from));	/* the test's context */
	/* the target's jump returned fn's result, not the ontop's data */
	ck_assert_ptr_eq(o.target_got, &o.fn_result);
	ck_assert_ptr_eq(o.target_from, o.fn_from);
	ck_assert_ptr_eq(t.data, &o);
	stack_fini(&o.st);
}
END_TEST

START_TEST(test_ontop_on_fresh_context_passes_fn_result_to_entry)
{
	struct ontop o;
	zk_fcontext_t ctx;
	zk_transfer_t t;

	memset(&o, 0, sizeof o);
	stack_init(&o.st, 64 * 1024);
	ctx = zk_make_fcontext(o.st.hi, (size_t)(o.st.hi - o.st.lo),
			       ontop_fresh_entry);
	t = zk_ontop_fcontext(ctx, &o, ontop_fn);
	ck_assert_int_eq(o.fn_ran, 1);
	ck_assert_int_eq(o.fn_on_target_stack, 1);
	ck_assert_ptr_eq(o.fn_data, &o);
	ck_assert_ptr_eq(o.target_got, &o.fn_result);
	ck_assert_ptr_eq(o.target_from, o.fn_from);
	ck_assert_ptr_eq(t.data, &o);
	stack_fini(&o.st);
}
END_TEST

/* ---- alignment --------------------------------------------------------- */

struct align {
	uintptr_t local;	/* address of a 16-aligned local */
	uintptr_t sp;		/* frame address (x86_64) / sp (AArch64) */
	uintptr_t fn_local;	/* same, inside an ontop function */
	uintptr_t fn_sp;
};

/* The ABI's entry alignment shows as: x86_64, rbp after the standard
 * prologue (entry rsp - 8) a multiple of 16; AArch64, sp itself (which the
 * hardware would fault on if it were not).  Either way an _Alignas(16)
 * local is placed relative to the entry sp, so it is misaligned too if the
 * entry sp was. */
static __attribute__((noinline)) void align_probe(uintptr_t *local, uintptr_t *sp)
{
	_Alignas(16) volatile char probe[16];

	probe[0] = 0;
	*local = opaque_addr((const void *)probe);
#if defined(__x86_64__)
	*sp = opaque_addr(__builtin_frame_address(0));
#else
	*sp = stack_pointer();
#endif
}

static zk_transfer_t align_fn(zk_transfer_t t)
{
	struct align *a = t.data;

	align_probe(&a->fn_local, &a->fn_sp);
	return t;
}

static void align_entry(zk_transfer_t t)
{
	struct align *a = t.data;
	_Alignas(16) volatile char probe[16];

	probe[0] = 0;
	a->local = opaque_addr((const void *)probe);
#if defined(__x86_64__)
	a->sp = opaque_addr(__builtin_frame_address(0));
#else
	a->sp = stack_pointer();
#endif
	t = zk_jump_fcontext(t.fctx, a);
	/* resumed through ontop: check a call made from here, too */
	zk_jump_fcontext(t.fctx, a);
	abort();
}

START_TEST(test_entry_function_gets_16_byte_aligned_stack)
{
	struct test_stack st;
	size_t skew;

	stack_init(&st, 64 * 1024);
	/* top need not be aligned: make_fcontext aligns it down */
	for (skew = 0; skew < 16; skew++) {
		struct align a;
		zk_fcontext_t ctx;
		zk_transfer_t t;

		memset(&a, 0, sizeof a);
		ctx = zk_make_fcontext(st.hi - skew, (size_t)(st.hi - skew - st.lo),
				       align_entry);
		/* a fresh context entered by either resume style */
		t = skew % 2 ? zk_jump_fcontext_ret(ctx, &a) : zk_jump_fcontext(ctx, &a);
		ck_assert_msg(a.local % 16 == 0, "skew %zu: local %#lx", skew,
			      (unsigned long)a.local);
		ck_assert_msg(a.sp % 16 == 0, "skew %zu: sp %#lx", skew,
			      (unsigned long)a.sp);
		ck_assert(a.sp >= (uintptr_t)st.lo && a.sp <= (uintptr_t)(st.hi - skew));

		t = zk_ontop_fcontext(t.fctx, &a, align_fn);
		ck_assert_msg(a.fn_local % 16 == 0, "ontop fn local %#lx",
			      (unsigned long)a.fn_local);
		ck_assert_msg(a.fn_sp % 16 == 0, "ontop fn sp %#lx",
			      (unsigned long)a.fn_sp);
		ck_assert_ptr_eq(t.data, &a);
	}
	stack_fini(&st);
}
END_TEST

/* ---- callee-saved registers -------------------------------------------- */

/*
 * The test's context and another one switch back and forth three times:
 * by jump, by jump_ret and the third time by ontop (the other context
 * answers by jump_ret, then jump).  Each switch out of either
 * context goes through a helper that first loads a pattern set of its own
 * into every callee-saved register (the test uses sets 0-2, the other
 * context 3-5), so while one side is suspended the registers hold the other
 * side's values, and a register the switch does not save and restore comes
 * back holding the wrong set.  The FP variant also gives each side its own
 * FP control mode and checks that each gets its own back.
 */
#define MAX_REGS 11
#define SWITCHES 3

struct regs {
	uint64_t in[2 * SWITCHES][MAX_REGS];
	uint64_t out[2 * SWITCHES][MAX_REGS];
	switch_helper_t helper;
	int fp_modes;			/* each side sets its own FP mode */
	fp_mode_t main_mode[SWITCHES];	/* the test's mode after each switch */
	fp_mode_t other_mode[SWITCHES];	/* the other's: initial, then after */
};

static zk_transfer_t regs_ontop_fn(zk_transfer_t t)
{
	return t;
}

static void regs_entry(zk_transfer_t t)
{
	struct regs *r = t.data;
	int i;

	if (r->fp_modes) {
		fp_mode_set(fp_mode_other);
		r->other_mode[0] = fp_mode_get();
	}
	for (i = 0; i < SWITCHES; i++) {
		t = r->helper(t.fctx, r, r->in[SWITCHES + i],
			      r->out[SWITCHES + i], NULL, i == 0 ? 2 : 0);
		if (r->fp_modes && i + 1 < SWITCHES)
			r->other_mode[i + 1] = fp_mode_get();
	}
	abort();	/* the last switch is never answered */
}

static void regs_run(struct regs *r, unsigned nregs)
{
	struct test_stack st;
	fp_mode_t saved = fp_mode_get();
	zk_transfer_t t;
	unsigned set, i;

	for (set = 0; set < 2 * SWITCHES; set++)
		for (i = 0; i < MAX_REGS; i++) {
			r->in[set][i] = pattern(set, i);
			r->out[set][i] = 0;
		}

	stack_init(&st, 64 * 1024);
	if (r->fp_modes)
		fp_mode_set(fp_mode_main);
	t.fctx = zk_make_fcontext(st.hi, (size_t)(st.hi - st.lo), regs_entry);
	for (set = 0; set < SWITCHES; set++) {
		long how = set == SWITCHES - 1 ? 1 : set == 1 ? 2 : 0;

		t = r->helper(t.fctx, r, r->in[set], r->out[set],
			      regs_ontop_fn, how);
		r->main_mode[set] = fp_mode_get();
		ck_assert_ptr_eq(t.data, r);
	}
	fp_mode_set(saved);
	stack_fini(&st);

	/* the other context's last set is still parked: its out stays unread */
	for (set = 0; set < 2 * SWITCHES - 1; set++)
		for (i = 0; i < nregs; i++)
			ck_assert_msg(r->out[set][i] == r->in[set][i],
				      "set %u register %u: got %#llx, saved %#llx",
				      set, i, (unsigned long long)r->out[set][i],
				      (unsigned long long)r->in[set][i]);
	if (!r->fp_modes)
		return;
	ck_assert_msg(fp_mode_eq(r->other_mode[0], fp_mode_other),
		      "this CPU did not take the test's FP mode");
	for (set = 0; set < SWITCHES; set++) {
		ck_assert_msg(fp_mode_eq(r->main_mode[set], fp_mode_main),
			      "switch %u: the test's FP control state was lost", set);
		ck_assert_msg(fp_mode_eq(r->other_mode[set], fp_mode_other),
			      "switch %u: the other's FP control state was lost", set);
	}
}

START_TEST(test_callee_saved_integer_registers_survive_switches)
{
	struct regs r;

	memset(&r, 0, sizeof r);
	r.helper = zk_test_int_switch;
	regs_run(&r, INT_REGS);
}
END_TEST

START_TEST(test_callee_saved_fp_state_survives_switches)
{
	struct regs r;

	memset(&r, 0, sizeof r);
	r.helper = zk_test_fp_switch;
	r.fp_modes = 1;
	regs_run(&r, FP_REGS);
}
END_TEST

/* ---- many switches ----------------------------------------------------- */

struct pingpong {
	unsigned long other;	/* switches into the other context */
	unsigned long mine;	/* switches back into the test */
	unsigned long wrong_data;
};

static void pingpong_entry(zk_transfer_t t)
{
	struct pingpong *p = t.data;

	for (;;) {
		if (t.data != p)
			p->wrong_data++;
		p->other++;
		t = zk_jump_fcontext(t.fctx, p);
	}
}

static unsigned long switch_count(void)
{
	const char *env = getenv("ZK_TEST_SWITCHES");
	unsigned long n = 10000000;

	if (env && *env)
		n = strtoul(env, NULL, 10);
	return n < 2 ? 2 : n;
}

START_TEST(test_ten_million_switches_ping_pong_keep_count)
{
	struct test_stack st;
	struct pingpong p = { 0, 0, 0 };
	unsigned long rounds = switch_count() / 2, i;
	zk_transfer_t t;

	stack_init(&st, 64 * 1024);
	t.fctx = zk_make_fcontext(st.hi, (size_t)(st.hi - st.lo), pingpong_entry);
	for (i = 0; i < rounds; i++) {
		t = zk_jump_fcontext(t.fctx, &p);
		if (t.data != &p)
			p.wrong_data++;
		p.mine++;
	}
	stack_fini(&st);

	ck_assert_uint_eq(p.other, rounds);
	ck_assert_uint_eq(p.mine, rounds);
	ck_assert_uint_eq(p.wrong_data, 0);
}
END_TEST

/* ---- deep recursion ---------------------------------------------------- */

#define DEEP_STACK (256 * 1024)
#define DEEP_MARGIN (12 * 1024)	/* left unused above the guard page */

struct deep {
	struct test_stack st;
	const char *floor;	/* recurse until a frame is below this */
	const char *lowest;
	unsigned long depth;
	unsigned long sum;
	unsigned long corrupt;
};

static __attribute__((noinline)) unsigned long recurse(struct deep *d,
							 unsigned long depth)
{
	volatile unsigned char buf[480];
	unsigned long sum = depth;
	size_t i;

	for (i = 0; i < sizeof buf; i++)
		buf[i] = (unsigned char)(depth + i);
	if ((const char *)stack_pointer() > d->floor) {
		sum += recurse(d, depth + 1);
	} else {
		d->lowest = (const char *)stack_pointer();
		d->depth = depth;
	}
	for (i = 0; i < sizeof buf; i++)	/* deeper frames left ours alone */
		if (buf[i] != (unsigned char)(depth + i))
			d->corrupt++;
	return sum;
}

static void deep_entry(zk_transfer_t t)
{
	struct deep *d = t.data;

	d->sum = recurse(d, 1);
	zk_jump_fcontext(t.fctx, d);
	abort();
}

START_TEST(test_deep_recursion_uses_most_of_256k_stack)
{
	struct deep d;
	zk_transfer_t t;

	memset(&d, 0, sizeof d);
	stack_init(&d.st, DEEP_STACK);
	d.floor = d.st.lo + DEEP_MARGIN;
	t = zk_jump_fcontext(zk_make_fcontext(d.st.hi, DEEP_STACK, deep_entry), &d);
	ck_assert_ptr_eq(t.data, &d);
	ck_assert(sp_on_stack(&d.st, (uintptr_t)d.lowest));
	/* the recursion really ran on this stack, and through most of it */
	ck_assert_uint_ge((uintptr_t)(d.st.hi - d.lowest), DEEP_STACK - DEEP_MARGIN);
	ck_assert_uint_gt(d.depth, 100);
	ck_assert_uint_eq(d.sum, d.depth * (d.depth + 1) / 2);
	ck_assert_uint_eq(d.corrupt, 0);
	stack_fini(&d.st);
}
END_TEST

/* ---- suite ------------------------------------------------------------- */

static Suite *context_suite(void)
{
	Suite *s = suite_create("context");
	TCase *tc = tcase_create("switch");
	TCase *regs = tcase_create("registers");
	TCase *stress = tcase_create("stress");

	tcase_add_test(tc, test_jump_round_trips_data);
	tcase_add_test(tc, test_ontop_runs_fn_on_target_stack_and_target_receives_its_result);
	tcase_add_test(tc, test_ontop_on_fresh_context_passes_fn_result_to_entry);
	tcase_add_test(tc, test_entry_function_gets_16_byte_aligned_stack);
	suite_add_tcase(s, tc);

	tcase_add_test(regs, test_callee_saved_integer_registers_survive_switches);
	tcase_add_test(regs, test_callee_saved_fp_state_survives_switches);
	suite_add_tcase(s, regs);

	/* generous: emulated (qemu) and sanitizer runs are many times slower */
	tcase_set_timeout(stress, 120);
	tcase_add_test(stress, test_ten_million_switches_ping_pong_keep_count);
	tcase_add_test(stress, test_deep_recursion_uses_most_of_256k_stack);
	suite_add_tcase(s, stress);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(context_suite());
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
