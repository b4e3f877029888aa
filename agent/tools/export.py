"""``dpgan-agent export``: a checkpoint's generator as files plain PyTorch loads without this package.

Writes into ``--out``:

* ``generator.pt``: TorchScript (``torch.jit.script`` of a plain ``nn.Sequential``); load with
  ``torch.jit.load("generator.pt")``. ``generator.json`` is embedded as an extra file too. (PyTorch 2.13
  marks ``torch.jit`` deprecated: a warning, the file still loads.)
* ``generator.safetensors``: float32 weights of that ``nn.Sequential`` (names ``"<layer index>.weight"``
  ...), with the MLP's per-layer scale factors folded in: a ``ScaledLinear`` computing
  ``F.linear(x, c·W, c·b)`` becomes an ``nn.Linear`` holding ``c·W`` and ``c·b``. (The checkpoint stores
  W and b, so loading it into plain ``nn.Linear`` layers would give wrong samples, e.g. a ring of radius
  ~3 instead of 1.)
* ``generator.json``: the architecture as a layer list (``{"type": <torch.nn class>, "args": {...}}``,
  in forward order), ``latent_dim``, the latent distribution, ``sample_shape``, the output's range and
  meaning, the data set (with the mixture's modes), the source checkpoint and the Python lines that
  rebuild the generator (``load``);
* ``LOAD.md``: those lines, for people.

Both exported generators map latents z (B, latent_dim), z ~ N(0, I), to samples (B, *sample_shape), and
the export is refused unless both reproduce the project's generator on 64 latents (atol 1e-5; the
folding multiplies exactly what the project's forward multiplies, so they agree bit for bit in
practice). DCGAN generators normalise with BatchNorm over the batch they are given (no running
statistics, as in training), so a sample depends on the rest of its batch: draw batches, not single
latents.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from agent.files import dumps_json, write_atomic
from agent.models.dcgan import DCGANGenerator
from agent.models.mlp import MLPGenerator, ScaledLinear
from agent.tools.loading import LoadedModel, ToolError

EXPORT_FORMAT = "dpgan-generator-1"
TORCHSCRIPT_NAME = "generator.pt"
WEIGHTS_NAME = "generator.safetensors"
DESCRIPTION_NAME = "generator.json"
LOAD_NAME = "LOAD.md"
CHECK_LATENTS = 64
CHECK_SEED = 0
CHECK_TOLERANCE = 1e-5

# Constructor arguments recorded for each plain layer type (read back from the module's attributes).
_ARGUMENTS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv2d: (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ),
    nn.ConvTranspose2d: (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "output_padding",
        "dilation",
        "groups",
    ),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.Unflatten: ("dim", "unflattened_size"),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.LeakyReLU: ("negative_slope",),
    nn.ReLU: (),
    nn.Tanh: (),
    nn.Sigmoid: (),
}
_HAS_BIAS_ARGUMENT = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)

LOAD_LINES = (
    "import json, torch",
    "from safetensors.torch import load_file",
    "",
    'spec = json.load(open("generator.json"))',
    'layers = [getattr(torch.nn, layer["type"])(**layer["args"]) for layer in spec["layers"]]',
    "generator = torch.nn.Sequential(*layers).eval()",
    'generator.load_state_dict(load_file("generator.safetensors"))',
    "with torch.no_grad():",
    '    samples = generator(torch.randn(64, spec["latent_dim"]))  # (64, *spec["sample_shape"])',
    '# or, TorchScript, no json/safetensors needed: generator = torch.jit.load("generator.pt")',
)


@contextmanager
def _torchscript_allowed() -> Iterator[None]:
    """Recent PyTorch marks torch.jit deprecated (it still scripts, saves and loads): keep the notice out
    of the command's output; the safetensors + JSON export is the route that needs no TorchScript."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
        )
        yield


def _forward_modules(generator: nn.Module) -> list[nn.Module]:
    """The generator's layers in forward order (its forward only checks shapes and chains them)."""
    if isinstance(generator, MLPGenerator):
        return list(generator.net)
    if isinstance(generator, DCGANGenerator):
        return [generator.project, *generator.body]
    raise ToolError(f"export: no plain description of a {type(generator).__name__} generator")


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    return value


