"""The tensor schema: how the two players' parameters are laid out in one flat vector.

Peers compare ``schema_hash`` before any tensor moves (a mismatched peer is refused up front), and
checkpoints store the same names, so a flat vector can always be turned back into state dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

PLAYERS = ("generator", "discriminator")


class SchemaError(ValueError):
    """Tensors do not match the expected names, shapes or dtypes."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class ParameterLayout:
    """Ordered tensors of both players; ``generator.*`` entries first, then ``discriminator.*``."""

    tensors: tuple[TensorSpec, ...]
    generator_numel: int

    @classmethod
    def from_state_dicts(
        cls, generator: Mapping[str, torch.Tensor], discriminator: Mapping[str, torch.Tensor]
    ) -> ParameterLayout:
        specs: list[TensorSpec] = []
        offset = 0
        generator_numel = 0
        for player, state in zip(PLAYERS, (generator, discriminator), strict=True):
            for name, tensor in state.items():
                if not tensor.is_floating_point():
                    raise SchemaError(
                        f"{player}.{name} has dtype {tensor.dtype}; only floating tensors can be averaged"
                    )
                spec = TensorSpec(
                    f"{player}.{name}", tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), offset
                )
                specs.append(spec)
                offset += spec.numel
            if player == "generator":
                generator_numel = offset
        return cls(tuple(specs), generator_numel)

    @property
    def numel(self) -> int:
        return sum(spec.numel for spec in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.tensors)

    def describe(self) -> list[dict[str, object]]:
        return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.tensors]

    def schema_hash(self) -> str:
        """SHA-256 of the names, shapes and dtypes in order (offsets follow from them)."""
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def flatten(
        self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """One contiguous vector from named tensors (``generator.*``/``discriminator.*`` names)."""
        self.check_names(tensors)
        parts = []
        for spec in self.tensors:
            tensor = tensors[spec.name]
            if tuple(tensor.shape) != spec.shape:
                raise SchemaError(f"{spec.name} has shape {tuple(tensor.shape)}, expected {spec.shape}")
            parts.append(tensor.detach().reshape(-1).to(dtype))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` (no copies): writing to a view writes to the vector."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise SchemaError(f"flat vector has shape {tuple(flat.shape)}, expected ({self.numel},)")
        return {
            spec.name: flat[spec.offset : spec.offset + spec.numel].view(spec.shape) for spec in self.tensors
        }

    def check_names(self, tensors: Mapping[str, torch.Tensor]) -> None:
        expected, given = set(self.names), set(tensors)
        if expected != given:
            missing = sorted(expected - given)
            unexpected = sorted(given - expected)
            raise SchemaError(
                f"tensor names differ from the schema: missing {missing}, unexpected {unexpected}"
            )
