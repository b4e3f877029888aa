"""``dpgan-agent generate | export | evaluate``: argument parsing and error reporting for the tools.

Each ``*_main(argv)`` returns the exit status: 0 on success; 2 with one line
``dpgan-agent <command>: error: <why>`` on stderr (no traceback) for a bad argument, a missing,
unreadable or damaged checkpoint (the message names the file), an unknown ``--out`` suffix or data
that cannot be loaded. Torch and the models are imported only after the arguments parsed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

DEVICES = ("auto", "cpu", "cuda", "mps")
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
SEED_HELP = (
    "latent seed: z = torch.randn(N, latent_dim, generator=torch.Generator().manual_seed(SEED)); "
    "default: the agents' evaluation latents (those behind their metrics and samples-final.png)"
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line (and exit status 2) in ``_run``."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text!r}")
    return value


def _parser(command: str, description: str) -> _Parser:
    parser = _Parser(prog=f"dpgan-agent {command}", description=description)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint (final.safetensors, checkpoint.safetensors, checkpoint-<k>.safetensors) or an "
        "agent's folder (its final.safetensors, else its newest checkpoint); the model is rebuilt from "
        "the configuration stored in it",
    )
    return parser


def _generate_parser() -> _Parser:
    parser = _parser("generate", "Draw samples from the generator stored in a checkpoint.")
    parser.add_argument("--num", type=_positive, required=True, help="number of samples N")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help=".png (scatter plot for 2-D points, grid for images), .npy (float32 (N, *sample_shape)), "
        ".safetensors (tensors 'samples' and 'latents'), or a folder (one PNG per image; samples.npy for "
        "points)",
    )
    parser.add_argument("--seed", type=_seed, default=None, help=SEED_HELP)
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where to run the generator")
    return parser


def _export_parser() -> _Parser:
    parser = _parser(
        "export",
        "Write the checkpoint's generator for plain PyTorch: generator.pt (TorchScript), "
        "generator.safetensors + generator.json (scales folded in) and LOAD.md.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    return parser


def _evaluate_parser() -> _Parser:
    parser = _parser("evaluate", "Print the quality metrics the agents report for a checkpoint's generator.")
    parser.add_argument(
        "--samples",
        type=_positive,
        default=None,
        help="samples to evaluate (default: the eval_samples it trained with)",
    )
    parser.add_argument("--seed", type=_seed, default=None, help=SEED_HELP)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of one line")
    parser.add_argument(
        "--data-path",
        default=None,
        help="where the mnist/cifar10/folder data is, if not where it was trained",
    )
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="where to run the generator")
    return parser


def _run(
    command: str, parser: _Parser, argv: Sequence[str], action: Callable[[argparse.Namespace], int]
) -> int:
    try:
        args = parser.parse_args(list(argv))
        return action(args)
    except _UsageError as error:
        message = str(error)
    except (ValueError, OSError) as error:  # CheckpointError, DatasetError, ConfigError, ToolError, ...
        message = str(error)
    print(f"dpgan-agent {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _generate(args: argparse.Namespace) -> int:
    from agent.tools.generate import output_kind, write_samples
    from agent.tools.loading import load_model

    output_kind(args.out)  # an unknown suffix is refused before the model loads
    model = load_model(args.checkpoint, args.device)
    written = write_samples(model, args.num, args.out, args.seed)
    where = str(args.out) if len(written) > 1 else str(written[0])
    latents = "evaluation latents" if args.seed is None else f"seed {args.seed}"
    print(
        f"wrote {args.num} {model.config.dataset} samples of {model.path} "
        f"(iteration {model.checkpoint.iteration}, {latents}) to {where}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from agent.tools.export import export_generator
    from agent.tools.loading import load_model

    model = load_model(args.checkpoint, "cpu")
    written = export_generator(model, args.out)
    print(f"exported the generator of {model.path} to {', '.join(str(path) for path in written)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from agent.files import dumps_json
    from agent.tools.evaluate import describe_result, evaluate_model
    from agent.tools.loading import load_model

    model = load_model(args.checkpoint, args.device, with_dataset=True, data_path=args.data_path)
    result = evaluate_model(model, args.samples, args.seed)
    print(dumps_json(result, indent=2) if args.json else describe_result(result))
    return 0


def generate_main(argv: Sequence[str]) -> int:
    return _run("generate", _generate_parser(), argv, _generate)


def export_main(argv: Sequence[str]) -> int:
    return _run("export", _export_parser(), argv, _export)


def evaluate_main(argv: Sequence[str]) -> int:
    return _run("evaluate", _evaluate_parser(), argv, _evaluate)


__all__ = ["evaluate_main", "export_main", "generate_main"]
