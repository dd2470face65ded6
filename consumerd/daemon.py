"""tracewire-consumerd: turns ring-buffer sub-buffers into CTF packets in a sink.

Theory of operation
-------------------
consumerd is spawned by sessiond with one end of a SEQPACKET socketpair
(``--control-fd``).  sessiond sends it traces (a directory and its metadata)
and streams (a ring buffer memfd and its eventfd, with SCM_RIGHTS); consumerd
answers every request with ``{"seq", "ok"}``.

One trio task per stream waits for its eventfd (no polling), takes the closed
sub-buffers the eventfd announced, prepends the 84-byte CTF packet header and
context, and hands the packet to the session's sink, then releases the space
to the producer.  A switch timer, a ``flush`` request (the stop barrier) and a
``producer_gone`` notice (the app exited or died) also take the open
sub-buffer up to the last whole event.

The local sink writes ``<trace>/<channel>_0`` with ``os.writev`` (header and
the shared-memory view, no copy) and appends one LTTng v1.1 index entry per
packet to ``<trace>/index/<channel>_0.idx``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import trio

from tracewire import ctf
from tracewire.control import ControlError, close_fds
from tracewire.names import InvalidName, validate_name
from tracewire.ringbuf import BufferSpec, ConsumerCursor, MemoryBarrier, RingBufferCorrupt
from tracewire.seqpacket import SeqPacket
from tracewire.streamfile import StreamFile
from tracewire.url import parse_url

from consumerd.net import NetSession, SinkError, read_key_file
from consumerd.spool import Spool

__all__ = ["ConsumerdConfig", "serve_consumerd"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConsumerdConfig:
    control_fd: int
    force_barrier: bool = False


class RequestError(Exception):
    """A request from sessiond that cannot be carried out."""


@dataclass
class SessionOut:
    """A session's sink: a local directory, or a relay (``net``)."""

    name: str
    sink: str
    net: NetSession | None = None


@dataclass
class TraceOut:
    trace_id: str
    session: str
    directory: str  # local: the trace directory; relay: the trace path below the session
    uuid: bytes
    metadata_fd: int  # -1 for a relay sink
    metadata_bytes: int = 0


@dataclass
class StreamOut:
    key: str
    session: str
    trace: TraceOut
    channel: str
    stream_class: int
    cursor: ConsumerCursor
    eventfd: int
    file: StreamFile | None  # local sink
    net: NetSession | None  # relay sink
    switch_timer_ms: int
    next_seq: int = 0
    seq_known: bool = True  # False: a resumed relay stream waits for the relay's word
    blocked: bool = False  # the relay sink is full: data waits in the ring
    packets: int = 0
    raw_bytes: int = 0
    gone: bool = False
    broken: str | None = None
    closed: bool = False
    done: trio.Event = field(default_factory=trio.Event)
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)


def _safe_join(base: str, rel: str) -> str:
    """``base/rel`` where every component of ``rel`` is a valid name."""
    parts = rel.split("/")
    for p in parts:
        validate_name(p, "path component")
    return os.path.join(base, *parts)


