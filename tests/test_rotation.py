"""Session rotation without daemons: the control messages, and sessiond's
schedule (``Commands.rotation_loop``) against a fake consumerd on trio's
MockClock (no wall-clock waits)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from sessiond.commands import Commands
from sessiond.model import Registry, Session, SessiondConfig, SessionState, UserError
from tracewire import consumer_ops, ops


class FakeConsumers:
    """What Commands asks of consumerd: every RotateOp is recorded and
    answered; StatusOp answers with ``chunk_bytes`` (reset by a rotation)."""

    def __init__(self) -> None:
        self.rotations: list[consumer_ops.RotateOp] = []
        self.chunk_bytes = 0
        self.fail: str | None = None

    async def call(self, uid: int, op: consumer_ops.Op, fds: tuple[int, ...] = (),
                   timeout: float | None = None) -> consumer_ops.Reply:
        await trio.lowlevel.checkpoint()
        match op:
            case consumer_ops.RotateOp():
                if self.fail:
                    raise UserError(self.fail)
                self.rotations.append(op)
                self.chunk_bytes = 0
                return consumer_ops.RotatedReply(f"/out/s-x/archives/{op.archive}")
            case consumer_ops.StatusOp():
                stats = consumer_ops.StreamStats("k", "p", "c", chunk_bytes=self.chunk_bytes)
                return consumer_ops.StreamsReply((stats,))
        raise AssertionError(op)


def _setup(tmp_path: Any) -> tuple[Commands, FakeConsumers, Session]:
    reg = Registry(SessiondConfig(rundir=str(tmp_path), hostname="h"))
    fake = FakeConsumers()
    cmds = Commands(reg, fake, None)  # type: ignore[arg-type]  # no app is involved
    sess = Session("s", 1, 1000, 1000, str(tmp_path), None, "20261202T101500", state=SessionState.STARTED,
                   declared=True, chunk_begin="20261202T101500+0000")
    reg.sessions["s"] = sess
    reg.current[1000] = "s"
    return cmds, fake, sess


async def test_timer_schedule_rotates_every_period(tmp_path: Any, autojump_clock: MockClock) -> None:
    cmds, fake, sess = _setup(tmp_path)
    reply = await cmds.run(ops.EnableRotationRequest(timer_ms=10_000), 1000, 1000)
    assert reply["rotation"] == {"timer_ms": 10_000, "size": 0}
    async with trio.open_nursery() as n:
        n.start_soon(cmds.rotation_loop)
        await trio.sleep(35)
        assert [r.chunk for r in fake.rotations] == [0, 1, 2]
        assert sess.chunk == 3 and sess.last_archive and sess.last_archive.endswith("-2")
        # Stopped sessions are not rotated by the schedule.
        sess.state = SessionState.STOPPED
        await trio.sleep(30)
        assert len(fake.rotations) == 3
        # Disabled before the session is started again: a due timer left
        # from the stopped period must not race the disable.
        await cmds.run(ops.DisableRotationRequest(), 1000, 1000)
        sess.state = SessionState.STARTED
        await trio.sleep(30)
        assert len(fake.rotations) == 3
        n.cancel_scope.cancel()
    names = [r.archive for r in fake.rotations]
    assert names[0].startswith("20261202T101500+0000-") and names[0].endswith("-0")
    # Each chunk begins where the one before ended.
    width = len("YYYYmmddTHHMMSS+HHMM")
    for a, b in itertools.pairwise(names):
        assert b[:width] == a[width + 1: 2 * width + 1]


async def test_size_schedule_rotates_once_the_chunk_holds_that_much(tmp_path: Any,
                                                                     autojump_clock: MockClock) -> None:
    cmds, fake, _sess = _setup(tmp_path)
    await cmds.run(ops.EnableRotationRequest(size=1_000_000), 1000, 1000)
    async with trio.open_nursery() as n:
        n.start_soon(cmds.rotation_loop)
        fake.chunk_bytes = 999_999
        await trio.sleep(10)
        assert fake.rotations == []
        fake.chunk_bytes = 1_000_000
        await trio.sleep(1)
        assert len(fake.rotations) == 1 and fake.chunk_bytes == 0
        n.cancel_scope.cancel()


async def test_a_failed_scheduled_rotation_is_shown_and_retried(tmp_path: Any, autojump_clock: MockClock) -> None:
    cmds, fake, sess = _setup(tmp_path)
    await cmds.run(ops.EnableRotationRequest(timer_ms=1000), 1000, 1000)
    fake.fail = "relay tw://x: refused"
    async with trio.open_nursery() as n:
        n.start_soon(cmds.rotation_loop)
        await trio.sleep(3)
        assert sess.error == "automatic rotation failed: relay tw://x: refused"
        assert sess.chunk == 0
        fake.fail = None
        await trio.sleep(3)
        assert sess.chunk >= 1
        n.cancel_scope.cancel()


async def test_rotate_states(tmp_path: Any) -> None:
    cmds, fake, sess = _setup(tmp_path)
    sess.state = SessionState.CREATED
    with pytest.raises(UserError, match="has not been started"):
        await cmds.run(ops.RotateRequest(), 1000, 1000)
    sess.state = SessionState.STOPPED
    assert (await cmds.run(ops.RotateRequest(), 1000, 1000))["chunk"] == 0
    with pytest.raises(UserError, match="archived already"):
        await cmds.run(ops.RotateRequest(), 1000, 1000)
    with pytest.raises(UserError, match="belongs to another user"):
        await cmds.run(ops.RotateRequest(session="s"), 1001, 1001)
    with pytest.raises(UserError, match="belongs to another user"):
        await cmds.run(ops.EnableRotationRequest(session="s", timer_ms=5), 1001, 1001)
    assert len(fake.rotations) == 1 and sess.rotation_timer_ms == 0


@pytest.mark.parametrize("msg", [
    ops.RotateRequest(session="s"),
    ops.EnableRotationRequest(session="s", timer_ms=600_000, size=256 << 20),
    ops.DisableRotationRequest(),
])
def test_requests_round_trip(msg: ops.Request) -> None:
    assert ops.decode_request(ops.encode(msg)) == msg


def test_rotate_op_and_reply_round_trip() -> None:
    op = consumer_ops.RotateOp(session="s", chunk=3, archive="a-b-3", timeout=5.0, last=True)
    assert consumer_ops.decode_op(ops.encode(op, 7)) == op
    rotated = consumer_ops.RotatedReply("/x")
    assert consumer_ops.decode_reply(consumer_ops.RotateOp, ops.encode(rotated, 7)) == rotated
    session = consumer_ops.SessionOp("s", 1, "c", "/d", "h", 0, 0, chunk=4)
    assert consumer_ops.decode_op(ops.encode(session, 1)).chunk == 4


@pytest.mark.parametrize(("fields", "why"), [
    ({}, "give --timer"),
    ({"timer_ms": -1}, "--timer out of range"),
    ({"size": 2**61}, "--size out of range"),
    ({"timer_ms": "10m"}, "must be an integer"),
])
def test_enable_rotation_refuses_bad_values(fields: dict[str, Any], why: str) -> None:
    with pytest.raises(ops.MessageError, match=why):
        ops.decode_request({"cmd": "enable_rotation", **fields})


def test_chunk_prefix() -> None:
    assert ops.chunk_prefix(0) == ""
    assert ops.chunk_prefix(12) == "active-chunk-12/"
