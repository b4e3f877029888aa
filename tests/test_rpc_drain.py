"""At shutdown the agent waits for grpc.aio's RPC tasks after ``Server.stop`` (agent/node/agent.py:
``_rpc_tasks_ended``): without it, a handler still running at the stop was cancelled when the loop
closed and cygrpc printed a CancelledError traceback into the agent's log (once in the fault suite).
Without the wait this script had the RPC's tasks still pending right after the stop in 4 of 5 runs (and
then printed that traceback); with it, none is left and nothing is printed."""

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
    rpc_tasks = [
        task for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") in ("_schedule_rpc_coro", "_handle_exceptions")
    ]
    print("rpc tasks left:", sum(not task.done() for task in rpc_tasks))
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
    assert "call ended" in drained.stdout and "rpc tasks left: 0" in drained.stdout, drained.stdout
    assert "Traceback" not in drained.stderr, drained.stderr
