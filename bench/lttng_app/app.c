/*
 * The LTTng-UST counterpart of tracewire-demo for bench/run.py: emits
 * demo:tick(seq, msg) with seq 0..N-1 and msg a string of --payload-bytes
 * 'x', at full speed or at --rate events per second, then prints
 * "emitted N events in T s" as tracewire-demo does.
 *
 *   gcc -O2 -I bench/lttng_app -o app bench/lttng_app/app.c -llttng-ust -ldl
 *   app --events N [--payload-bytes B] [--rate R]
 *
 * The tracepoint provider is linked statically (lttng-ust(3), "Statically
 * linking the tracepoint provider"): this file both creates the probes and
 * holds the tracepoint definitions.
 */
#define LTTNG_UST_TRACEPOINT_CREATE_PROBES
#define LTTNG_UST_TRACEPOINT_DEFINE
#include "tw_bench_tp.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static int parse_long(const char *opt, const char *text, long min, long max, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(text, &end, 10);
	if (errno || end == text || *end || v < min || v > max) {
		fprintf(stderr, "app: %s: expected an integer in [%ld, %ld], got '%s'\n", opt, min, max, text);
		return -1;
	}
	*out = v;
	return 0;
}

int main(int argc, char **argv)
{
	long events = 1000, payload = 0;
	double rate = 0, t0, elapsed;
	char *msg;
	long seq;
	int i;

	for (i = 1; i < argc; i++) {
		const char *opt = argv[i];

		if (i + 1 >= argc) {
			fprintf(stderr, "usage: %s --events N [--payload-bytes B] [--rate R]\n", argv[0]);
			return 2;
		}
		if (!strcmp(opt, "--events") || !strcmp(opt, "-n")) {
			if (parse_long(opt, argv[++i], 0, 1L << 62, &events))
				return 2;
		} else if (!strcmp(opt, "--payload-bytes")) {
			if (parse_long(opt, argv[++i], 0, 60000, &payload))
				return 2;
		} else if (!strcmp(opt, "--rate")) {
			char *end;

			rate = strtod(argv[++i], &end);
			if (end == argv[i] || *end || !(rate > 0)) {
				fprintf(stderr, "app: --rate: expected a number > 0, got '%s'\n", argv[i]);
				return 2;
			}
		} else {
			fprintf(stderr, "app: unknown option '%s'\n", opt);
			return 2;
		}
	}
	msg = malloc((size_t) payload + 1);
	if (!msg)
		return 1;
	memset(msg, 'x', (size_t) payload);
	msg[payload] = '\0';

	t0 = now();
	if (rate <= 0) {
		for (seq = 0; seq < events; seq++)
			lttng_ust_tracepoint(demo, tick, seq, msg);
	} else {
		/* In batches of rate/100 (1 to 1000) events, sleeping up to each batch's due time. */
		long batch = (long) (rate / 100);

		if (batch < 1)
			batch = 1;
		if (batch > 1000)
			batch = 1000;
		for (seq = 0; seq < events;) {
			long end = seq + batch < events ? seq + batch : events;
			double delay;

			for (; seq < end; seq++)
				lttng_ust_tracepoint(demo, tick, seq, msg);
			delay = t0 + (double) seq / rate - now();
			if (delay > 0) {
				struct timespec ts = { (time_t) delay, (long) ((delay - (double) (time_t) delay) * 1e9) };

				nanosleep(&ts, NULL);
			}
		}
	}
	elapsed = now() - t0;
	printf("emitted %ld events in %.3f s\n", events, elapsed);
	fflush(stdout);
	free(msg);
	return 0;
}
