/*
 * perf/bench.h - tiny helpers shared by the C benchmark programs in perf/.
 *
 * Every benchmark program follows one protocol (see perf/README.md):
 *
 *     prog <benchmark> [key=value ...]
 *
 * and prints, on stdout, one line per metric
 *
 *     RESULT <benchmark> <metric> <value> <unit>
 *
 * or, for a benchmark it does not implement,
 *
 *     NA <benchmark> <reason...>
 *
 * and exits 0. perf/run parses nothing else, so anything else a program
 * wants to say goes to stderr.
 *
 * Header-only: every function is static, so include it from exactly the
 * translation units that need it. C99 + POSIX; also usable from C++.
 */
#ifndef ZK_PERF_BENCH_H
#define ZK_PERF_BENCH_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Monotonic clock in nanoseconds (CLOCK_MONOTONIC; never goes backwards). */
static inline uint64_t bench_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Print "RESULT <bench> <metric> <value> <unit>" and flush, so a result
 * survives even if the program is killed a moment later. */
static inline void bench_result(const char *bench, const char *metric,
				double value, const char *unit)
{
	printf("RESULT %s %s %.6g %s\n", bench, metric, value, unit);
	fflush(stdout);
}

/* Print "NA <bench> <reason>" and flush: the benchmark is not implemented
 * (or not possible here). The program should then exit 0. */
static inline void bench_na(const char *bench, const char *reason)
{
	printf("NA %s %s\n", bench, reason);
	fflush(stdout);
}

/* Value of "key=<long>" among argv[2..argc-1] (argv[1] is the benchmark
 * name), or dflt when the key is absent. The last occurrence wins. A value
 * may carry a k/m suffix (x1000 / x1000000): n=100k. */
static inline long bench_arg(int argc, char **argv, const char *key, long dflt)
{
	size_t klen = strlen(key);
	long v = dflt;
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i];
		if (strncmp(a, key, klen) != 0 || a[klen] != '=')
			continue;
		char *end;
		long x = strtol(a + klen + 1, &end, 10);
		if (*end == 'k' || *end == 'K')
			x *= 1000;
		else if (*end == 'm' || *end == 'M')
			x *= 1000000;
		v = x;
	}
	return v;
}

/* qsort comparator for uint64_t, ascending. */
static inline int bench_cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* The p-th percentile (p in [0,100]) of an ascending array of n samples,
 * nearest-rank method (p=50 is the median, p=99 the 99th percentile).
 * Returns 0 for an empty array. */
static inline double bench_percentile(uint64_t *sorted, size_t n, double p)
{
	if (n == 0)
		return 0;
	if (p <= 0)
		return (double)sorted[0];
	if (p >= 100)
		return (double)sorted[n - 1];
	size_t rank = (size_t)((p / 100.0) * (double)n + 0.999999999);
	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return (double)sorted[rank - 1];
}

/* Resident set size of this process in bytes (from /proc/self/statm), or
 * -1 if it cannot be read. */
static inline long bench_rss_bytes(void)
{
	FILE *f = fopen("/proc/self/statm", "r");
	long size = 0, resident = -1;
	if (!f)
		return -1;
	if (fscanf(f, "%ld %ld", &size, &resident) != 2)
		resident = -1;
	fclose(f);
	return resident < 0 ? -1 : resident * sysconf(_SC_PAGESIZE);
}

#endif /* ZK_PERF_BENCH_H */
