#!/bin/sh
# A tracewire target: sessiond in the background, one session streaming to the
# relay, the demo app as the traced load, then `tracewire stop` (a barrier: when
# it returns 0, every event is written and acknowledged by the relay).
#
# Run by the target containers of compose/docker-compose.yml, and by the
# network-namespace test harness (tests/netns.py) with the same environment,
# rendered from tracewire/topology.py (target_environment):
#
#   TRACEWIRE_HOSTNAME  hostname reported to the relay (default: hostname)
#   TRACEWIRE_RUNDIR    sessiond's run directory (default: /run/tracewire)
#   TW_RELAY_URL        tw://HOST[:PORT] of the relay (required)
#   TW_SESSION          session name (default: s1)
#   TW_EVENTS           number of demo:tick events (default: 1000)
#   TW_RATE             events per second; empty: as fast as possible
#   TW_PAYLOAD_BYTES    payload string length per event (default: 0)
#   TW_STATUS_DIR       if set: HOSTNAME.done / HOSTNAME.failed is written there
#   TW_WAIT_RELAY       seconds to wait for the relay's port (default: 60)
set -eu

: "${TRACEWIRE_HOSTNAME:=$(hostname)}"
: "${TRACEWIRE_RUNDIR:=/run/tracewire}"
: "${TW_RELAY_URL:?TW_RELAY_URL must be set, e.g. tw://collector:6342}"
: "${TW_SESSION:=s1}"
: "${TW_EVENTS:=1000}"
: "${TW_RATE:=}"
: "${TW_PAYLOAD_BYTES:=0}"
: "${TW_STATUS_DIR:=}"
: "${TW_WAIT_RELAY:=60}"
export TRACEWIRE_HOSTNAME TRACEWIRE_RUNDIR

log() { echo "entrypoint-target[$TRACEWIRE_HOSTNAME]: $*" >&2; }

SESSIOND_PID=""
finish() {
    rc=$?
    if [ -n "$SESSIOND_PID" ]; then
        kill "$SESSIOND_PID" 2>/dev/null || true
        wait "$SESSIOND_PID" 2>/dev/null || true
    fi
    if [ -n "$TW_STATUS_DIR" ]; then
        if [ "$rc" -eq 0 ]; then
            touch "$TW_STATUS_DIR/$TRACEWIRE_HOSTNAME.done"
        else
            echo "$rc" > "$TW_STATUS_DIR/$TRACEWIRE_HOSTNAME.failed"
        fi
    fi
    log "exit $rc"
    exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM INT

if [ -n "$TW_STATUS_DIR" ]; then
    mkdir -p "$TW_STATUS_DIR"
    rm -f "$TW_STATUS_DIR/$TRACEWIRE_HOSTNAME.done" "$TW_STATUS_DIR/$TRACEWIRE_HOSTNAME.failed"
fi
mkdir -p "$TRACEWIRE_RUNDIR"

# 1. sessiond in the background; wait for its control socket.
tracewire-sessiond --rundir "$TRACEWIRE_RUNDIR" >>"$TRACEWIRE_RUNDIR/sessiond.log" 2>&1 &
SESSIOND_PID=$!
i=0
until [ -S "$TRACEWIRE_RUNDIR/control.sock" ]; do
    kill -0 "$SESSIOND_PID" 2>/dev/null || { log "sessiond exited; see $TRACEWIRE_RUNDIR/sessiond.log"; exit 1; }
    i=$((i + 1))
    [ "$i" -le 300 ] || { log "sessiond did not come up within 15 s"; exit 1; }
    sleep 0.05
done

# 2. The relay may still be starting (depends_on orders, it does not wait).
python3 - "$TW_RELAY_URL" "$TW_WAIT_RELAY" <<'PY' || { log "relay $TW_RELAY_URL unreachable"; exit 1; }
import socket, sys, time
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        socket.create_connection((u.hostname, u.port or 6342), timeout=2).close()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"{u.hostname}:{u.port or 6342}: {exc}")
        time.sleep(0.2)
PY

# 3. The session, the load, the barrier.
tracewire create "$TW_SESSION" --url "$TW_RELAY_URL"
tracewire enable-event -s "$TW_SESSION" 'demo:*'
tracewire start "$TW_SESSION"
if [ -n "$TW_RATE" ]; then
    tracewire-demo --events "$TW_EVENTS" --rate "$TW_RATE" --payload-bytes "$TW_PAYLOAD_BYTES"
else
    tracewire-demo --events "$TW_EVENTS" --payload-bytes "$TW_PAYLOAD_BYTES"
fi
tracewire stop "$TW_SESSION"
tracewire status "$TW_SESSION" || true
tracewire destroy "$TW_SESSION"
