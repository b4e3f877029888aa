"""The stall watchdog (agent/transport/watchdog.py): it aborts a silent peer after its limit, but a process
that was itself frozen (its timer ran long after it was due) gives the peer a whole limit again — in
asyncio alone, and with a real GossipServer process stopped with SIGSTOP while a push arrives."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from agent.transport._generated.dpgan.v1 import dpgan_pb2 as pb
from agent.transport.watchdog import FROZEN_SLACK_SECONDS, StallWatchdog
from tests.test_transport_hygiene import STALL, Pusher, server_process, vector_frames

pytestmark = pytest.mark.timeout(30)

LIMIT = 0.2
SLACK = 0.3


def test_silent_block_times_out_after_the_limit() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(TimeoutError):
            async with StallWatchdog(LIMIT, slack=SLACK):
                await asyncio.sleep(5)
        return loop.time() - began

    waited = asyncio.run(scenario())
    assert LIMIT * 0.9 <= waited < LIMIT + SLACK, waited


def test_feeding_keeps_the_block_alive_and_silence_then_ends_it() -> None:
    async def scenario() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        fed = 0
        with pytest.raises(TimeoutError):
            async with StallWatchdog(LIMIT, slack=SLACK) as watchdog:
                for _ in range(10):  # 0.5 s of progress every 0.05 s: longer than the limit in all
                    await asyncio.sleep(0.05)
                    watchdog.fed()
                    fed += 1
                silent = loop.time()
                await asyncio.sleep(5)
        return fed, loop.time() - silent

    fed, silent_for = asyncio.run(scenario())
    assert fed == 10
    assert LIMIT * 0.9 <= silent_for < LIMIT + SLACK, silent_for


def test_a_late_timer_means_this_process_was_frozen_and_grants_a_whole_limit() -> None:
    async def scenario() -> tuple[int, float, bool]:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with StallWatchdog(LIMIT, slack=SLACK) as watchdog:
                time.sleep(LIMIT + SLACK + 0.3)  # the loop does not run: as under SIGSTOP
                thawed = loop.time()
                await asyncio.sleep(LIMIT * 0.5)  # the peer's data "arrives" after the thaw
                alive = not watchdog.expired()
                await asyncio.sleep(5)  # then real silence
        return watchdog.thaws, loop.time() - thawed, alive

    thaws, after_thaw, alive_after_thaw = asyncio.run(scenario())
    assert thaws == 1
    assert alive_after_thaw
    assert LIMIT * 0.9 <= after_thaw < LIMIT + SLACK, after_thaw


def test_expire_now_ends_the_block_and_disarm_lifts_the_limit() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(TimeoutError):
            async with StallWatchdog(10.0) as watchdog:
                loop.call_later(0.05, watchdog.expire_now)
                await asyncio.sleep(5)
        expired_after = loop.time() - began
        async with StallWatchdog(LIMIT, slack=SLACK) as watchdog:
            watchdog.disarm()
            await asyncio.sleep(LIMIT * 2)
        return expired_after

    assert asyncio.run(scenario()) < 1.0
    with pytest.raises(ValueError, match="stall limit must be > 0"):
        StallWatchdog(0)


def test_server_frozen_while_a_push_arrives_accepts_it_after_the_thaw() -> None:
    """SIGSTOP a GossipServer process halfway through a 1 MiB push, for longer than its stall limit plus
    the slack; the sender keeps sending. After SIGCONT the server must read the rest and accept the
    vector, not abort it as stalled (it was the receiver that stopped, not the sender)."""
    frozen_s = STALL + FROZEN_SLACK_SECONDS + 0.8

    async def scenario() -> pb.PushAck:
        async with server_process() as (address, pid):
            pusher = Pusher(address, "a")
            try:
                await pusher.handshake()
                frames = vector_frames("a")
                half = len(frames) // 2
                first_half_sent = asyncio.Event()
                go_on = asyncio.Event()

                async def requests() -> AsyncIterator[bytes]:
                    for frame in frames[:half]:
                        yield frame
                    first_half_sent.set()
                    await go_on.wait()
                    for frame in frames[half:]:
                        yield frame

                call = pusher._push(requests(), timeout=20)
                await first_half_sent.wait()
                await asyncio.sleep(0.1)  # the server reads the first half
                os.kill(pid, signal.SIGSTOP)
                try:
                    go_on.set()  # the rest goes into the socket (and waits for flow control)
                    await asyncio.sleep(frozen_s)
                finally:
                    os.kill(pid, signal.SIGCONT)
                return await call
            finally:
                await pusher.close()

    try:
        ack = asyncio.run(asyncio.wait_for(scenario(), 25))
    except grpc.aio.AioRpcError as error:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"the thawed server aborted the push: {error.code().name} {error.details()}")
    assert ack.accepted, ack.reason
