"""wire_dtype float32-auto's choice (agent.transport.wire_choice): code a vector's exponent bytes only when
the link time saved exceeds the coding cost, with a hysteresis band and an occasional re-measure."""

from __future__ import annotations

import pytest

from agent.transport import wire_choice
from agent.transport.wire_choice import Measurements, WireChoice, benefit, decide

MB = 1_000_000
MBIT = 125_000  # bytes/s per Mbit/s
# Break-even with the priors: saving / (2 x coding cost) = 0.17 / 8e-9 bytes/s, about 170 Mbit/s.
BREAK_EVEN = wire_choice.PRIOR_SAVING / (
    wire_choice.PRIOR_CODE_SECONDS_PER_BYTE * (1 + wire_choice.DECODE_PER_ENCODE)
)


def measured(rate: float | None, saving: float = wire_choice.PRIOR_SAVING) -> Measurements:
    return Measurements(rate, saving, wire_choice.PRIOR_CODE_SECONDS_PER_BYTE)


@pytest.mark.timeout(10)
def test_the_break_even_rate_is_what_the_docs_say() -> None:
    assert 150 * MBIT < BREAK_EVEN < 200 * MBIT
    assert benefit(measured(BREAK_EVEN)) == pytest.approx(1.0)
    assert benefit(measured(None)) is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("mbit_s", "expected"),
    [(2, "code"), (20, "code"), (100, "code"), (250, "plain"), (1000, "plain"), (10_000, "plain")],
)
def test_slow_links_code_and_fast_links_do_not(mbit_s: float, expected: str) -> None:
    assert decide(measured(mbit_s * MBIT), coding=False, plain_since_coded=0) == expected


@pytest.mark.timeout(10)
def test_the_first_vector_goes_plain_and_measures_the_link() -> None:
    choice = WireChoice()
    assert choice.next_wire_dtype() == ("float32", False)
    choice.observe_push(int(0.5 * MB), 0.2)  # 2.5 MB/s: 20 Mbit/s
    assert choice.next_wire_dtype() == ("float32-delta", True)
    assert choice.coding
    assert choice.next_wire_dtype() == ("float32-delta", False)


@pytest.mark.timeout(10)
def test_a_rate_near_break_even_does_not_flip_the_choice_every_vector() -> None:
    for inside in (0.7, 0.9, 1.1, 1.4):  # saves 1.43x to 0.71x the cost: inside the band, nothing changes
        assert decide(measured(inside * BREAK_EVEN), coding=False, plain_since_coded=0) == "plain"
        assert decide(measured(inside * BREAK_EVEN), coding=True, plain_since_coded=0) == "code"
    assert decide(measured(0.6 * BREAK_EVEN), coding=False, plain_since_coded=0) == "code"
    assert decide(measured(1.6 * BREAK_EVEN), coding=True, plain_since_coded=0) == "plain"


@pytest.mark.timeout(10)
def test_the_choice_follows_the_link_when_it_changes() -> None:
    choice = WireChoice()
    choice.observe_push(MB, 0.4)  # 20 Mbit/s
    assert choice.next_wire_dtype()[0] == "float32-delta"
    flips = []
    for _ in range(30):  # the link gets 1 GbE fast: the median follows once most recent pushes are fast
        choice.observe_push(MB, 0.008)
        dtype, changed = choice.next_wire_dtype()
        flips.append(changed)
    assert dtype == "float32" and flips.count(True) == 1 and flips.index(True) < 3
    dtypes = []
    for _ in range(3):  # slow again: the median is slow from the third push on
        choice.observe_push(MB, 0.4)
        dtypes.append(choice.next_wire_dtype()[0])
    assert dtypes == ["float32", "float32", "float32-delta"]


@pytest.mark.timeout(10)
def test_a_push_held_up_by_a_stalled_neighbour_is_not_a_slow_link() -> None:
    choice = WireChoice()
    for _ in range(10):
        choice.observe_push(MB, 0.002)  # 4 Gbit/s
        assert choice.next_wire_dtype() == ("float32", False)
    for stalled in (1.5, 0.002, 0.002, 1.0, 0.002, 0.002, 3.0):  # now and then a push waits seconds
        choice.observe_push(MB, stalled)
        assert choice.next_wire_dtype() == ("float32", False)


