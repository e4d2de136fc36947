/*
 * perf/ucontext_switch.c - context-switch cost of glibc's swapcontext, the
 * portable baseline every fiber library is compared with.
 *
 *     ucontext_switch switch [n=<round trips>] [quick=1]
 *
 * Main and one coroutine ping-pong; one switch is one direction, so a round
 * trip is two switches. swapcontext saves and restores the signal mask with
 * a system call on every switch, which is exactly the cost hand-written
 * switches (Zokio, Boost.Context) avoid.
 */
#include "bench.h"

#include <ucontext.h>

static ucontext_t main_ctx, co_ctx;
static volatile long co_count;

static void co_main(void)
{
	for (;;) {
		co_count++;
		swapcontext(&co_ctx, &main_ctx);
	}
}

static double run(long n)
{
	uint64_t t0 = bench_now_ns();
	for (long i = 0; i < n; i++)
		swapcontext(&main_ctx, &co_ctx);
	uint64_t t1 = bench_now_ns();
	return (double)(t1 - t0) / (2.0 * (double)n);
}

int main(int argc, char **argv)
{
	const char *bench = argc > 1 ? argv[1] : "";
	if (strcmp(bench, "switch") != 0) {
		bench_na(bench, "ucontext_switch implements only switch");
		return 0;
	}
	int quick = bench_arg(argc, argv, "quick", 0) != 0;
	long n = bench_arg(argc, argv, "n", quick ? 100000 : 2000000);
	if (n < 1)
		n = 1;

	static char stack[64 * 1024];
	getcontext(&co_ctx);
	co_ctx.uc_stack.ss_sp = stack;
	co_ctx.uc_stack.ss_size = sizeof stack;
	co_ctx.uc_link = NULL;
	makecontext(&co_ctx, co_main, 0);

	run(n / 10 + 1); /* warm-up: fault in the stack, train the predictors */
	bench_result("switch", "ns_per_switch", run(n), "ns");
	return 0;
}
