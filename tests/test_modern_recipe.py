"""The stronger honest-server recipes as knobs: breaching's feature prior, patterned starts, TV with exponents,
soft signs and warm-up, and See-Through-Gradients' Langevin noise and L2 image prior, on tiny shapes."""

import dataclasses
from pathlib import Path

import pytest
import torch

from gradinv import data
from gradinv.attacks import steps
from gradinv.attacks.feature_prior import FeaturePrior, classifier, read_features
from gradinv.attacks.inverting import initial_images, invert_gradients, warmup_factor
from gradinv.attacks.objective import IGConfig, LaneObjective, total_variation
from gradinv.client.update import client_update, model_state
from gradinv.errors import ConfigError
from gradinv.parameters.attack import PATTERN_SIDE
from gradinv.trial import TrialSpec
from gradinv.victims import Untrained
from sweep.cli.main import main
from sweep.study import load_study
from sweep.tune.section import tune_searches

REPO = Path(__file__).resolve().parent.parent

SPEC = TrialSpec(dataset="fashion-mnist", image_size=12, model="convnet", width=4, iterations=3, tv=1e-4)


def one_client(spec: TrialSpec):
    model = Untrained(spec).model()
    images01, labels = data.load_images(spec.dataset, spec.images, image_size=spec.image_size)
    images = data.normalise(images01, spec.data_spec)
    return model, images, labels, client_update(model, images, labels, spec.fl_config())


def test_a_one_image_update_gives_the_classifiers_input_exactly():
    model, images, labels, update = one_client(dataclasses.replace(SPEC, images=(3,)))
    layer, weight_at, bias_at = classifier(model)
    assert layer is model[-1]
    read = read_features(update.tensors[weight_at], update.tensors[bias_at], labels)
    truth = torch.nn.Sequential(*list(model)[:-1])(images).detach()
    assert read.shape == truth.shape and torch.allclose(read, truth, rtol=1e-4, atol=1e-5)


def test_a_certain_victims_zero_label_entry_reads_the_features_off_another_row_and_no_signal_reads_zeros():
    features = torch.tensor([0.5, -2.0, 3.0])
    # softmax rounded to exactly 1 at the label (0): its entry is 0, the other class's a tiny 1e-20
    bias = torch.tensor([0.0, 1e-20])
    weight = bias[:, None] * features[None, :]
    assert torch.allclose(read_features(weight, bias, torch.tensor([0])), features[None], rtol=1e-6, atol=0)
    assert read_features(torch.zeros(2, 3), torch.zeros(2), torch.tensor([0, 1])).tolist() == [[0.0] * 3] * 2


def test_the_feature_prior_is_zero_at_the_truth_and_enters_the_objective_with_its_weight():
    model, images, labels, update = one_client(dataclasses.replace(SPEC, images=(3,)))
    params, buffers = model_state(model)
    prior = FeaturePrior(model, params, buffers, [update], labels[None], lambda t: t)
    assert prior(images[None]).item() < 1e-12
    elsewhere = torch.randn(2, *images.shape, generator=torch.Generator().manual_seed(0))
    # an untrained network's features of any two images are close (about 1e-4 apart, relatively), not equal
    assert (prior(elsewhere) > 1e-5).all()
    plain, weighted = (IGConfig(restarts=2, feature_prior=w) for w in (0.0, 0.5))
    _, without, _ = LaneObjective(model, [update], labels[None], [plain])(elsewhere)
    _, with_prior, _ = LaneObjective(model, [update], labels[None], [weighted])(elsewhere)
    assert torch.allclose(with_prior - without, 0.5 * prior(elsewhere), rtol=1e-4, atol=1e-6)


def test_tv_with_exponents_on_a_ramp():
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    ramp = (0.3 * rows + 0.4 * cols)[None, None]  # dy = 0.3, dx = 0.4 everywhere
    assert total_variation(ramp).item() == pytest.approx(0.7)  # the paper's anisotropic TV
    assert total_variation(ramp, 2.0, 0.5).item() == pytest.approx(0.5, abs=1e-6)  # isotropic: sqrt(0.3² + 0.4²)
    assert total_variation(ramp, 1.0, 2.0).item() == pytest.approx(0.49, abs=1e-6)


