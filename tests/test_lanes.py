"""Lanes: L trials in one computation agree with the same trials run one at a time."""

import dataclasses
import statistics

import pandas as pd
import pytest
import torch

from gradinv import data
from gradinv.attacks.costs import GradientCost
from gradinv.attacks.objective import LaneObjective
from gradinv.trial import TrialSpec, run_trials
from gradinv.victims import Untrained
from sweep.cli.main import main

BASE = TrialSpec(dataset="faces", image_size=12, model="convnet", width=4, iterations=60)
# Packed and single-lane runs take different kernels (grouped convolutions under vmap), and signed Adam
# amplifies the last-bit differences, so single trials part ways; their mean PSNR agrees within this.
LANE_AGREEMENT_DB = 0.5


def lane_inputs(spec: TrialSpec, lanes: int):
    model = Untrained(spec).model()
    updates, labels = [], []
    from gradinv.client.update import client_update

    for lane in range(lanes):
        indices = tuple(i + lane * len(spec.images) for i in spec.images)
        images01, y = data.load_images(spec.dataset, indices, image_size=spec.image_size)
        updates.append(client_update(model, data.normalise(images01, spec.data_spec), y, spec.fl_config()))
        labels.append(y)
    return model, updates, torch.stack(labels)


@pytest.mark.numeric
@pytest.mark.parametrize(
    "settings", [dict(), dict(fl="fedavg", local_steps=3, local_lr=0.05, images=(0, 1), local_batch_size=1)]
)
def test_each_lane_matches_its_own_single_lane_computation(settings, bars):
    spec = dataclasses.replace(BASE, restarts=2, **settings)
    lanes = 4
    model, updates, labels = lane_inputs(spec, lanes)
    configs = [dataclasses.replace(spec.ig_config(), tv=10.0 ** -(lane + 2)) for lane in range(lanes)]
    x = torch.randn(lanes * spec.restarts, len(spec.images), 1, 12, 12, generator=torch.Generator().manual_seed(1))
    packed_grad, packed_total, _ = LaneObjective(model, updates, labels, configs)(x)
    for lane in range(lanes):
        own = slice(lane * spec.restarts, (lane + 1) * spec.restarts)
        alone = LaneObjective(model, updates[lane : lane + 1], labels[lane : lane + 1], configs[lane : lane + 1])
        grad, total, _ = alone(x[own])
        for name, packed_value, alone_value in [("objective", packed_total, total), ("gradient", packed_grad, grad)]:
            difference = (packed_value[own] - alone_value).abs().max().item()
            bars.below(f"lanes: {name}, packed vs alone, largest difference", difference, 1e-5)


@pytest.mark.parametrize("length", [7, 2**14 + 3])  # batched below 2**14, one BLAS dot per row above
def test_fused_cosine_cost_and_its_gradient_match_the_plain_formula(length):
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(3, length, generator=generator), torch.randn(3, 2, 5, generator=generator)]
    candidate = [
        torch.randn(3, length, generator=generator, dtype=torch.float64).requires_grad_(True),
        torch.randn(3, 2, 5, generator=generator, dtype=torch.float64).requires_grad_(True),
    ]
    weights = [1.0, 0.5]
    fused = GradientCost([t.double() for t in targets], weights, "cosine")(candidate)
    (fused_grad,) = torch.autograd.grad(fused.sum(), candidate[:1])

    def plain(c, t):
        per_layer = [
            (
                w * (a * b.double()).flatten(1).sum(1),
                w * a.pow(2).flatten(1).sum(1),
                w * b.double().pow(2).flatten(1).sum(1),
            )
            for a, b, w in zip(c, t, weights)
        ]
        dot, norm_c, norm_t = (sum(parts) for parts in zip(*per_layer))
        return 1 - dot / (norm_c.sqrt() * norm_t.sqrt())

    reference = plain(candidate, targets)
    (reference_grad,) = torch.autograd.grad(reference.sum(), candidate[:1])
    assert torch.allclose(fused, reference, rtol=1e-12, atol=0)
    assert torch.allclose(fused_grad, reference_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.numeric
@pytest.mark.parametrize("attack", [True, False], ids=["attack", "disabled"])
def test_packed_trials_reach_the_same_reconstructions_as_single_runs(attack, bars):
    specs = [dataclasses.replace(BASE, images=(i,), attack_seed=seed) for i, seed in enumerate(bars.seeds(8))]
    # The control packs a disabled attack (one iteration): the bar must tell it from the real one.
    packed = run_trials(specs if attack else [dataclasses.replace(s, iterations=1) for s in specs])
    alone = [run_trials([spec])[0] for spec in specs]
    gap = statistics.mean(p.metrics["psnr"] for p in packed) - statistics.mean(a.metrics["psnr"] for a in alone)
    bars.below("lanes: mean PSNR gap, packed vs alone [dB]", abs(gap), LANE_AGREEMENT_DB, holds=attack)
    assert all(p.lanes == 8 for p in packed) and all(a.lanes == 1 for a in alone)


@pytest.mark.numeric
def test_a_study_packed_into_lanes_agrees_with_one_lane_per_task(write_study, tmp_path, bars):
    text = """
        name: lanes
        data: {{dataset: faces, images: 8, image_size: 12}}
        fixed: {{model: convnet, width: 4, iterations: 60, attack_seed: {seed}}}
        resources: {{num_cpus: 1}}
        lanes: {lanes}
    """
    frames = {}
    for lanes in (1, 4):
        results = tmp_path / f"lanes-{lanes}"
        study = write_study(text.format(lanes=lanes, seed=bars.seeds(1)[0]), name=f"lanes-{lanes}.yaml")
        assert main(["run", str(study), "--results", str(results), "--no-progress"]) == 0
        frames[lanes] = pd.read_parquet(results).set_index("key").sort_index()
    single, packed = frames[1], frames[4]
    assert list(single.index) == list(packed.index)  # lanes are an execution setting: same keys
    assert set(packed["lanes"]) == {4} and set(single["lanes"]) == {1}
    gap = packed["psnr"].mean() - single["psnr"].mean()  # the control is the test above: same bar
    bars.below("lanes, study: mean PSNR gap, packed vs alone [dB]", abs(gap), LANE_AGREEMENT_DB)