class Consumerd:
    def __init__(self, config: ConsumerdConfig, conn: SeqPacket, nursery: trio.Nursery) -> None:
        self.config = config
        self.conn = conn
        self.nursery = nursery
        self.sessions: dict[str, SessionOut] = {}
        self.traces: dict[str, TraceOut] = {}
        self.streams: dict[str, StreamOut] = {}
        self.barrier = MemoryBarrier(force=config.force_barrier)

    # ------------------------------------------------------------- requests
    async def run(self) -> None:
        while True:
            try:
                got = await self.conn.receive()
            except ControlError as exc:
                logger.error("bad request from sessiond: %s", exc)
                continue
            if got is None:
                logger.info("sessiond closed the control socket; exiting")
                return
            msg, fds = got
            seq = msg.get("seq")
            op = msg.get("op")
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
            try:
                if handler is None:
                    raise RequestError(f"unknown op {op!r}")
                result = await handler(msg, fds)
                reply = {"seq": seq, "ok": True, **(result or {})}
            except (RequestError, InvalidName, OSError, KeyError, ValueError, RingBufferCorrupt, SinkError) as exc:
                close_fds(fds)
                logger.warning("request %s failed: %s", op, exc)
                reply = {"seq": seq, "ok": False, "error": str(exc)}
            await self.conn.send(reply)

    async def op_hello(self, msg: dict, fds: list[int]) -> dict:
        return {"pid": os.getpid()}

    async def op_session(self, msg: dict, fds: list[int]) -> dict:
        """Declare a session and its sink (before its traces)."""
        name = str(msg["session"])
        if name in self.sessions:
            return {}
        sink = str(msg["sink"])
        net = None
        if "://" in sink:
            try:
                url = parse_url(sink)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            auth = None
            if msg.get("auth_key_file"):
                auth = read_key_file(str(msg["auth_key_file"]))
            so = SessionOut(name, sink)
            spool = None
            if msg.get("spool_dir"):
                spool = Spool(str(msg["spool_dir"]), int(msg.get("spool_size") or 64 * 1024 * 1024))
            net = NetSession(
                name=name, session_id=int(msg["session_id"]), created=str(msg["created"]),
                url=url, hostname=str(msg["hostname"]), compress=msg.get("compress", "zstd") == "zstd",
                level=int(msg.get("compress_level") or 1), auth=auth,
                ca_file=msg.get("tls_ca") or None, live=bool(msg.get("live")),
                on_room=lambda: self._on_room(so),
                spool=spool, on_saved=self._on_saved,
                max_unacked_bytes=int(msg.get("spool_size") or 64 * 1024 * 1024),
            )
            so.net = net
            self.nursery.start_soon(net.run)
        else:
            if not os.path.isabs(sink):
                raise RequestError(f"sink {sink!r} is not an absolute directory")
            so = SessionOut(name, sink)
        self.sessions[name] = so
        return {}

    def _on_saved(self, key: str, pos: int, ts: int) -> None:
        st = self.streams.get(key)
        if st is not None and not st.closed:
            st.cursor.publish(pos, ts)

    def _on_room(self, so: SessionOut) -> None:
        for st in list(self.streams.values()):
            if st.session == so.name and st.blocked and not st.closed:
                self.drain(st, flush=st.gone)

    async def op_add_trace(self, msg: dict, fds: list[int]) -> dict:
        tid = str(msg["trace_id"])
        if tid in self.traces:
            return {}
        so = self.sessions[str(msg["session"])]
        path = str(msg["path"])
        if so.net is not None:
            so.net.add_trace(tid, path)
            self.traces[tid] = TraceOut(tid, so.name, path, bytes.fromhex(msg["uuid"]), -1)
            return {"directory": f"{so.sink}/{path}"}
        directory = _safe_join(so.sink, path)
        os.makedirs(os.path.join(directory, "index"), exist_ok=True)
        mpath = os.path.join(directory, "metadata")
        mfd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        size = os.fstat(mfd).st_size
        self.traces[tid] = TraceOut(tid, so.name, directory, bytes.fromhex(msg["uuid"]), mfd, size)
        return {"directory": directory}

    async def op_metadata(self, msg: dict, fds: list[int]) -> dict:
        tr = self.traces[str(msg["trace_id"])]
        data = str(msg["text"]).encode()
        if msg.get("replay"):
            # The whole metadata, after a consumerd restart: a local file
            # already holds a prefix of it; a relay session starts empty.
            data = data[tr.metadata_bytes:]
        net = self.sessions[tr.session].net
        if net is not None:
            net.add_metadata(tr.trace_id, data)
        elif data:
            os.write(tr.metadata_fd, data)
        tr.metadata_bytes += len(data)
        return {}

    async def op_add_stream(self, msg: dict, fds: list[int]) -> dict:
        if not fds and msg.get("gone"):
            # A dead app's stream whose ring is already freed (a restarted
            # consumerd): only what its spool still holds is left to send.
            tr = self.traces[str(msg["trace_id"])]
            net = self.sessions[tr.session].net
            if net is not None:
                net.add_stream(str(msg["key"]), tr.trace_id, validate_name(str(msg["channel"])), resume=True)
            return {}
        if len(fds) != 2:
            raise RequestError("add_stream needs a memfd and an eventfd")
        key = str(msg["key"])
        if key in self.streams:
            close_fds(fds)
            return {}
        tr = self.traces[str(msg["trace_id"])]
        net = self.sessions[tr.session].net
        channel = validate_name(str(msg["channel"]), "channel name")
        memfd, efd = fds
        spec = BufferSpec(int(msg["subbuf_size"]), int(msg["num_subbuf"]))
        try:
            cursor = ConsumerCursor(memfd, spec)
        finally:
            os.close(memfd)
        os.set_blocking(efd, False)
        sf = None
        next_seq, seq_known = 0, True
        if net is not None:
            cursor.deferred = True  # ring space is released once a packet is spooled
            last = net.add_stream(key, tr.trace_id, channel, resume=bool(msg.get("replay")))
            if last is not None:
                cursor.skip_to(last.ring_end, last.ts_end)
                next_seq = last.seq + 1
            elif msg.get("replay"):
                seq_known = False
        else:
            # Reopening after a consumerd restart continues the same files.
            sf = StreamFile(tr.directory, f"{channel}_0")
            if sf.recovered_bytes:
                logger.warning("%s: cut %d bytes of a partial packet", sf.path, sf.recovered_bytes)
            cursor.last_discarded = sf.last_discarded
            if sf.next_seq:
                cursor.last_ts = max(cursor.last_ts, sf.last_ts_end)
        st = StreamOut(
            key, tr.session, tr, channel, int(msg["stream_class"]), cursor, efd,
            sf, net, int(msg.get("switch_timer_ms") or 0),
            next_seq=sf.next_seq if sf else next_seq, seq_known=seq_known,
        )
        self.streams[key] = st
        self.nursery.start_soon(self.stream_task, st)
        return {}

    async def _flush_streams(self, streams: list[StreamOut]) -> None:
        """Drain every stream to its last whole event, waiting for room in a
        relay sink when needed, then for the relay's acknowledgements."""
        nets = {id(st.net): st.net for st in streams if st.net is not None}
        while True:
            for st in streams:
                if not st.closed:
                    self.drain(st, flush=True)
                    if st.file is not None:
                        st.file.flush()
            blocked = [st for st in streams if st.blocked and not st.closed and not st.broken]
            if not blocked:
                break
            net = blocked[0].net
            assert net is not None
            if net.error:
                raise RequestError(f"relay {net.url}: {net.error}")
            await net.wait_change()
        for net in nets.values():
            try:
                await net.wait_all_acked()
            except SinkError as exc:
                raise RequestError(f"relay {net.url}: {exc}") from None

    async def op_flush(self, msg: dict, fds: list[int]) -> dict:
        session = str(msg["session"])
        streams = [st for st in self.streams.values() if st.session == session]
        timeout = float(msg.get("timeout") or 120)
        with trio.move_on_after(timeout) as cs:
            await self._flush_streams(streams)
        if cs.cancelled_caught:
            so = self.sessions[session]
            net = so.net
            left = sum(len(net.streams[st.key].unacked) for st in streams) if net else 0
            why = f" (last failure: {net.last_failure})" if net and net.last_failure else ""
            raise RequestError(
                f"relay {net.url if net else so.sink} has not acknowledged everything after "
                f"{timeout:.0f} s: {left} packets kept, more may wait in the ring buffers{why}; "
                "they are sent when the relay is reachable"
            )
        return {"streams": [self._stats(st) for st in streams]}

    async def op_producer_gone(self, msg: dict, fds: list[int]) -> dict:
        """The app exited or died: write (or spool) what it committed, then
        let its ring buffer go — sessiond frees it once we say so, so a
        session tracing many short-lived apps does not keep them all."""
        st = self.streams.get(str(msg["key"]))
        if st is None or st.closed:
            return {"released": True}
        st.gone = True
        self.drain(st, flush=True)
        if st.blocked:  # a full spool: the rest waits in the ring; released later
            return {"released": False}
        await self.close_stream(st)
        return {"released": True}

    async def op_remove_session(self, msg: dict, fds: list[int]) -> dict:
        session = str(msg["session"])
        streams = [st for st in self.streams.values() if st.session == session]
        so = self.sessions.get(session)
        try:
            with trio.move_on_after(float(msg.get("timeout", 30))):
                await self._flush_streams(streams)
        finally:
            for st in streams:
                await self.close_stream(st)
                del self.streams[st.key]
            for tid, tr in list(self.traces.items()):
                if tr.session == session:
                    if tr.metadata_fd >= 0:
                        os.close(tr.metadata_fd)
                    del self.traces[tid]
            if so is not None:
                if so.net is not None:
                    so.net.close()
                    if so.net.spool is not None:
                        for st in streams:
                            so.net.spool.remove(st.key)
                        so.net.spool.close()
                        try:
                            os.rmdir(so.net.spool.directory)
                        except OSError:
                            pass
                del self.sessions[session]
        return {}

    async def op_status(self, msg: dict, fds: list[int]) -> dict:
        session = str(msg["session"])
        return {"streams": [self._stats(st) for st in self.streams.values() if st.session == session]}

    def _stats(self, st: StreamOut) -> dict:
        out = {
            "key": st.key,
            "path": st.file.path if st.file else f"{st.net.url}/{st.trace.directory}/{st.channel}_0",
            "channel": st.channel,
            "packets": st.packets,
            "raw_bytes": st.raw_bytes,
            "wire_bytes": st.raw_bytes,
            "discarded": st.cursor.last_discarded,
            "unacked": 0,
            "producer": "gone" if st.gone else "alive",
            "error": st.broken,
        }
        if st.net is not None:
            out.update(st.net.stats(st.key))
            if st.net.error:
                out["error"] = f"relay: {st.net.error}"
            elif not st.net.connected and st.net.last_failure:
                out["error"] = f"relay unreachable: {st.net.last_failure}"
        return out

    # ------------------------------------------------------------- streams
    async def stream_task(self, st: StreamOut) -> None:
        timer = st.switch_timer_ms / 1000 if st.switch_timer_ms > 0 else float("inf")
        try:
            await self._stream_loop(st, timer)
        finally:
            st.done.set()

    async def _stream_loop(self, st: StreamOut, timer: float) -> None:
        with st.cancel:
            while not st.closed:
                with trio.move_on_after(timer) as cs:
                    try:
                        await trio.lowlevel.wait_readable(st.eventfd)
                    except trio.ClosedResourceError:
                        break  # close_stream() is closing the eventfd
                if st.closed:
                    break
                if cs.cancelled_caught:
                    self.drain(st, flush=True)
                    continue
                try:
                    n = os.eventfd_read(st.eventfd)
                except BlockingIOError:
                    continue
                st.cursor.announce(n)
                self.drain(st, flush=False)

    def drain(self, st: StreamOut, flush: bool) -> None:
        """Write every chunk the ring buffer has for us (all of it on flush)."""
        if st.broken or st.closed:
            return
        net = st.net
        st.blocked = False
        cur = st.cursor
        try:
            limit = None
            if flush:
                try:
                    st.cursor.announce(os.eventfd_read(st.eventfd))
                except BlockingIOError:
                    pass
                # None: the producer is too busy to catch a consistent head;
                # take the closed sub-buffers now and the rest next time.
                limit = cur.flush_limit(self.barrier)
            if not st.seq_known:
                first = net.first_seq(st.key) if net is not None else 0
                if first is None:
                    st.blocked = True  # until the relay says where the stream stands
                    return
                st.next_seq, st.seq_known = first, True
            while True:
                if net is not None and not net.has_room():
                    st.blocked = True  # the rest waits in the ring buffer
                    return
                chunk = cur.next_chunk(limit)
                if chunk is None:
                    break
                self.write_packet(st, chunk)
                cur.release()
            if limit is not None and cur.discarded_pending() > 0:
                self.write_packet(st, cur.empty_chunk(limit[1]))
                cur.release()
        except RingBufferCorrupt as exc:
            st.broken = str(exc)
            logger.error("stream %s abandoned: %s", st.key, exc)
        except OSError as exc:
            st.broken = f"write failed: {exc}"
            logger.error("stream %s: %s", st.key, st.broken)

    def write_packet(self, st: StreamOut, chunk) -> None:
        n = len(chunk.data)
        seq = st.next_seq
        header = ctf.pack_packet_header(
            st.trace.uuid, st.stream_class, 0, chunk.ts_begin, chunk.ts_end, n, seq,
            chunk.events_discarded,
        )
        if st.net is not None:
            st.net.submit(st.key, header + chunk.data, seq, chunk.ts_begin, chunk.ts_end,
                          chunk.events_discarded, chunk.end)
        else:
            assert st.file is not None
            st.file.append([header, chunk.data], chunk.ts_begin, chunk.ts_end,
                           chunk.events_discarded, st.stream_class)
        st.packets += 1
        st.raw_bytes += len(header) + n
        st.next_seq = seq + 1

    async def close_stream(self, st: StreamOut) -> None:
        """Stop reading a stream and release its files and mapping (once)."""
        if st.closed:
            return
        st.closed = True
        trio.lowlevel.notify_closing(st.eventfd)
        st.cancel.cancel()
        await st.done.wait()
        if st.file is not None:
            st.file.close()
        os.close(st.eventfd)
        st.cursor.close()


async def serve_consumerd(config: ConsumerdConfig, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve sessiond's requests on ``config.control_fd`` until it closes."""
    import socket

    sock = socket.socket(fileno=config.control_fd)
    conn = SeqPacket(trio.socket.from_stdlib_socket(sock))
    async with trio.open_nursery() as nursery:
        cd = Consumerd(config, conn, nursery)
        task_status.started(cd)
        try:
            await cd.run()
        finally:
            with trio.move_on_after(10) as cs:
                cs.shield = True
                for st in list(cd.streams.values()):
                    if not st.closed:
                        cd.drain(st, flush=True)
                        await cd.close_stream(st)
            nursery.cancel_scope.cancel()
