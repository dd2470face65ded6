#!/usr/bin/env bash
# make demo: trace the demo app through a private sessiond, show the events,
# and read the same trace with babeltrace2.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d /tmp/tracewire-demo.XXXXXX)
export TRACEWIRE_RUNDIR="$work/run"
cleanup() {
  tracewire destroy demo >/dev/null 2>&1 || true
  [ -f "$TRACEWIRE_RUNDIR/sessiond.pid" ] && kill "$(cat "$TRACEWIRE_RUNDIR/sessiond.pid")" 2>/dev/null || true
}
trap cleanup EXIT
events=${DEMO_EVENTS:-100000}
set -x
tracewire create demo --output "$work/traces"
tracewire enable-event 'demo:*'
tracewire start
tracewire-demo --events "$events" --payload-bytes 16
tracewire stop
tracewire status
tracewire view "$work/traces" --limit 5
{ set +x; } 2>/dev/null
n=$(tracewire view "$work/traces" | wc -l)
echo "tracewire view: $n events"
if command -v babeltrace2 >/dev/null; then
  b=$(babeltrace2 "$work/traces" | wc -l)
  echo "babeltrace2:    $b events"
  [ "$b" = "$events" ] || { echo "babeltrace2 count differs from $events" >&2; exit 1; }
fi
[ "$n" = "$events" ] || { echo "tracewire view count differs from $events" >&2; exit 1; }
echo "demo OK: $events events traced; trace in $work/traces"
