#!/usr/bin/env bash
# make demo: start a relay on loopback, trace the demo app through a private
# sessiond into it (zstd over TCP), show the events, and read the relay's
# trace with babeltrace2.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d /tmp/tracewire-demo.XXXXXX)
export TRACEWIRE_RUNDIR="$work/run"
relay_pid=""
cleanup() {
  tracewire destroy demo >/dev/null 2>&1 || true
  [ -f "$TRACEWIRE_RUNDIR/sessiond.pid" ] && kill "$(cat "$TRACEWIRE_RUNDIR/sessiond.pid")" 2>/dev/null || true
  [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null || true
}
trap cleanup EXIT
events=${DEMO_EVENTS:-100000}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

echo "== relay on 127.0.0.1:$port, writing to $work/relay"
tracewire-relayd --output "$work/relay" --listen "127.0.0.1:$port" --live-listen 127.0.0.1:0 \
  2>"$work/relayd.log" &
relay_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/relayd.log" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$work/relayd.log" || { cat "$work/relayd.log" >&2; exit 1; }

set -x
tracewire create demo --url "tw://127.0.0.1:$port"
tracewire enable-event 'demo:*'
tracewire start
tracewire-demo --events "$events" --payload-bytes 16
tracewire stop
tracewire status
tracewire view "$work/relay" --limit 5
{ set +x; } 2>/dev/null
n=$(tracewire view "$work/relay" | wc -l)
echo "tracewire view: $n events"
if command -v babeltrace2 >/dev/null; then
  b=$(babeltrace2 "$work/relay" | wc -l)
  echo "babeltrace2:    $b events"
  [ "$b" = "$events" ] || { echo "babeltrace2 count differs from $events" >&2; exit 1; }
fi
[ "$n" = "$events" ] || { echo "tracewire view count differs from $events" >&2; exit 1; }
echo "demo OK: $events events streamed through the relay; trace in $work/relay"
