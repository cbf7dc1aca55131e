"""A pack of lanes, run without Ray: one trial's error fails that trial alone, a stop fails the pack."""

import json
import math

import pytest

from gradinv.trial import TrialSpec
from sweep import worker as execution
from sweep.worker import Pack, run_pack

KEYS = ("k0", "k1", "k2")
SPECS = tuple(
    TrialSpec(dataset="faces", images=(i,), image_size=8, model="convnet", width=2, iterations=3) for i in range(3)
)


@pytest.fixture
def faults(tmp_path, monkeypatch):
    """Name trial keys and their deliberate faults (see sweep.worker.inject_fault)."""

    def set_faults(mapping: dict) -> None:
        path = tmp_path / "faults.json"
        path.write_text(json.dumps(mapping))
        monkeypatch.setenv("GRADINV_FAULTS", str(path))

    return set_faults


@pytest.fixture
def run_trials_calls(monkeypatch):
    """The trial keys of every run_trials call a pack makes (by the specs' first image)."""
    calls = []
    real = execution.run_trials

    def counting(specs, **kwargs):
        calls.append(tuple(KEYS[spec.images[0]] for spec in specs))
        return real(specs, **kwargs)

    monkeypatch.setattr(execution, "run_trials", counting)
    return calls


def test_a_lane_that_raises_fails_its_trial_alone(faults, run_trials_calls):
    faults({"k1": "raise"})
    checkpoints = []
    rows = run_pack(
        Pack("s", KEYS, SPECS), on_checkpoint=lambda keys, i, costs, quality: checkpoints.append((keys, costs, quality))
    )
    assert [row["key"] for row in rows] == list(KEYS)
    assert [row["status"] for row in rows] == ["ok", "failed", "ok"]
    assert "injected fault for trial k1" in rows[1]["error"]
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert all(math.isfinite(rows[i]["psnr"]) and rows[i]["lanes"] == 1 for i in (0, 2))
    assert run_trials_calls == [("k0",), ("k2",)]  # the fault raised before the pack ran; then one by one
    assert {keys for keys, _, _ in checkpoints} == {("k0",), ("k2",)}  # costs come with the keys they belong to
    assert all(len(costs) == len(quality) == 1 for _, costs, quality in checkpoints)
    # Each checkpoint's quality is the row's own quality curve at that point: what tune prunes on.
    streamed = [quality[0] for keys, _, quality in checkpoints if keys == ("k0",)]
    assert streamed == list(zip(rows[0]["curve_psnr"], rows[0]["curve_ssim"]))
    # The gain at each checkpoint is over the same baseline as the row's; the last one is the row's gain.
    assert rows[0]["curve_gain"] == pytest.approx([psnr - rows[0]["baseline_psnr"] for psnr in rows[0]["curve_psnr"]])
    assert rows[0]["curve_gain"][-1] == pytest.approx(rows[0]["psnr_gain"], abs=1e-3)


def test_a_healthy_pack_runs_once_as_lanes(faults, run_trials_calls):
    faults({"some-other-key": "raise"})
    rows = run_pack(Pack("s", KEYS, SPECS))
    assert [row["status"] for row in rows] == ["ok"] * 3 and {row["lanes"] for row in rows} == {3}
    assert run_trials_calls == [KEYS]


def test_a_pack_past_its_timeout_fails_every_trial_without_running_them_again(run_trials_calls):
    rows = run_pack(Pack("s", KEYS, SPECS, timeout=1e-9))
    assert [row["status"] for row in rows] == ["failed"] * 3
    assert all("past the trial timeout" in row["error"] for row in rows)
    assert run_trials_calls == [KEYS]
