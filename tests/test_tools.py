"""``dpgan-agent generate | export | evaluate`` on checkpoints written by real simulator runs.

A 2-node ring8 run of 2000 iterations (about 12 s on 2 cores) gives a generator of non-trivial quality
(several modes, a fair fraction of high-quality samples) for the export check; a 3-iteration digits run
gives a DCGAN checkpoint for the image paths. The export check loads the exported files in a fresh
interpreter that cannot import this package and compares the metrics of its samples with the agents'.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import torch
from PIL import Image
from safetensors.torch import load_file

import agent
from agent.cli import main
from agent.tools.evaluate import evaluate_samples, make_evaluator
from agent.tools.export import LOAD_LINES
from agent.tools.loading import MAX_IMAGE_SAMPLES, load_model

RING_FLAGS = ["--dataset", "ring8", "--nodes", "2", "--iterations", "2000", "--eval-every", "2000"]
DIGITS_FLAGS = ["--dataset", "digits", "--nodes", "2", "--iterations", "3", "--eval-every", "3"]
DIGITS_EVAL_SAMPLES = 200


def _simulate(out: Path, flags: list[str]) -> dict[str, Any]:
    assert main(["simulate", *flags, "--out", str(out)]) == 0
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


@pytest.fixture(scope="module")
def ring8_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("ring8")
    return out, _simulate(out, RING_FLAGS)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("digits")
    return out, _simulate(out, [*DIGITS_FLAGS, "--eval-samples", str(DIGITS_EVAL_SAMPLES)])


def _best_node(summary: dict[str, Any]) -> int:
    qualities = summary["final"]["node_quality"]
    return max(range(len(qualities)), key=lambda i: qualities[i]["high_quality"])


def _generate(checkpoint: Path, out: Path, num: int, *extra: str) -> None:
    assert (
        main(["generate", "--checkpoint", str(checkpoint), "--num", str(num), "--out", str(out), *extra]) == 0
    )


# ---- generate ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_generate_points_in_every_format(ring8_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run, _ = ring8_run
    checkpoint = run / "node-0" / "final.safetensors"
    _generate(checkpoint, tmp_path / "s.npy", 300, "--seed", "7")
    _generate(checkpoint, tmp_path / "s.safetensors", 300, "--seed", "7")
    _generate(run / "node-0", tmp_path / "s.png", 300, "--seed", "7")  # a folder means its final.safetensors
    _generate(checkpoint, tmp_path / "points", 300, "--seed", "7")

    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (300, 2) and samples.dtype == np.float32
    stored = load_file(str(tmp_path / "s.safetensors"))
    assert torch.equal(stored["samples"], torch.from_numpy(samples))
    expected_latents = torch.randn(300, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(stored["latents"], expected_latents)
    assert np.array_equal(np.load(tmp_path / "points" / "samples.npy"), samples)
    with Image.open(tmp_path / "s.png") as image:
        assert image.size == (512, 512) and image.mode == "RGB"

    # Without --seed: the agents' evaluation latents, so the same samples and the same picture the
    # agents' Evaluator draws (samples-final.png of a node) for that parameter vector.
    model = load_model(checkpoint, with_dataset=True)
    evaluator = make_evaluator(model)  # Evaluator(dataset, config.eval_samples, config.seed), as the agents
    _generate(checkpoint, tmp_path / "eval.npy", model.config.eval_samples)
    _generate(checkpoint, tmp_path / "eval.png", model.config.eval_samples)
    assert torch.equal(
        torch.from_numpy(np.load(tmp_path / "eval.npy")), evaluator.generate(model.problem, model.x)
    )
    evaluator.save_samples(model.problem, model.x, tmp_path / "agents.png")
    assert (tmp_path / "eval.png").read_bytes() == (tmp_path / "agents.png").read_bytes()


@pytest.mark.timeout(240)
def test_same_seed_same_bytes_other_seed_other_samples(
    ring8_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    checkpoint = ring8_run[0] / "node-1" / "final.safetensors"
    for name in ("a", "b"):
        for suffix in (".png", ".npy", ".safetensors"):
            _generate(checkpoint, tmp_path / f"{name}{suffix}", 500, "--seed", "123")
    for suffix in (".png", ".npy", ".safetensors"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes(), suffix
    _generate(checkpoint, tmp_path / "c.npy", 500, "--seed", "124")
    assert not np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))


@pytest.mark.timeout(120)
def test_generate_images_grid_folder_and_arrays(
    digits_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    checkpoint = digits_run[0] / "node-0" / "final.safetensors"
    _generate(checkpoint, tmp_path / "grid.png", 64, "--seed", "3")
    _generate(checkpoint, tmp_path / "s.npy", 10, "--seed", "3")
    _generate(checkpoint, tmp_path / "one-per-image", 10, "--seed", "3")
    _generate(checkpoint, tmp_path / "again", 10, "--seed", "3")

    with Image.open(tmp_path / "grid.png") as grid:  # 8 columns × 8 rows of 8×8 tiles, 1 px gaps, 4× scale
        assert grid.size == ((8 * 9 + 1) * 4, (8 * 9 + 1) * 4) and grid.mode == "L"
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (10, 1, 8, 8) and samples.dtype == np.float32
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    files = sorted((tmp_path / "one-per-image").iterdir())
    assert [f.name for f in files] == [f"sample-{i:05d}.png" for i in range(10)]
    for index, file in enumerate(files):
        with Image.open(file) as image:
            assert image.size == (8, 8) and image.mode == "L"
            expected = np.round((samples[index, 0].astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
            assert np.abs(np.asarray(image).astype(int) - expected.astype(int)).max() <= 1
        assert file.read_bytes() == (tmp_path / "again" / file.name).read_bytes()


# ---- export -----------------------------------------------------------------------------------------------

# Runs in a fresh interpreter (-I -S: no site, no .pth files, so not even the editable install's finder)
# that gets torch's, numpy's and safetensors' folders only. It loads generator.pt, then runs the load lines
# generator.json documents, on the latents the parent wrote.
CHILD = r"""
import importlib.util, json, sys
sys.path[:0] = json.loads(sys.argv[1])
if json.loads(sys.argv[2]):  # the package is installed beside torch (not editable): hide it
    sys.modules["agent"] = None