@pytest.mark.timeout(10)
def test_a_coding_cost_measured_on_a_busy_cpu_is_measured_again() -> None:
    """The cost is measured only while coding: a node that stopped coding because its CPU was busy
    re-measures now and then, and codes again once the cost is back to normal."""
    choice = WireChoice()
    rate = 60 * MBIT  # coding pays at the prior cost (4 ms per MB), not at 25 ms per MB
    dtypes = []
    for _ in range(40 * wire_choice.REPROBE_EVERY):
        choice.observe_push(MB, MB / rate)
        dtype, _ = choice.next_wire_dtype()
        dtypes.append(dtype)
        if dtype == "float32-delta":
            busy = len(dtypes) < 10
            choice.observe_coding(MB, int(0.83 * MB), 0.025 if busy else 0.004)
    first_plain = dtypes.index("float32")
    assert dtypes[:first_plain] == ["float32-delta"] * first_plain
    back = dtypes.index("float32-delta", first_plain)
    assert back - first_plain == wire_choice.REPROBE_EVERY  # the first probe
    assert dtypes[-100:] == ["float32-delta"] * 100  # coding again for good
    assert choice.describe()["coding_ms_per_mb"] == pytest.approx(4.0, abs=0.1)


@pytest.mark.timeout(10)
def test_vectors_that_do_not_compress_go_plain_and_are_re_measured_now_and_then() -> None:
    choice = WireChoice()
    choice.observe_push(MB, 0.4)  # slow: coding would pay at the prior saving
    dtypes = []
    for _ in range(3 * wire_choice.REPROBE_EVERY):
        dtype, _ = choice.next_wire_dtype()
        dtypes.append(dtype)
        if dtype == "float32-delta":
            choice.observe_coding(MB, MB, 0.004)  # the coding did not pay: the vector went as float32
    coded = [i for i, d in enumerate(dtypes) if d == "float32-delta"]
    # Coded until the measured saving fell below the break-even, then one probe per REPROBE_EVERY vectors.
    first_plain = dtypes.index("float32")
    assert first_plain < 12
    probes = [i for i in coded if i > first_plain]
    assert len(probes) == 2 and probes[1] - probes[0] == wire_choice.REPROBE_EVERY + 1
    assert not choice.coding  # a probe leaves the choice plain


@pytest.mark.timeout(10)
def test_fast_links_are_never_probed() -> None:
    choice = WireChoice()
    choice.observe_push(MB, 0.002)  # 4 Gbit/s
    assert {choice.next_wire_dtype()[0] for _ in range(5 * wire_choice.REPROBE_EVERY)} == {"float32"}


@pytest.mark.timeout(10)
def test_measurements_move_the_choice() -> None:
    choice = WireChoice()
    choice.observe_push(MB, MB / (50 * MBIT))  # 50 Mbit/s: codes at the priors
    assert choice.next_wire_dtype()[0] == "float32-delta"
    for _ in range(20):  # this CPU codes at 40 ms per MB: not worth it at 50 Mbit/s
        choice.observe_coding(MB, int(0.83 * MB), 0.04)
    assert choice.next_wire_dtype()[0] == "float32"
    assert choice.describe() == {"push_rate_mbit_s": 50.0, "saving": pytest.approx(0.17, abs=1e-3),
                                 "coding_ms_per_mb": pytest.approx(40.0, abs=0.2)}  # fmt: skip
    choice.observe_push(0, 1.0)  # ignored: nothing delivered
    choice.observe_push(MB, 0.0)
    assert choice.push_rate == pytest.approx(50 * MBIT)


@pytest.mark.timeout(10)
def test_a_coding_cost_that_swings_with_the_load_does_not_flip_the_choice() -> None:
    """Measured with other processes on the cores, the cost of one coding swings 2x from one vector to the
    next; the least of the recent ones is what the choice uses."""
    choice = WireChoice()
    rate = 50 * MBIT  # break-even for a cost of 13.6 ms per MB
    costs = [0.012, 0.024, 0.011, 0.026, 0.013, 0.022] * 20
    changes = 0
    for cost in costs:
        choice.observe_push(MB, MB / rate)
        dtype, changed = choice.next_wire_dtype()
        changes += changed
        if dtype == "float32-delta":
            choice.observe_coding(MB, int(0.83 * MB), cost)
    assert changes <= 2, changes
