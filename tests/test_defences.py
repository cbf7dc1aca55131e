"""Update-level defences: each defence exactly, the attacker's declared knowledge, one-line errors, unchanged
keys, and the leakage trends on a tiny configuration."""

import functools
import math
import statistics

import pytest
import torch
from cli_refusals import assert_attack_refuses

from gradinv import data
from gradinv.attacks.objective import LaneObjective
from gradinv.client.defences import add_noise, attacker_defences, client_defences, clip, kept_masks, prune, quantise
from gradinv.client.update import client_update
from gradinv.parameters import DefenceSettings
from gradinv.results.schema import trial_key
from gradinv.trial import TrialSpec, run_trials
from gradinv.victims import Untrained


def _update(seed: int = 0, shapes=((6, 5), (7,), (3, 2, 2))) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes)


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


# ------------------------------------------------------------------------------------------------
# Each defence, exactly


def test_clip_scales_the_whole_update_to_the_clip_norm_and_leaves_a_smaller_one_alone():
    update = _update()
    clipped = clip(update, max_norm=0.5)
    assert _norm(clipped) == pytest.approx(0.5, rel=1e-12)
    factor = 0.5 / _norm(update)  # one factor for every tensor: the direction is kept
    assert all(torch.allclose(c, u * factor, rtol=1e-12, atol=0) for c, u in zip(clipped, update))
    assert all(torch.equal(c, u) for c, u in zip(clip(update, max_norm=2 * _norm(update)), update))


@pytest.mark.parametrize("fraction", [0.3, 0.05, 1e-6])
def test_pruning_keeps_the_ceil_of_the_fraction_of_largest_magnitudes(fraction):
    update = _update()
    layer = prune(update, fraction, "layer")
    for kept, original in zip(layer, update):  # per tensor: ceil(f * n), never fewer than one
        count = math.ceil(fraction * original.numel())
        assert int(kept.count_nonzero()) == count
        largest = original.abs().flatten().topk(count).indices
        assert torch.equal(kept.flatten()[largest], original.flatten()[largest])
    whole = torch.cat([t.flatten() for t in update])
    pruned = torch.cat([t.flatten() for t in prune(update, fraction, "global")])
    count = math.ceil(fraction * whole.numel())
    assert int(pruned.count_nonzero()) == count
    assert (
        pruned.abs().max() == whole.abs().max() and pruned[pruned != 0].abs().min() >= whole.abs().sort().values[-count]
    )


def test_nearest_one_bit_quantisation_is_scaled_sign_sgd():
    update = _update()
    sent = quantise(update, bits=1, rounding="nearest", seed=0)
    assert all(torch.equal(s, u.sign() * u.abs().mean()) for s, u in zip(sent, update))


def test_quantisation_uses_its_levels_and_keeps_pruned_coordinates_at_zero():
    update = prune(_update(), 0.5, "layer")
    for rounding in ("nearest", "stochastic"):
        for kept, original in zip(quantise(update, bits=3, rounding=rounding, seed=1), update):
            assert torch.equal(kept == 0, original == 0)
            scale = original.abs().max()
            levels = (kept[kept != 0] / scale + 1) / 2 * 7  # 2**3 levels: 0..7 spacings above -scale
            assert torch.allclose(levels, levels.round(), atol=1e-9)
            if rounding == "nearest":
                assert (kept - original).abs().max() <= scale / 7 + 1e-12  # half a spacing (2 scale / 7) at most


def test_stochastic_rounding_is_unbiased_over_seeds():
    values = _update(shapes=((200,),))[0]
    seeds = 4000
    mean = sum(quantise((values,), bits=2, rounding="stochastic", seed=s)[0] for s in range(seeds)) / seeds
    spacing = 2 * values.abs().max() / 3
    # one seed's error per coordinate is at most one spacing, so the mean's standard error is at most
    # spacing / (2 sqrt(seeds)); 5 of those (< 1 in 10^6 per coordinate) is the tolerance
    assert (mean - values).abs().max() <= 5 * spacing / (2 * math.sqrt(seeds))
    nearest = quantise((values,), bits=2, rounding="nearest", seed=0)[0]
    assert (nearest - values).abs().mean() > 10 * (mean - values).abs().mean()  # nearest rounding is not


