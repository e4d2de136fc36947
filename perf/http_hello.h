/*
 * perf/http_hello.h - the HTTP side of the perf suite's http_server rows,
 * shared by Zokio's server (zk_bench_io.c) and the plain C reference
 * servers (peers/c/), so the rows compare the runtimes and not two ways of
 * scanning bytes: the fixed response and the request counter.
 * Header-only; include once per program.
 */
#ifndef ZK_PERF_HTTP_HELLO_H
#define ZK_PERF_HTTP_HELLO_H

#include <stddef.h>

/* The fixed response of http_server: keep-alive is HTTP/1.1's default. */
static const char http_response[] =
	"HTTP/1.1 200 OK\r\n"
	"Content-Type: text/plain\r\n"
	"Content-Length: 13\r\n"
	"\r\n"
	"Hello, World!";
#define HTTP_RESPONSE_LEN (sizeof http_response - 1)

/*
 * Counts complete requests in a byte stream: a request ends at an empty
 * line ("\r\n\r\n"). Good enough for wrk's bodiless GETs; the state
 * carries a terminator split across reads.  Not inlined, so every server
 * runs the same machine code: inlined into a loop around a blocking call,
 * GCC kept the match count in memory, a store and a reload per byte.
 */
struct http_scan {
	int matched; /* bytes of "\r\n\r\n" matched so far (0..3) */
};

__attribute__((noinline))
static size_t http_count_requests(struct http_scan *s, const char *p, size_t n)
{
	static const char term[4] = { '\r', '\n', '\r', '\n' };
	size_t count = 0;
	int m = s->matched;
	for (size_t i = 0; i < n; i++) {
		if (p[i] == term[m]) {
			if (++m == 4) {
				count++;
				m = 0;
			}
		} else {
			m = (p[i] == '\r') ? 1 : 0;
		}
	}
	s->matched = m;
	return count;
}

#endif /* ZK_PERF_HTTP_HELLO_H */
