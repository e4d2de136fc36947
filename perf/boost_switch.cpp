/*
 * perf/boost_switch.cpp - context-switch cost of Boost.Context's low-level
 * fcontext primitive (jump_fcontext), the reference Zokio's own assembly is
 * modelled on and should match.
 *
 *     boost_switch switch [n=<round trips>] [quick=1]
 *
 * Main and one context ping-pong; one switch is one direction. The detail::
 * fcontext API is Boost's internal-but-stable layer under callcc/fiber; we
 * use it directly so no allocation or exception machinery is measured.
 */
#include "bench.h"

#include <sys/mman.h>

#include <boost/context/detail/fcontext.hpp>

namespace ctx = boost::context::detail;

static void co_main(ctx::transfer_t t)
{
	for (;;)
		t = ctx::jump_fcontext(t.fctx, nullptr);
}

int main(int argc, char **argv)
{
	const char *bench = argc > 1 ? argv[1] : "";
	if (strcmp(bench, "switch") != 0) {
		bench_na(bench, "boost_switch implements only switch");
		return 0;
	}
	int quick = bench_arg(argc, argv, "quick", 0) != 0;
	long n = bench_arg(argc, argv, "n", quick ? 1000000 : 50000000);
	if (n < 1)
		n = 1;

	/* An mmap'd stack, as zk_bench's switch uses: the same kind of memory
	 * on both sides of the comparison. */
	size_t size = 64 * 1024;
	char *stack = (char *)mmap(NULL, size, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (stack == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	/*
	 * The loop has exactly the shape of zk_bench's switch loop (warm-up and
	 * timed loop inline, the transfer record carried in registers). This
	 * matters: on some machines moving the same loop into a function
	 * called twice made every switch ~15x slower (see perf/README.md).
	 */
	ctx::transfer_t t = { ctx::make_fcontext(stack + size, size, co_main), nullptr };
	for (long i = 0; i < 10000; i++) /* warm-up */
		t = ctx::jump_fcontext(t.fctx, nullptr);
	uint64_t t0 = bench_now_ns();
	for (long i = 0; i < n; i++)
		t = ctx::jump_fcontext(t.fctx, nullptr);
	uint64_t t1 = bench_now_ns();
	/* each iteration is two switches: there and back */
	bench_result("switch", "ns_per_switch", (double)(t1 - t0) / (2.0 * (double)n), "ns");
	return 0;
}