def test_noise_is_reproducible_by_its_seed_and_has_its_std():
    update = _update(shapes=((200, 100),))
    first, again, other = (add_noise(update, std=0.3, seed=s)[0] for s in (7, 7, 8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first - update[0]).std().item() == pytest.approx(0.3, rel=0.02)  # 20,000 draws: 0.5 % standard error
    stochastic = quantise(update, bits=2, rounding="stochastic", seed=7)[0]
    assert not torch.equal(stochastic, quantise(update, bits=2, rounding="stochastic", seed=8)[0])


def test_a_trial_builds_its_defences_in_the_declared_order():
    assert client_defences(TrialSpec()) == () and attacker_defences(TrialSpec()) == ()
    every = TrialSpec(clip_update=1.0, noise_std=0.1, keep_fraction=0.5, quant_bits=2, clip_aware=True)
    assert [d.func for d in client_defences(every)] == [clip, add_noise, prune, quantise]
    assert client_defences(DefenceSettings(noise_std=0.1))[0].keywords == {"std": 0.1, "seed": 0}
    assert [d.func for d in attacker_defences(every)] == [clip]  # noise and quantisation compared as sent
    assert kept_masks(every, _update()) is None  # the naive attacker compares every coordinate


# ------------------------------------------------------------------------------------------------
# The attacker's knowledge: at the true images, the aware attacker's candidate is the update sent


def _gradient_cost_at_truth(**settings) -> float:
    spec = TrialSpec(dataset="faces", images=(0, 1), image_size=8, model="convnet", width=8, **settings)
    model = Untrained(spec).model().eval()
    images01, labels = data.load_images("faces", spec.images, None, image_size=8)
    images = data.normalise(images01, spec.data_spec)
    update = client_update(model, images, labels, spec.fl_config(), client_defences(spec))
    objective = LaneObjective(model, [update], labels[None], [spec.ig_config()])
    return float(objective.match(images[None]))


def test_the_prune_aware_attacker_compares_only_the_kept_coordinates():
    assert _gradient_cost_at_truth(keep_fraction=0.1, prune_aware=True) == pytest.approx(0, abs=1e-6)
    assert _gradient_cost_at_truth(keep_fraction=0.1) > 0.1  # the naive one also matches the zeros


def test_the_clip_aware_attacker_clips_its_candidate_like_the_client():
    assert _gradient_cost_at_truth(clip_update=1e-3, clip_aware=True, cost="l2") == pytest.approx(0, abs=1e-12)
    assert _gradient_cost_at_truth(clip_update=1e-3, cost="l2") > 1e-3


# ------------------------------------------------------------------------------------------------
# Settings: one-line errors, unchanged keys, what applies when


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--noise-std", "-0.1"], "noise_std: -0.1 is not valid; use 0 (no noise) or more"),
        (
            ["--keep-fraction", "0"],
            "keep_fraction: 0.0 is not valid; use a fraction above 0 and at most 1 (1: no pruning)",
        ),
        (
            ["--keep-fraction", "1.5"],
            "keep_fraction: 1.5 is not valid; use a fraction above 0 and at most 1 (1: no pruning)",
        ),
        (["--quant-bits", "0"], "quant_bits: 0 is not valid; use 1 bit or more, or leave it out for no quantisation"),
        (["--clip-update", "0"], "clip_update: 0.0 is not valid; use a positive norm, or leave it out for no clip"),
        (["--clip-update", "inf"], "clip_update: inf is not valid; use a finite norm"),
        (["--dp-delta", "1"], "dp_delta: 1.0 is not valid; use a delta between 0 and 1"),
        (["--prune-scope", "row"], "prune_scope: 'row' is not valid; choose one of layer, global"),
        (["--aggregated-clients", "0"], "aggregated_clients: 0 is not valid; use 1 (no aggregation) or more clients"),
        (
            ["--image", "0", "--image", "1", "--image", "2", "--aggregated-clients", "2"],
            "aggregated_clients: 2 is not valid; use a number of clients that divides the trial's 3 images "
            "(1: no aggregation)",
        ),
    ],
)
def test_a_bad_defence_value_exits_2_with_one_line(argv, line, tmp_path, capsys):
    assert_attack_refuses(argv, line, tmp_path, capsys)


def test_defaults_leave_keys_unchanged_and_inapplicable_settings_collapse():
    assert TrialSpec().key_fields() == {} and trial_key(TrialSpec(dp_delta=1e-5)) == trial_key(TrialSpec())
    idle = TrialSpec(
        prune_scope="global", prune_aware=True, quant_rounding="nearest", defence_seed=3, clip_aware=True, dp_delta=1e-3
    )
    assert idle.key_fields() == {} and trial_key(idle) == trial_key(TrialSpec())
    assert TrialSpec(noise_std=0.1, defence_seed=3).key_fields() == {"noise_std": 0.1, "defence_seed": 3}
    assert "defence_seed" in TrialSpec(quant_bits=2, quant_rounding="nearest").not_applicable()
    assert "defence_seed" not in TrialSpec(quant_bits=2).not_applicable()  # stochastic rounding draws numbers
    assert "dp_delta" in TrialSpec(noise_std=0.1).not_applicable()
    assert "dp_delta" not in TrialSpec(noise_std=0.1, clip_update=1.0).not_applicable()  # the Gaussian mechanism
    assert "prune_aware" in TrialSpec(attack="dlg", keep_fraction=0.5).not_applicable()  # DLG does not mirror it


# ------------------------------------------------------------------------------------------------
# Trends. Faces, 16x16, ConvNet width 16, 100 iterations, images 0..3 (one per client, packed as lanes).
# Measured medians over 3 attack seeds (PSNR, dB): no defence 16.98-17.62; noise_std 0.1 (the update's
# coordinates have RMS 0.002) 9.01-9.69; keep_fraction 0.01 naive 10.24-10.48, prune-aware 14.67-15.45.
# A setting's median moves by at most 0.7 dB across seeds; the gaps are 6.5 dB or more.

