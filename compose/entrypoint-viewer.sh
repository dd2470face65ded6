#!/bin/sh
# The viewer: wait until every target named on the command line has finished
# (HOSTNAME.done in /status, written by entrypoint-target.sh after
# `tracewire stop` returned), then print the relay's traces with babeltrace2.
# Exits non-zero if a target failed or did not finish within TW_WAIT (600 s).
set -eu
: "${TW_STATUS_DIR:=/status}"
: "${TW_TRACES:=/traces}"
: "${TW_WAIT:=600}"
[ "$#" -gt 0 ] || { echo "usage: entrypoint-viewer.sh HOSTNAME..." >&2; exit 2; }
start=$(date +%s)
for host in "$@"; do
    until [ -e "$TW_STATUS_DIR/$host.done" ]; do
        if [ -e "$TW_STATUS_DIR/$host.failed" ]; then
            echo "viewer: target $host failed (exit $(cat "$TW_STATUS_DIR/$host.failed"))" >&2
            exit 1
        fi
        if [ $(( $(date +%s) - start )) -ge "$TW_WAIT" ]; then
            echo "viewer: target $host did not finish within $TW_WAIT s" >&2
            exit 1
        fi
        sleep 1
    done
done
echo "viewer: all targets done; reading $TW_TRACES" >&2
exec babeltrace2 "$TW_TRACES"