def test_a_patterned_start_repeats_one_uniform_tile_per_image():
    x = initial_images((2, 1, 10, 10), restarts=3, init="patterned", seed=4)
    side = PATTERN_SIDE
    assert x.shape == (3, 2, 1, 10, 10) and x.min() >= -1 and x.max() < 1
    tile = x[..., :side, :side]
    assert torch.equal(x[..., side : 2 * side, side : 2 * side], tile)
    assert torch.equal(x[..., 2 * side :, 2 * side :], tile[..., : 10 - 2 * side, : 10 - 2 * side])
    assert not torch.equal(x[0, 0], x[0, 1]) and not torch.equal(x[0], x[1])  # images and restarts differ


def test_soft_signs_go_from_near_signs_to_the_plain_gradient():
    g = torch.tensor([-3.0, -0.2, 0.0, 0.05, 2.0])
    assert torch.equal(steps.Direction(signed=True)(g, 1.0, 0.5), g.sign())
    soft = steps.Direction(signed=True, soft=True)
    assert torch.allclose(soft(g, 1.0, 0.0), g.tanh())
    assert torch.allclose(soft(g, 1.0, 0.999), g, atol=1e-2)
    assert torch.equal(steps.Direction(signed=False)(g, 1.0, 0.3), g)


def test_langevin_noise_is_scaled_by_the_weight_and_the_step_size():
    draw = torch.ones(4)
    noisy = steps.Direction(signed=False, langevin=0.01, step_sizes=torch.tensor(0.3), noise=lambda: draw)
    assert torch.allclose(noisy(torch.zeros(4), 0.5, 0.0), torch.full((4,), 0.01 * 0.5 * 0.3))


def test_the_step_size_warms_up_linearly():
    config = IGConfig(warmup=4)
    assert [warmup_factor(i, config) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, IGConfig()) == 1.0


def test_packed_lanes_with_every_new_knob_match_their_single_runs():
    recipe = dict(
        feature_prior=0.1, image_prior=1e-3, langevin=0.05, soft_signed=True, warmup=2, init="patterned", restarts=2
    )
    spec = dataclasses.replace(SPEC, images=(0,), tv_inner_exp=2.0, tv_outer_exp=0.5, **recipe)
    model, _, _, _ = one_client(spec)
    updates, labels = [], []
    for image in (0, 1):
        _, images, y, update = one_client(dataclasses.replace(spec, images=(image,)))
        updates.append(update)
        labels.append(y)
    box = data.pixel_box(spec.data_spec, images)
    configs = [spec.ig_config(), dataclasses.replace(spec.ig_config(), tv=1e-2)]
    packed = invert_gradients(model, updates, torch.stack(labels), configs, [0, 1], box, images.shape)
    for lane in (0, 1):
        alone = invert_gradients(
            model, updates[lane : lane + 1], labels[lane][None], configs[lane : lane + 1], [lane], box, images.shape
        )
        assert torch.allclose(packed.images[lane], alone.images[0], rtol=0, atol=1e-4)
    again = invert_gradients(model, updates, torch.stack(labels), configs, [0, 1], box, images.shape)
    assert torch.equal(again.images, packed.images)  # the noise comes from the attack seeds


def test_new_knobs_keep_keys_collapse_where_they_do_not_apply_and_refuse_bad_values(tmp_path, capsys):
    assert TrialSpec().non_default() == {}
    assert TrialSpec(signed=False, soft_signed=True).resolved() == TrialSpec(signed=False).resolved()
    with pytest.raises(ConfigError) as refused:
        TrialSpec(optimizer="lbfgs", langevin=0.01)
    assert refused.value.field == "langevin" and "adam or sgd" in refused.value.fix
    for flag, value in (("--feature-prior", "-1"), ("--tv-inner-exp", "0"), ("--warmup", "-5"), ("--init", "tiles")):
        assert main(["attack", flag, value, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        field = flag.removeprefix("--").replace("-", "_")
        assert len(err) == 1 and f"{field}: " in err[0] and not (tmp_path / "out").exists()


def test_tune_searches_the_stronger_recipes_on_the_trained_victim():
    (search,) = tune_searches(load_study(REPO / "studies" / "tune-trained.yaml"))
    space = search.families["ig"]
    new = {"feature_prior", "image_prior", "langevin", "soft_signed", "warmup", "tv_inner_exp", "tv_outer_exp"}
    new |= {"output_gradient"}
    assert new <= set(space) and "patterned" in space["init"].values
    assert search.base.trained_epochs == 10