try:
    import agent
except ImportError:
    pass
else:
    raise SystemExit("the package is importable: " + agent.__file__)
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))  # the parent's: reductions then run in the same order
latents = torch.from_numpy(np.load("latents.npy"))
with torch.no_grad():
    np.save("torchscript.npy", torch.jit.load("generator.pt")(latents).numpy())
spec = json.load(open("generator.json"))
code = "\n".join(spec["load"])
draw = 'torch.randn(64, spec["latent_dim"])'
assert draw in code
namespace = {"latents": latents}
exec(code.replace(draw, "latents"), namespace)
np.save("plain.npy", namespace["samples"].numpy())
loaded = sorted(name for name in sys.modules if name == "agent" or name.startswith("agent."))
assert not loaded, loaded
print("loaded without the package")
"""


def _load_in_plain_pytorch(folder: Path, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of (generator.pt, generator.safetensors + json) for ``latents``, computed by CHILD."""
    np.save(folder / "latents.npy", latents.numpy())
    paths = sorted({str(Path(module.__file__).resolve().parents[1]) for module in (torch, np, safetensors)})
    installed_beside = str(Path(agent.__file__).resolve().parents[1]) in paths
    result = subprocess.run(
        [
            sys.executable, "-I", "-S", "-c", CHILD, json.dumps(paths), json.dumps(installed_beside),
            str(torch.get_num_threads()),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded without the package" in result.stdout
    return (
        torch.from_numpy(np.load(folder / "torchscript.npy")),
        torch.from_numpy(np.load(folder / "plain.npy")),
    )


@pytest.mark.timeout(240)
def test_export_ring8_loads_without_the_package_and_keeps_its_quality(
    ring8_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run, summary = ring8_run
    node = _best_node(summary)
    checkpoint = run / f"node-{node}" / "final.safetensors"
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {
        "generator.pt",
        "generator.safetensors",
        "generator.json",
        "LOAD.md",
    }
    description = json.loads((out / "generator.json").read_text())
    assert description["latent_dim"] == 2 and description["sample_shape"] == [2]
    assert description["dataset"] == "ring8" and description["load"] == list(LOAD_LINES)
    assert "\n".join(LOAD_LINES) in (out / "LOAD.md").read_text()

    # The output layer is a ScaledLinear with scale √0.1: the export holds c·W, the checkpoint W.
    weights = load_file(str(out / "generator.safetensors"))
    stored = load_file(str(checkpoint))
    assert torch.equal(weights["6.weight"], stored["generator.net.6.weight"] * 0.1**0.5)
    assert torch.equal(weights["0.weight"], stored["generator.net.0.weight"])  # scale 1

    # The agents' own evaluation latents: their metrics of this node are known from the run's summary.
    model = load_model(checkpoint, with_dataset=True)
    latents = model.latents(model.config.eval_samples, seed=None)
    from_script, from_plain = _load_in_plain_pytorch(out, latents)
    with torch.no_grad():
        project = model.generator_module()(latents)
    torch.testing.assert_close(from_script, project, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_plain, project, atol=1e-5, rtol=0)

    evaluator = make_evaluator(model)
    agents = summary["final"]["node_quality"][node]
    assert evaluator.evaluate(model.problem, model.x) == agents
    assert evaluate_samples(evaluator, project) == agents
    assert evaluate_samples(evaluator, from_script) == agents
    assert evaluate_samples(evaluator, from_plain) == agents
    assert agents["modes_covered"] >= 4 and agents["high_quality"] >= 0.05, agents  # a trained generator


@pytest.mark.timeout(120)
def test_export_dcgan_loads_without_the_package(
    digits_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run, summary = digits_run
    checkpoint = run / "node-1" / "final.safetensors"
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    description = json.loads((out / "generator.json").read_text())
    assert description["sample_shape"] == [1, 8, 8] and description["batch_statistics"] is True
    assert description["output"]["value_range"] == [-1.0, 1.0]

    model = load_model(checkpoint, with_dataset=True)
    latents = model.latents(DIGITS_EVAL_SAMPLES, seed=None)
    from_script, from_plain = _load_in_plain_pytorch(out, latents)
    with torch.no_grad():
        project = model.generator_module()(latents)
    # Convolutions and batch statistics reduce in an order that depends on the thread count, which differs
    # between this process and the child under load: ~5e-5 on outputs in [-1, 1] (seen once at 1e-5).
    torch.testing.assert_close(from_script, project, atol=2e-4, rtol=0)
    torch.testing.assert_close(from_plain, project, atol=2e-4, rtol=0)
    evaluator = make_evaluator(model)
    agents = summary["final"]["node_quality"][1]
    for samples in (project, from_script, from_plain):
        quality = evaluate_samples(evaluator, samples)
        assert quality["classes_covered"] == agents["classes_covered"]
        assert quality["classifier_fid"] == pytest.approx(agents["classifier_fid"], rel=1e-3)


# ---- evaluate ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_evaluate_reports_what_the_agents_report(
    ring8_run: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, summary = ring8_run
    checkpoint = run / "node-0" / "final.safetensors"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quality"] == summary["final"]["node_quality"][0]
    assert result["samples"] == 2500 and result["seed"] is None and result["iteration"] == 2000
    assert result["dataset"] == "ring8"

    assert main(["evaluate", "--checkpoint", str(checkpoint)]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    quality = summary["final"]["node_quality"][0]
    assert f"modes_covered={quality['modes_covered']}/8" in line and "high_quality=" in line

    # --seed/--samples: the metrics of exactly the samples `generate --seed --num` writes.
    assert (
        main(["evaluate", "--checkpoint", str(checkpoint), "--seed", "5", "--samples", "1000", "--json"]) == 0
    )
    seeded = json.loads(capsys.readouterr().out)
    _generate(checkpoint, tmp_path / "s.npy", 1000, "--seed", "5")
    model = load_model(checkpoint, with_dataset=True)
    expected = evaluate_samples(make_evaluator(model, 1000), torch.from_numpy(np.load(tmp_path / "s.npy")))
    assert seeded["samples"] == 1000 and seeded["seed"] == 5 and seeded["quality"] == expected


@pytest.mark.timeout(120)
def test_evaluate_images_reports_classifier_fid(
    digits_run: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    run, summary = digits_run
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "node-0" / "final.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    agents = summary["final"]["node_quality"][0]
    assert result["samples"] == DIGITS_EVAL_SAMPLES
    assert result["quality"]["classes_covered"] == agents["classes_covered"]
    assert result["quality"]["classifier_fid"] == pytest.approx(agents["classifier_fid"], rel=1e-9)
    assert set(result["reference"]) == set(summary["reference"])


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.fixture
def damaged(ring8_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    copy = tmp_path / "damaged.safetensors"
    shutil.copy(ring8_run[0] / "node-0" / "final.safetensors", copy)
    payload = bytearray(copy.read_bytes())
    payload[-100] ^= 0x01  # one flipped bit in a tensor: the checksum no longer matches
    copy.write_bytes(bytes(payload))
    return copy


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("generate", ["--checkpoint", "{missing}", "--num", "4", "--out", "{tmp}/s.npy"], "does not exist"),
        ("generate", ["--checkpoint", "{damaged}", "--num", "4", "--out", "{tmp}/s.npy"], "is damaged"),
        (
            "generate",
            ["--checkpoint", "{good}", "--num", "4", "--out", "{tmp}/s.jpg"],
            "unknown suffix '.jpg'",
        ),
        (
            "generate",
            ["--checkpoint", "{good}", "--num", "0", "--out", "{tmp}/s.npy"],
            "--num: must be a positive",
        ),
        (
            "generate",
            ["--checkpoint", "{good}", "--num", "x", "--out", "{tmp}/s.npy"],
            "--num: must be a positive",
        ),
        ("generate", ["--checkpoint", "{good}", "--out", "{tmp}/s.npy"], "required: --num"),
        (
            "generate",
            ["--checkpoint", "{good}", "--num", "4", "--out", "{tmp}/s.npy", "--seed", "-3"],
            "--seed",
        ),
        ("export", ["--checkpoint", "{damaged}", "--out", "{tmp}/e"], "is damaged"),
        ("export", ["--checkpoint", "{good}", "--out", "{tmp}/file.txt"], "is not a folder"),
        ("evaluate", ["--checkpoint", "{missing}"], "does not exist"),
        ("evaluate", ["--checkpoint", "{damaged}", "--json"], "is damaged"),
        ("evaluate", ["--checkpoint", "{tmp}"], "neither final.safetensors nor checkpoint.safetensors"),
        ("evaluate", ["--checkpoint", "{good}", "--samples", "0"], "--samples: must be a positive"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    ring8_run: tuple[Path, dict[str, Any]],
    damaged: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    extra: list[str],
    message: str,
) -> None:
    (tmp_path / "file.txt").write_text("not a folder")
    names = {
        "missing": str(tmp_path / "nope.safetensors"),
        "damaged": str(damaged),
        "good": str(ring8_run[0] / "node-0" / "final.safetensors"),
        "tmp": str(tmp_path),
    }
    capsys.readouterr()
    assert main([command, *(argument.format(**names) for argument in extra)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"dpgan-agent {command}: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.timeout(120)
def test_too_many_images_and_the_process_exit_status(
    digits_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    checkpoint = str(digits_run[0] / "node-0" / "final.safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "generate", "--checkpoint", checkpoint, "--num",
         str(MAX_IMAGE_SAMPLES + 1), "--out", str(tmp_path / "s.npy")],
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"dpgan-agent generate: error: --num: must be an integer from 1 to {MAX_IMAGE_SAMPLES} for digits, "
        f"got {MAX_IMAGE_SAMPLES + 1}"
    ]
