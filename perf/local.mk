# perf/local.mk - the perf programs, included from Makefile.am.
# Paths are relative to the top source directory (automake inlines this
# file). Run the suite with perf/run (or `make bench`); see perf/README.md.
#
# This fragment sets noinst_PROGRAMS with '='; sections included after it
# append with '+='.

noinst_PROGRAMS = perf/zk_bench perf/ucontext_switch \
	perf/peers/c/echo_epoll perf/peers/c/loadgen

# Zokio's side of every benchmark (benchmarks it lacks print NA).
perf_zk_bench_SOURCES = perf/zk_bench.c perf/zk_bench_io.c perf/zk_bench_sync.c \
	perf/bench.h perf/http_hello.h
perf_zk_bench_LDADD = libzokio_core.la

# Context-switch baselines.
perf_ucontext_switch_SOURCES = perf/ucontext_switch.c perf/bench.h
if HAVE_BOOST_CONTEXT
noinst_PROGRAMS += perf/boost_switch
perf_boost_switch_SOURCES = perf/boost_switch.cpp perf/bench.h
perf_boost_switch_LDADD = -lboost_context
endif

# Plain C reference servers and our echo load generator.
perf_peers_c_echo_epoll_SOURCES = perf/peers/c/echo_epoll.c \
	perf/peers/c/common.h perf/bench.h perf/http_hello.h
perf_peers_c_loadgen_SOURCES = perf/peers/c/loadgen.c perf/bench.h
if HAVE_LIBURING
noinst_PROGRAMS += perf/peers/c/echo_uring
perf_peers_c_echo_uring_SOURCES = perf/peers/c/echo_uring.c \
	perf/peers/c/common.h perf/bench.h perf/http_hello.h
perf_peers_c_echo_uring_CFLAGS = $(AM_CFLAGS) $(URING_CFLAGS)
perf_peers_c_echo_uring_LDADD = $(URING_LIBS)
# The load generator's io_uring engine (it falls back to epoll at run time).
perf_peers_c_loadgen_CPPFLAGS = $(AM_CPPFLAGS) -DLOADGEN_URING
perf_peers_c_loadgen_CFLAGS = $(AM_CFLAGS) $(URING_CFLAGS)
perf_peers_c_loadgen_LDADD = $(URING_LIBS)
endif

# The harness and the Go/Tokio peers are not built by make: perf/run builds
# them into the build directory. Ship their sources, never build outputs.
EXTRA_DIST += perf/local.mk
PERF_PEER_DIRS = perf/peers/go perf/peers/tokio

dist-hook: dist-perf-peers
dist-perf-peers:
	@for d in $(PERF_PEER_DIRS); do \
	  test -d "$(srcdir)/$$d" || continue; \
	  (cd "$(srcdir)" && find "$$d" \( -name target -o -name results \) -prune \
	     -o -type f ! -name '*.o' ! -name gobench ! -name tokiobench -print) | \
	  while read -r f; do \
	    $(MKDIR_P) "$(distdir)/`dirname "$$f"`" && \
	    cp -p "$(srcdir)/$$f" "$(distdir)/$$f" || exit 1; \
	  done; \
	done
.PHONY: dist-perf-peers

# perf/run asks which perf programs this configuration builds.
print-perf-programs:
	@echo $(noinst_PROGRAMS)
.PHONY: print-perf-programs

# The hook library's benchmark: libcurl from 1,000 fibers (libzokio_hook)
# against 1,000 threads.  Links the shared libzokio, as the hook requires.
if HAVE_CURL
noinst_PROGRAMS += perf/zk_bench_hook
perf_zk_bench_hook_SOURCES = perf/zk_bench_hook.c perf/bench.h
perf_zk_bench_hook_CFLAGS = $(AM_CFLAGS) $(CURL_CFLAGS)
perf_zk_bench_hook_LDADD = libzokio_hook.la libzokio.la $(CURL_LIBS)
endif
