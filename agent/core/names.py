"""The names configuration chooses from, in a module without torch or numpy.

``agent.core.config`` (and through it ``dpgan-agent --help``) needs these names but none of the math, so
they live here; ``agent.core.algorithms`` and ``agent.core.topology`` re-export them.
"""

from __future__ import annotations

from typing import Literal

AlgorithmName = Literal["dposg", "cposg", "sgda", "dpoadam"]
ALGORITHMS: tuple[AlgorithmName, ...] = ("dposg", "cposg", "sgda", "dpoadam")

TOPOLOGY_NAMES: tuple[str, ...] = (
    "ring",
    "torus",
    "complete",
    "exponential",
    "one_peer_exponential",
    "random_regular",
)
WEIGHT_NAMES: tuple[str, ...] = ("metropolis", "uniform")
