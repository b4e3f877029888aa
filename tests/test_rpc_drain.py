"""At shutdown the agent waits for grpc.aio's RPC tasks after ``Server.stop`` (agent/node/agent.py:
``_rpc_tasks_ended``): without it, a handler still running at the stop was cancelled when the loop
closed and cygrpc printed a CancelledError traceback into the agent's log (once in the fault suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

SCRIPT = """
import asyncio, sys
import grpc
from agent.node.agent import _rpc_tasks_ended

async def main(drain):
    server = grpc.aio.server()
    async def slow(request, context):
        await asyncio.sleep(5)
        return b"late"
    handler = grpc.method_handlers_generic_handler("t.S", {"M": grpc.unary_unary_rpc_method_handler(slow)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/t.S/M")(b"x")
    await asyncio.sleep(0.5)  # the handler is running
    await server.stop(0.2)
    if drain:
        await _rpc_tasks_ended(0.5)
    try:
        await call
    except grpc.aio.AioRpcError as error:
        print("call ended:", error.code().name)
    await channel.close()

asyncio.run(main(sys.argv[1] == "drain"))
"""


def run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_rpc_tasks_end_before_the_loop_closes_so_nothing_is_printed() -> None:
    drained = run("drain")
    assert drained.returncode == 0, drained.stderr
    assert "call ended" in drained.stdout
    assert "Traceback" not in drained.stderr, drained.stderr


def test_without_the_wait_the_traceback_appears() -> None:
    """The failure the wait prevents, so the test above cannot pass by accident (grpcio 1.85 behaviour)."""
    plain = run("plain")
    assert "_schedule_rpc_coro" in plain.stderr and "CancelledError" in plain.stderr, plain.stderr
