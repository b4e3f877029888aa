"""``wire_dtype: float32-auto``: per vector, send float32's bits plain or coded (as ``float32-delta``:
against the last vector sent on each edge, ``agent.transport.delta_coding``, or with the exponent bytes
coded, ``float32-huffman``, where the neighbour holds none yet), whichever the node's measurements say is
faster. Both carry the same bits, so the choice never changes the run, only its speed.

Coding pays when the link time it saves is more than the CPU it costs::

    saving · b / r  >  (c_enc + c_dec) · b      ⇔      r  <  saving / (c_enc + c_dec)

with b the vector's float32 bytes, r the node's push rate (bytes/s, measured per push: wire bytes over
the call's wall time; the median of the recent pushes), ``saving`` the fraction of bytes the coding removes
(measured on the vectors this node coded; ~0.17 for the exponent coding, 0.3–0.4 against a reference, on
GAN parameters; the prior is the exponent coding's) and c_enc, c_dec the coding and
decoding cost in s/byte (c_enc measured here; the receiver's c_dec is assumed equal, the measured decode
being 0.2–0.8× the encode).
The size b cancels: the decision is a rate threshold, ~170 Mbit/s with the priors below on the
development VM (docs/compression.md). Per-call latency and a busy CPU make small pushes look slower
than the link; that can only pick coding where the saving and the cost are both small.

A hysteresis band (switch on above 1.5×, off below 0.67× break-even) keeps a node near the threshold,
where either choice costs about the same, from flipping the choice every round. The decision is a pure
function of the measurements (``decide``); ``WireChoice`` keeps them, fed by the agent's pushes and
codings.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

PRIOR_SAVING = 0.17  # fraction of a float32 vector's bytes the coding saves (measured 0.17 on GAN models)
PRIOR_CODE_SECONDS_PER_BYTE = 4e-9  # encode cost; measured 2-4.5 ms per MB on the development VM
DECODE_PER_ENCODE = 1.0  # the receiver's decode, assumed as dear as the encode (measured 0.2-0.8x)
SMOOTHING = 0.25  # weight of a new coding's saving in its exponential moving average
PUSH_WINDOW = 5  # the push rate is the median over this many recent pushes
CODING_WINDOW = 5  # the coding cost is the least over this many recent codings
SWITCH_ON = 1.5  # code when the saved link time exceeds this multiple of the coding cost
SWITCH_OFF = 0.67  # ... and stop when it falls below this multiple
REPROBE_EVERY = 50  # plain vectors between two coded ones while the measurements alone say no
CODED = "float32-delta"  # what a coded round sends: against each edge's reference, or exponent-coded


@dataclass(frozen=True)
class Measurements:
    """What the decision depends on; None: not measured yet."""

    push_rate: float | None  # bytes/s of the node's recent pushes
    saving: float  # fraction of a float32 vector's bytes the coding removes, in [0, 1)
    code_seconds_per_byte: float  # encode cost per float32 byte


def benefit(m: Measurements) -> float | None:
    """Saved link time over coding cost, per vector (size-free: both scale with it); None while the
    push rate is unknown."""
    if m.push_rate is None or m.push_rate <= 0:
        return None
    cost = m.code_seconds_per_byte * (1.0 + DECODE_PER_ENCODE)
    return (m.saving / m.push_rate) / cost if cost > 0 else float("inf")


def decide(m: Measurements, coding: bool, plain_since_coded: int) -> str:
    """How to send the next vector: ``"code"``, ``"plain"``, or ``"probe"`` (code this one to re-measure
    the saving and the cost, the choice staying plain). ``coding``: the current choice (for the
    hysteresis band); ``plain_since_coded``: plain vectors sent since the last coded one."""
    ratio = benefit(m)
    if ratio is None:
        return "plain"  # the first push measures the link
    if ratio > (SWITCH_OFF if coding else SWITCH_ON):
        return "code"
    # The saving and the cost are measured only on coded vectors, so they may be stale: a model's
    # exponents change as it trains, and a cost measured while the CPU was busy overstates it. Re-measure
    # now and then when the priors would pay at this rate.
    hopeful = Measurements(
        m.push_rate, max(m.saving, PRIOR_SAVING), min(m.code_seconds_per_byte, PRIOR_CODE_SECONDS_PER_BYTE)
    )
    with_priors = benefit(hopeful)
    if with_priors is not None and with_priors > SWITCH_ON and plain_since_coded >= REPROBE_EVERY:
        return "probe"
    return "plain"


class WireChoice:
    """The sender's running measurements and its current choice; not thread-safe (the event loop's)."""

    def __init__(self) -> None:
        # Seconds per byte of the recent pushes, the quantity the saved time is linear in. Their median
        # is the rate: one push held up by a neighbour that stalled (or a freeze of this process) does
        # not read as a slow link, and a link that became slow shows after PUSH_WINDOW // 2 + 1 pushes.
        self.recent_seconds_per_byte: deque[float] = deque(maxlen=PUSH_WINDOW)
        self.saving = PRIOR_SAVING
        # Wall seconds per float32 byte of the recent codings. Their least is the cost: a busy CPU only
        # ever adds time, and a cost that swings 2x from one vector to the next (measured with other
        # processes on the cores) would otherwise flip the choice on and off.
        self.recent_code_seconds_per_byte: deque[float] = deque(maxlen=CODING_WINDOW)
        self.coding = False
        self.plain_since_coded = 0
        # Vectors sent (pushes the neighbour answered), by the encoding they went in (a coded round sends
        # float32-delta to neighbours holding a reference, float32-huffman to the others).
        self.vectors = {"float32": 0, "float32-huffman": 0, "float32-delta": 0}

    @property
    def push_rate(self) -> float | None:
        """Bytes/s of the node's recent pushes; None before the first."""
        recent = self.recent_seconds_per_byte
        return 1.0 / statistics.median(recent) if recent else None

    @property
    def code_seconds_per_byte(self) -> float:
        """The coding cost the choice uses: the prior until the first coding."""
        recent = self.recent_code_seconds_per_byte
        return min(recent) if recent else PRIOR_CODE_SECONDS_PER_BYTE

    def measurements(self) -> Measurements:
        return Measurements(self.push_rate, self.saving, self.code_seconds_per_byte)

    def next_wire_dtype(self) -> tuple[str, bool]:
        """The next vector's wire dtype (``float32-delta``: coded, or ``float32``), and whether the choice
        changed with it (for the caller's log; a probe codes one vector and leaves the choice plain)."""
        was = self.coding
        decision = decide(self.measurements(), self.coding, self.plain_since_coded)
        self.coding = decision == "code"
        self.plain_since_coded = 0 if decision != "plain" else self.plain_since_coded + 1
        wire_dtype = "float32" if decision == "plain" else CODED
        return wire_dtype, self.coding != was

    def count_sent(self, wire_dtype: str) -> None:
        """One vector sent (a push the neighbour answered), in the encoding ``wire_dtype``."""
        self.vectors[wire_dtype] = self.vectors.get(wire_dtype, 0) + 1

    def describe(self) -> dict[str, float | None]:
        """The measurements in an operator's units (for logs)."""
        rate = self.push_rate
        return {
            "push_rate_mbit_s": None if rate is None else round(rate * 8e-6, 1),
            "saving": round(self.saving, 3),
            "coding_ms_per_mb": round(self.code_seconds_per_byte * 1e9, 2),
        }

    def observe_push(self, wire_bytes: int, seconds: float) -> None:
        """A push that delivered ``wire_bytes`` in ``seconds`` of wall time (call start to ack)."""
        if wire_bytes <= 0 or seconds <= 0:
            return
        self.recent_seconds_per_byte.append(seconds / wire_bytes)

    def observe_coding(self, float32_bytes: int, wire_bytes: int, seconds: float) -> None:
        """A vector of ``float32_bytes`` coded to ``wire_bytes`` (equal: the coding did not pay and the
        vector went plain) in ``seconds`` of wall time."""
        if float32_bytes <= 0:
            return
        saving = max(0.0, 1.0 - wire_bytes / float32_bytes)
        self.saving = _smooth(self.saving, saving)
        if seconds > 0:
            self.recent_code_seconds_per_byte.append(seconds / float32_bytes)


def _smooth(previous: float, new: float) -> float:
    return (1.0 - SMOOTHING) * previous + SMOOTHING * new
