"""scripts/gpu_check.py: end to end on the CPU, its exit statuses, and that it notices a mismatch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agent.checkpoint import load_checkpoint, save_checkpoint
from tests.agents import EQUIVALENCE_FLAGS

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*arguments: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(60)
def test_the_script_checks_the_configuration_the_tests_check() -> None:
    assert _script().EQUIVALENCE_FLAGS == EQUIVALENCE_FLAGS


@pytest.mark.timeout(120)
def test_cpu_check_passes_end_to_end_and_notices_a_mismatch(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "check"
    done = _run("--device", "cpu", "--out", str(out), "--timing-iterations", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("PASS: 2 agents vs simulator (exact, topk+overlap, float32-delta) on cpu")
    assert (out / "agents-topk-overlap" / "node-1" / "final.safetensors").exists()
    assert (out / "agents-float32-delta" / "node-1" / "final.safetensors").exists()
    assert "| ring8 |" in done.stdout and "| digits |" in done.stdout
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["passed"] and result["device"] == "cpu" and result["torch"] == torch.__version__
    assert result["equivalence"]["max_abs_difference"] <= 1e-6 and not result["equivalence"]["problems"]
    assert [row["workload"] for row in result["timing"]] == ["ring8", "digits"]
    # The delta wire coded (float32's bits against each edge's last vector): fewer bytes than plain float32.
    sent = result["agents_bytes_sent"]
    assert sent.keys() == {"exact", "topk+overlap", "float32-delta"}
    assert 0 < sent["float32-delta"] < 0.8 * sent["exact"] and sent["topk+overlap"] < 0.5 * sent["exact"]
    assert all(row["seconds_per_iteration"]["cpu"] > 0 for row in result["timing"])
    assert (out / "gpu_check.md").read_text().startswith("PASS")

    # One parameter of one simulated node nudged: compare() reports the difference and the verdict fails.
    path = out / "sim" / "node-1" / "final.safetensors"
    checkpoint = load_checkpoint(path)
    name = next(iter(checkpoint.parameters))
    checkpoint.parameters[name] = checkpoint.parameters[name] + 1e-3
    save_checkpoint(path, checkpoint)
    script = _script()
    equivalence = script.compare(out / "agents", out / "sim")
    assert equivalence["max_abs_difference"] == pytest.approx(1e-3, rel=1e-2)
    # main() on those folders (the runs replaced by the ones above): exit 1, the verdict says FAIL.
    monkeypatch.setattr(script, "dpgan", lambda *_: 0.0)
    monkeypatch.setattr(script, "sent_bytes", lambda _: 0)
    monkeypatch.setattr(script, "time_workloads", lambda _: result["timing"])
    assert script.main(["--device", "cpu", "--out", str(out)]) == 1
    assert not json.loads((out / "gpu_check.json").read_text())["passed"]
    assert (out / "gpu_check.md").read_text().startswith("FAIL")


@pytest.mark.timeout(60)
def test_an_unavailable_device_exits_3_with_one_line(tmp_path: Path) -> None:
    present = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    devices = [device for device, there in present.items() if not there]
    if not devices:
        pytest.skip("both cuda and mps are available here")
    done = _run("--device", devices[0], "--out", str(tmp_path / "check"))
    assert done.returncode == 3
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert f"device {devices[0]} is not available" in done.stderr
    assert not (tmp_path / "check").exists()


@pytest.mark.timeout(60)
def test_bad_arguments_exit_2() -> None:
    assert _run("--device", "tpu").returncode == 2
    assert _run("--timing-iterations", "0").returncode == 2
