"""Training configuration: one dataclass, validated in one place, with per-dataset defaults.

Keys split in two groups. *Cluster keys* define the computation and must be equal on every node (their
hash is compared at the handshake, and the simulator and the agents are equivalent only when they
agree). *Node keys* (output folder, device, logging) may differ per node.

One cluster key is *simulator-only*: ``nodes``, the number of virtual nodes of ``dpgan-agent simulate``
(and of ``--local``). Agents count the members they train with from membership, so ``nodes`` is not
compared between agents: it is left out of ``cluster_dict()`` and ``config_hash()`` (the handshake, the
default run id) and of what a checkpoint's configuration is compared on (``compared_keys()``).

This module imports neither torch nor numpy, so ``dpgan-agent --help`` starts at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.core.names import ALGORITHMS, TOPOLOGY_NAMES

DATASETS = ("ring8", "grid25", "digits", "mnist", "cifar10", "folder")
SPLITS = ("iid", "shards", "label_skew")
LOSSES = ("nonsaturating", "wgan_gp", "hinge")
MODEL_FAMILIES = ("mlp", "dcgan")
WEIGHTINGS = ("metropolis", "uniform")
WIRE_DTYPES = ("float32", "bfloat16", "float16", "float32-huffman", "float32-delta", "float32-auto")
# Wire dtypes that carry float32's bits exactly (the run is float32's; only the bytes differ).
FLOAT32_WIRES = ("float32", "float32-huffman", "float32-delta", "float32-auto")
# The wire_dtype values compressed gossip runs with (its resets are plain float32; its codes its own).
COMPRESSED_GOSSIP_WIRES = ("float32", "float32-auto")
COMPRESSIONS = ("none", "int8", "topk", "randk")
# Keys that only mean something with compressed gossip: left out of cluster_dict() (so of config_hash and
# the default run id) while compression is none, so configurations written before they existed keep their
# hash, and resume across the upgrade. ``overlap`` likewise while false.
COMPRESSION_KEYS = ("compression", "compression_ratio", "consensus_step")
DEVICES = ("auto", "cpu", "cuda", "mps")


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; the message names the key."""


def _cluster(default: Any, help: str, *, simulator: bool = False) -> Any:
    return field(default=default, metadata={"cluster": True, "simulator": simulator, "help": help})


def _node(default: Any, help: str) -> Any:
    return field(default=default, metadata={"cluster": False, "simulator": False, "help": help})