TREND_DROP = 4.0  # dB: the smallest gap (6.5) less over three times the largest seed spread (0.7)
AWARE_TOLERANCE = 1.5  # dB per image: one image's PSNR moves by up to 1.2 dB across attack seeds
AWARE_GAIN = 2.0  # dB: the median paired gain of the prune-aware attacker measured 4.2-5.2 across seeds


@functools.cache
def _psnr_per_image(**defence) -> tuple[float, ...]:
    specs = [
        TrialSpec(
            dataset="faces",
            images=(image,),
            image_size=16,
            model="convnet",
            width=16,
            iterations=100,
            attack_seed=image,
            **defence,
        )
        for image in range(4)
    ]
    outcomes = run_trials(specs)
    assert all(o.status == "ok" for o in outcomes)
    return tuple(o.metrics["psnr"] for o in outcomes)


@pytest.mark.numeric
@pytest.mark.parametrize("name, value", [("noise_std", 0.1), ("keep_fraction", 0.01)])
def test_the_strongest_noise_and_smallest_kept_fraction_cut_leakage(name, value, bars):
    drop = statistics.median(_psnr_per_image()) - statistics.median(_psnr_per_image(**{name: value}))
    bars.at_least(f"defences: median PSNR drop at {name} {value} [dB]", drop, TREND_DROP)


@pytest.mark.numeric
def test_the_prune_aware_attacker_is_not_worse_than_the_naive_one_per_image(bars):
    naive, aware = _psnr_per_image(keep_fraction=0.01), _psnr_per_image(keep_fraction=0.01, prune_aware=True)
    gains = [a - n for a, n in zip(aware, naive)]
    bars.at_least("defences: prune-aware minus naive PSNR, worst image [dB]", min(gains), -AWARE_TOLERANCE)
    bars.at_least("defences: prune-aware minus naive PSNR, median image [dB]", statistics.median(gains), AWARE_GAIN)


# DP-SGD in the local training (gradinv.client.dp_training), measured the same way (images 0-3, two attack seeds):
# no defence 16.8-17.2, dp_noise 0.1 / 1 / 4 (dp_clip 1) 9.2-9.3 / 8.9-9.0 / 8.8-9.3. The update-level
# noise steps: noise_std 0 / 1e-3 / 1e-2 / 1e-1 give 16.8-17.2 / 14.8 / 10.4-10.6 / 9.0-9.7.
ADJACENT_RISE = 1.0  # dB: a stronger setting's median may rise over a weaker one's by at most the seed spread (0.7)


@pytest.mark.numeric
def test_dp_sgd_noise_cuts_leakage(bars):
    drop = statistics.median(_psnr_per_image()) - statistics.median(_psnr_per_image(dp_clip=1.0, dp_noise=1.0))
    bars.at_least("defences: median PSNR drop at DP-SGD noise multiplier 1 [dB]", drop, TREND_DROP)


@pytest.mark.numeric
def test_stronger_noise_never_leaks_more_beyond_the_seed_spread(bars):
    medians = [statistics.median(_psnr_per_image(**({"noise_std": s} if s else {}))) for s in (0, 1e-3, 1e-2, 1e-1)]
    rises = [stronger - weaker for weaker, stronger in zip(medians, medians[1:])]
    bars.below(
        "defences: largest rise of the median PSNR from one noise strength to the next [dB]", max(rises), ADJACENT_RISE
    )


def test_a_dp_row_records_the_accountants_epsilon_and_the_update_level_one():
    from opacus.accountants import RDPAccountant

    from gradinv.client.accounting import gaussian_mechanism_epsilon
    from sweep.worker import Pack, run_pack

    spec = TrialSpec(
        dataset="faces",
        images=(0, 1),
        image_size=8,
        model="convnet",
        width=2,
        iterations=2,
        fl="fedavg",
        local_steps=3,
        dp_clip=0.5,
        dp_noise=1.3,
        dp_sample_rate=0.5,
        dp_delta=1e-6,
        clip_update=2.0,
        noise_std=1.0,
    )
    (row,) = run_pack(Pack("dp", ("k",), (spec,), 1, "cpu", None))
    accountant = RDPAccountant()
    for _ in range(3):  # one accountant step per local DP-SGD step
        accountant.step(noise_multiplier=1.3, sample_rate=0.5)
    assert row["status"] == "ok" and row["accountant"] == "rdp"
    assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-6), abs=1e-9)
    assert row["update_epsilon"] == pytest.approx(gaussian_mechanism_epsilon(0.5, 1e-6), abs=1e-9)
    undefended = run_pack(
        Pack(
            "dp",
            ("k",),
            (TrialSpec(dataset="faces", images=(0,), image_size=8, model="convnet", width=2, iterations=2),),
            1,
            "cpu",
            None,
        )
    )[0]
    assert undefended["epsilon"] is None and undefended["accountant"] is None and undefended["update_epsilon"] is None
