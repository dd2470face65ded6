/*
 * LTTng-UST tracepoint provider for bench/run.py's side-by-side figures:
 * the event tracewire-demo emits, demo:tick with an int64 seq and a string
 * msg.  Written from lttng-ust(3) (API version 1, LTTng-UST 2.13).
 */
#undef LTTNG_UST_TRACEPOINT_PROVIDER
#define LTTNG_UST_TRACEPOINT_PROVIDER demo

#undef LTTNG_UST_TRACEPOINT_INCLUDE
#define LTTNG_UST_TRACEPOINT_INCLUDE "./tw_bench_tp.h"

#if !defined(TW_BENCH_TP_H) || defined(LTTNG_UST_TRACEPOINT_HEADER_MULTI_READ)
#define TW_BENCH_TP_H

#include <stdint.h>
#include <lttng/tracepoint.h>

LTTNG_UST_TRACEPOINT_EVENT(
	demo,
	tick,
	LTTNG_UST_TP_ARGS(
		int64_t, seq_arg,
		const char *, msg_arg
	),
	LTTNG_UST_TP_FIELDS(
		lttng_ust_field_integer(int64_t, seq, seq_arg)
		lttng_ust_field_string(msg, msg_arg)
	)
)

#endif /* TW_BENCH_TP_H */

#include <lttng/tracepoint-event.h>