def plain_layer(module: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One project layer → (``{"type", "args"}`` that ``getattr(torch.nn, type)(**args)`` rebuilds, its
    state dict with any scale factor folded in)."""
    if isinstance(module, ScaledLinear):
        description = {
            "type": "Linear",
            "args": {"in_features": module.in_features, "out_features": module.out_features, "bias": True},
        }
        # The same float32 products ScaledLinear.forward computes on every call.
        state = {
            "weight": (module.weight * module.scale).detach().clone(),
            "bias": (module.bias * module.scale).detach().clone(),
        }
        return description, state
    kind = type(module)
    if kind not in _ARGUMENTS:
        raise ToolError(f"export: no plain equivalent for layer {kind.__name__}")
    args = {name: _json_value(getattr(module, name)) for name in _ARGUMENTS[kind]}
    if isinstance(module, _HAS_BIAS_ARGUMENT):
        args["bias"] = module.bias is not None
    state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    return {"type": kind.__name__, "args": args}, state


def build_plain(layers: list[dict[str, Any]]) -> nn.Sequential:
    """The ``nn.Sequential`` a layer list describes: the same expression LOAD.md shows."""
    return nn.Sequential(*[getattr(nn, layer["type"])(**layer["args"]) for layer in layers]).eval()


def describe(model: LoadedModel, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of generator.json."""
    spec, config = model.spec, model.config
    if spec.kind == "points":
        output = {
            "kind": "points",
            "meaning": "points in the data's own coordinates (no normalisation)",
            "value_range": None,
        }
    else:
        output = {
            "kind": "images",
            "meaning": "images (B, C, H, W), channels first, float32 in [-1, 1] (tanh); "
            "pixel byte = round((x + 1) * 127.5)",
            "value_range": [-1.0, 1.0],
        }
    description: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "family": config.model,
        "dataset": config.dataset,
        "latent_dim": model.latent_dim,
        "latent": "z ~ N(0, I), float32, shape (B, latent_dim)",
        "sample_shape": list(model.sample_shape),
        "output": output,
        "batch_statistics": any(layer["type"].startswith("BatchNorm") for layer in layers),
        "layers": layers,
        "files": {"torchscript": TORCHSCRIPT_NAME, "weights": WEIGHTS_NAME},
        "source": {
            "checkpoint": model.path.name,
            "iteration": model.checkpoint.iteration,
            "step": model.checkpoint.step,
            "algorithm": model.checkpoint.algorithm,
            "run_id": model.checkpoint.run_id,
            "schema_hash": model.checkpoint.schema_hash,
            "config": config.cluster_dict(),
        },
        "load": list(LOAD_LINES),
    }
    if description["batch_statistics"]:
        description["note"] = (
            "BatchNorm normalises with the statistics of the batch it is given (no running statistics, "
            "as in training): a sample depends on its batch, so draw batches (e.g. 64), not single latents"
        )
    if spec.modes is not None:
        description["dataset_modes"] = spec.modes.tolist()
        description["dataset_mode_std"] = spec.mode_std
    return description


def _load_markdown(description: dict[str, Any]) -> str:
    shape = ", ".join(str(size) for size in description["sample_shape"])
    lines = [
        f"# Generator exported from {description['source']['checkpoint']} "
        f"(dataset {description['dataset']}, iteration {description['source']['iteration']})",
        "",
        f"Input: latents z ~ N(0, I), shape (B, {description['latent_dim']}). "
        f"Output: shape (B, {shape}); {description['output']['meaning']}.",
        "Plain PyTorch and the `safetensors` package; this project is not needed:",
        "",
        "```python",
        *LOAD_LINES,
        "```",
    ]
    if "note" in description:
        lines += ["", description["note"] + "."]
    lines += [
        "",
        "Recent PyTorch releases mark `torch.jit` deprecated (a warning; generator.pt still loads); the "
        "safetensors + JSON route above needs only `torch.nn` layers.",
    ]
    return "\n".join(lines) + "\n"


def _difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected - actual).abs().max())


def export_generator(model: LoadedModel, out: Path) -> list[Path]:
    """Write generator.pt, generator.safetensors, generator.json and LOAD.md into ``out`` (created);
    refuse (ToolError) when either export does not reproduce the project's generator."""
    if out.exists() and not out.is_dir():
        raise ToolError(f"--out {out}: exists and is not a folder")
    generator = model.generator_module()
    described = [plain_layer(module) for module in _forward_modules(generator)]
    layers = [layer for layer, _ in described]
    weights = {
        f"{index}.{name}": tensor
        for index, (_, state) in enumerate(described)
        for name, tensor in state.items()
    }
    plain = build_plain(layers)
    plain.load_state_dict(weights)
    description = describe(model, layers)
    description_text = dumps_json(description, indent=2) + "\n"
    script = io.BytesIO()
    with _torchscript_allowed():
        torch.jit.save(torch.jit.script(plain), script, _extra_files={DESCRIPTION_NAME: description_text})

    latents = torch.randn(
        CHECK_LATENTS, model.latent_dim, generator=torch.Generator().manual_seed(CHECK_SEED)
    )
    with _torchscript_allowed():
        reloaded = torch.jit.load(io.BytesIO(script.getvalue()), map_location="cpu")
    with torch.no_grad():
        expected = generator(latents)
        for name, candidate in (("safetensors + json", plain), ("TorchScript", reloaded)):
            produced = candidate(latents)
            if produced.shape != expected.shape or not torch.allclose(
                produced, expected, atol=CHECK_TOLERANCE, rtol=CHECK_TOLERANCE
            ):
                raise ToolError(
                    f"export: the {name} generator does not reproduce the trained one "
                    f"(max difference {_difference(expected, produced):.3g})"
                )

    out.mkdir(parents=True, exist_ok=True)
    contiguous = {name: tensor.contiguous() for name, tensor in weights.items()}
    write_atomic(out / WEIGHTS_NAME, save_safetensors(contiguous, metadata={"format": EXPORT_FORMAT}))
    write_atomic(out / DESCRIPTION_NAME, description_text.encode())
    write_atomic(out / LOAD_NAME, _load_markdown(description).encode())
    write_atomic(out / TORCHSCRIPT_NAME, script.getvalue())
    return [out / name for name in (TORCHSCRIPT_NAME, WEIGHTS_NAME, DESCRIPTION_NAME, LOAD_NAME)]


__all__ = [
    "DESCRIPTION_NAME",
    "EXPORT_FORMAT",
    "LOAD_LINES",
    "LOAD_NAME",
    "TORCHSCRIPT_NAME",
    "WEIGHTS_NAME",
    "build_plain",
    "describe",
    "export_generator",
    "plain_layer",
]