@dataclass(frozen=True)
class TrainConfig:
    # what is learned
    dataset: str = _cluster("ring8", f"data set: {', '.join(DATASETS)}")
    image_size: int | None = _cluster(None, "image side for 'folder' (default 32) or to resize digits")
    split: str = _cluster("iid", f"how data is divided between nodes: {', '.join(SPLITS)}")
    classes_per_node: int = _cluster(2, "classes (or mixture modes) per node with split=label_skew")
    model: str | None = _cluster(
        None, "model family: mlp or dcgan (default: mlp for points, dcgan for images)"
    )
    width: int | None = _cluster(None, "model width (hidden units or base channels); default per dataset")
    latent_dim: int | None = _cluster(None, "generator input dimension; default per dataset")
    loss: str = _cluster("nonsaturating", f"GAN loss: {', '.join(LOSSES)}")
    gp_weight: float = _cluster(10.0, "gradient-penalty weight for loss=wgan_gp")
    # how it is learned
    algorithm: str = _cluster("dposg", f"update rule: {', '.join(ALGORITHMS)}")
    lr: float | None = _cluster(None, "step size η; default per dataset and algorithm")
    beta1: float = _cluster(0.5, "dpoadam first-moment decay")
    beta2: float = _cluster(0.9, "dpoadam second-moment decay")
    eps: float = _cluster(1e-8, "dpoadam denominator guard")
    batch_size: int | None = _cluster(None, "minibatch per node per iteration; default per dataset")
    iterations: int | None = _cluster(None, "training iterations; default per dataset")
    seed: int = _cluster(0, "shared seed: x0 and every node's data stream derive from it")
    # who talks to whom
    nodes: int = _cluster(
        4,
        "number of nodes of the simulator and of --local clusters; agents count the members they train "
        "with, so it is not compared between agents",
        simulator=True,
    )
    topology: str = _cluster("ring", f"communication graph: {', '.join(TOPOLOGY_NAMES)}")
    degree: int | None = _cluster(None, "degree for topology=random_regular")
    weights: str = _cluster("metropolis", f"mixing weights: {', '.join(WEIGHTINGS)}")
    rounds: int = _cluster(1, "gossip rounds t per iteration")
    wire_dtype: str = _cluster(
        "float32-auto",
        f"dtype on the wire: {', '.join(WIRE_DTYPES)}; float32-huffman: float32's bits with the exponent "
        "bytes Huffman-coded; float32-delta: float32's bits coded against the last vector sent on the same "
        "edge (exponent-coded when the receiver holds none); float32-auto: float32's bits, coded like "
        "float32-delta per vector when the measured link is slow enough for the coding to pay",
    )
    compression: str = _cluster(
        "none",
        f"compressed gossip with error feedback (CHOCO): {', '.join(COMPRESSIONS)}; none = exact DPOSG",
    )
    compression_ratio: float | None = _cluster(
        None, "fraction of entries topk/randk send per round, in (0, 1]; default 0.01"
    )
    consensus_step: float | None = _cluster(
        None,
        "CHOCO consensus step size γ in (0, 1]; default per compression: int8 1.0, topk 0.04, randk 0.01",
    )
    overlap: bool = _cluster(
        False,
        "take each iteration's gradient at the node's own x while its gossip rounds run (overlap "
        "communication with computation; changes the math: docs/compression.md); default: exact DPOSG",
    )
    # per node
    run_id: str | None = _node(
        None,
        "the run this node trains in: agents of another run are never candidates (mDNS) and are refused "
        "at the handshake; default 'cfg-' + the first 12 hex digits of the cluster configuration's hash",
    )
    tls_cert: str | None = _node(None, "agents: this node's certificate (PEM); its CN is the node id")
    tls_key: str | None = _node(None, "agents: the private key of tls_cert (PEM)")
    tls_ca: str | None = _node(None, "agents: the cluster CA certificate (PEM) peers must chain to")
    allow_node_ids: str | None = _node(
        None, "agents: comma-separated node ids admitted over TLS (default: every certificate of the CA)"
    )
    data_path: str | None = _node(None, "folder holding mnist/cifar10/folder data")
    eval_every: int | None = _node(None, "evaluate every this many iterations; default per dataset")
    eval_samples: int = _node(2500, "samples drawn per evaluation (2500 for the 2-D benchmarks)")
    device: str = _node("auto", f"training device: {', '.join(DEVICES)}")
    threads: int = _node(1, "torch CPU threads per node")
    vectorize: bool = _node(
        False,
        "simulator only: all nodes' gradients in one vmapped call, mixing as one matrix product (faster "
        "at large n; same random numbers, equal to the per-node path up to float rounding); agents ignore it",
    )

    def cluster_dict(self, *, include_simulator: bool = False) -> dict[str, Any]:
        """The cluster keys agents must agree on (``compared_keys()``); ``include_simulator`` adds the
        simulator-only ones (``nodes``)."""
        names = cluster_keys() if include_simulator else compared_keys()
        if self.compression == "none":
            names = tuple(name for name in names if name not in COMPRESSION_KEYS)
        if not self.overlap:
            names = tuple(name for name in names if name != "overlap")
        return {name: comparable_value(name, getattr(self, name)) for name in names}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        canonical = json.dumps(self.cluster_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def effective_run_id(self) -> str:
        """`run_id`, or the default derived from the cluster keys: agents started with identical
        configurations on one network meet; any other difference keeps them apart."""
        return self.run_id or default_run_id(self.config_hash())


def cluster_keys() -> tuple[str, ...]:
    """Every cluster key, simulator-only ones included."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cluster"])


def compared_keys() -> tuple[str, ...]:
    """The cluster keys compared between agents (handshake, ``config_hash``, default run id) and between a
    checkpoint's configuration and the current one: every cluster key but the simulator-only ones."""
    fields = dataclasses.fields(TrainConfig)
    return tuple(f.name for f in fields if f.metadata["cluster"] and not f.metadata["simulator"])


def comparable_value(key: str, value: Any) -> Any:
    """A cluster key's value as agents compare it (handshake, ``config_hash``, a checkpoint's
    configuration). The float32 wires (float32, float32-huffman, float32-delta, float32-auto) carry the
    same bits and their receivers take every encoding of them, so they compare equal, as ``float32``:
    nodes configured with any of them train together, and hashes and checkpoints from before
    float32-auto (the default since) keep their run ids and resume."""
    if key == "wire_dtype" and value in FLOAT32_WIRES:
        return "float32"
    return value


def default_run_id(config_hash: str) -> str:
    return f"cfg-{config_hash[:12]}"


# A run id travels in mDNS TXT records and names folders: short, and safe in both.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


# Defaults per dataset, filled in for keys left at None. Tuned on CPU; see docs/quality.md.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "ring8": {
        "model": "mlp",
        "width": 128,
        "latent_dim": 2,
        "batch_size": 128,
        "iterations": 8000,
        "eval_every": 1000,
    },
    "grid25": {
        "model": "mlp",
        "width": 128,
        "latent_dim": 2,
        "batch_size": 128,
        "iterations": 4000,
        "eval_every": 1000,
    },
    "digits": {
        "model": "dcgan",
        "width": 32,
        "latent_dim": 32,
        "batch_size": 64,
        "iterations": 3000,
        "eval_every": 500,
    },
    "mnist": {
        "model": "dcgan",
        "width": 32,
        "latent_dim": 64,
        "batch_size": 64,
        "iterations": 5000,
        "eval_every": 1000,
    },
    "cifar10": {
        "model": "dcgan",
        "width": 64,
        "latent_dim": 128,
        "batch_size": 64,
        "iterations": 10000,
        "eval_every": 2000,
    },
    "folder": {
        "model": "dcgan",
        "width": 64,
        "latent_dim": 128,
        "batch_size": 64,
        "iterations": 10000,
        "eval_every": 2000,
    },
}
LR_DEFAULTS: dict[str, float] = {"dposg": 0.02, "cposg": 0.02, "sgda": 0.02, "dpoadam": 2e-4}
# Where one dataset needs another step size for one algorithm (docs/quality.md): the MLP's scaled
# layers multiply Adam's steps by c rather than c², so dpoadam wants a larger lr on the 2-D mixtures.
LR_OVERRIDES: dict[tuple[str, str], float] = {("ring8", "dpoadam"): 5e-4, ("grid25", "dpoadam"): 5e-4}


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def _check_positive(key: str, value: float | int | None, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check the type of one value from a file or the command line; ints are accepted for floats."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if base == "bool":
        # Strictly true/false: YAML already parses those, and 0/1 or "yes" would hide typos.
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    raise AssertionError(f"unhandled annotation {annotation} for {key}")


def unknown_key_message(key: str, source: str | None = None) -> str:
    """Why ``key`` is refused, with the closest valid key when one is close (a typo), else all keys."""
    where = f" in {source}" if source else ""
    names = field_names()
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        # Flags are spelled with dashes: --batch-size for batch_size.
        close = difflib.get_close_matches(key.replace("-", "_").lower(), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(names)}"
    return f"unknown configuration key {key!r}{where}; {hint}"


def check_keys(keys: Iterable[str], source: str | None = None) -> None:
    """Refuse unknown keys, naming the first (and ``source``, e.g. the config file) with a suggestion."""
    known = set(field_names())
    unknown = sorted(key for key in keys if key not in known)
    if not unknown:
        return
    message = unknown_key_message(unknown[0], source)
    if len(unknown) > 1:
        message += f" (also unknown: {', '.join(repr(key) for key in unknown[1:])})"
    raise ConfigError(message)


def coerce_value(key: str, value: Any) -> Any:
    """Type-check one value of a known key (from a file or the command line); ints are accepted for floats."""
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return _coerce(key, value, str(known[key].type))


def build_config(values: dict[str, Any]) -> TrainConfig:
    """A validated config from loose key/value pairs (YAML, CLI), per-dataset defaults filled in."""
    check_keys(values)
    typed = {key: coerce_value(key, value) for key, value in values.items()}
    dataset = typed.get("dataset", TrainConfig.dataset)
    _check_choice("dataset", dataset, DATASETS)
    algorithm = typed.get("algorithm", TrainConfig.algorithm)
    _check_choice("algorithm", algorithm, ALGORITHMS)
    for key, default in DATASET_DEFAULTS[dataset].items():
        if typed.get(key) is None:
            typed[key] = default
    if typed.get("lr") is None:
        typed["lr"] = LR_OVERRIDES.get((dataset, algorithm), LR_DEFAULTS[algorithm])
    config = TrainConfig(**typed)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    _check_choice("split", config.split, SPLITS)
    _check_choice("loss", config.loss, LOSSES)
    _check_choice("model", config.model, MODEL_FAMILIES)
    _check_choice("weights", config.weights, WEIGHTINGS)
    _check_choice("topology", config.topology, TOPOLOGY_NAMES)
    _check_choice("wire_dtype", config.wire_dtype, WIRE_DTYPES)
    _check_choice("compression", config.compression, COMPRESSIONS)
    ratio = config.compression_ratio
    if ratio is not None and not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise ConfigError(f"compression_ratio: must be in (0, 1], got {ratio!r}")
    if ratio is not None and config.compression not in ("topk", "randk"):
        raise ConfigError(
            f"compression_ratio: applies only to compression topk or randk, not {config.compression!r}"
        )
    if config.consensus_step is not None and config.compression == "none":
        raise ConfigError("consensus_step: applies only with compression int8, topk or randk, not none")
    if config.consensus_step is not None and not 0.0 < config.consensus_step <= 1.0:
        raise ConfigError(f"consensus_step: must be in (0, 1], got {config.consensus_step!r}")
    if config.compression != "none" and config.wire_dtype not in COMPRESSED_GOSSIP_WIRES:
        raise ConfigError(
            f"wire_dtype: compression {config.compression!r} sends its own codes (and float32 resets); "
            f"leave wire_dtype at float32-auto (the default) or float32, not {config.wire_dtype!r}"
        )
    if config.overlap and config.algorithm == "cposg":
        raise ConfigError(
            "overlap: algorithm cposg averages gradients and does not gossip; leave overlap false"
        )
    if config.compression != "none" and config.algorithm == "cposg":
        raise ConfigError(
            "compression: algorithm cposg averages gradients and does not gossip; use compression none"
        )
    _check_choice("device", config.device, DEVICES)
    for key in ("lr", "gp_weight", "eps", "width", "latent_dim", "batch_size", "nodes", "rounds", "threads"):
        _check_positive(key, getattr(config, key))
    for key in ("classes_per_node", "eval_samples", "eval_every", "image_size", "degree"):
        _check_positive(key, getattr(config, key))
    if config.iterations is None or config.iterations < 0:
        raise ConfigError(f"iterations: must be a non-negative integer, got {config.iterations!r}")
    for key in ("beta1", "beta2"):
        value = getattr(config, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: must be in [0, 1), got {value!r}")
    if config.dataset in ("mnist", "cifar10", "folder") and not config.data_path:
        raise ConfigError(
            f"data_path: dataset {config.dataset!r} reads files you already have; give their folder"
        )
    if config.run_id is not None and not RUN_ID_PATTERN.match(config.run_id):
        raise ConfigError(
            f"run_id: {config.run_id!r} must be 1-63 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if config.topology == "random_regular" and config.degree is None:
        raise ConfigError("degree: topology random_regular needs a degree")
    if config.topology != "random_regular" and config.degree is not None:
        raise ConfigError(f"degree: applies only to topology random_regular, not to {config.topology!r}")


def check_topology(config: TrainConfig, nodes: int) -> None:
    """Refuse a topology that cannot be built for ``nodes`` nodes (random_regular: n·degree odd, degree
    too large for n, ...) as a configuration error naming the keys. The simulator checks its ``nodes``
    before it starts; agents build the graph of each membership view as it forms."""
    from agent.core.topology import TopologyError, make_schedule  # numpy: only when a run starts

    try:
        make_schedule(config.topology, nodes, weights=config.weights, degree=config.degree, seed=config.seed)
    except TopologyError as error:
        raise ConfigError(
            f"topology: {config.topology!r} with degree={config.degree} cannot be built for {nodes} "
            f"nodes: {error}"
        ) from error
