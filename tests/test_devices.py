"""Every attack runs on the device it is given: no tensor lands on the default device behind its back.

Without a GPU: the attacks run on the CPU while the default device is 'meta' (tensors without data),
and every torch call is watched. A tensor made without naming its device lands on meta, where a
GPU run would have put it on the CPU beside GPU tensors; the watcher records the call. With a GPU,
whole trials of every attack also run on it.
"""

import dataclasses
import os
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from gradinv import data, models
from gradinv.attacks.analytic import first_linear_input
from gradinv.attacks.dlg import deep_leakage
from gradinv.attacks.inverting import invert_gradients
from gradinv.attacks.labels import recover_labels
from gradinv.attacks.objective import IGConfig
from gradinv.client.update import client_update
from gradinv.parameters import ClientSettings
from gradinv.trial import TrialSpec, run_trials

SPEC = data.dataset_spec("faces")
FEDSGD = ClientSettings()
FEDAVG = ClientSettings(fl="fedavg", local_steps=2, local_batch_size=1)  # mini-batches: a shuffled schedule


class MetaWatcher(TorchFunctionMode):
    """Records every torch call that returns a tensor on the meta device, as 'name at file:line' of
    the innermost gradinv frame that made it."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_flatten(result)[0]):
            ours = [f for f in traceback.extract_stack() if f"{os.sep}gradinv{os.sep}" in f.filename]
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
            self.calls.append(f"{getattr(func, '__name__', func)} at {where}")
        return result


@dataclasses.dataclass
class Client:
    model: torch.nn.Module
    images: torch.Tensor  # normalised, [B, C, H, W]
    labels: torch.Tensor
    update: object


def client(model_name: str, width: int, images: int, fl: ClientSettings, device: str) -> Client:
    model = models.build_model(model_name, channels=1, num_classes=2, image_size=8, width=width, seed=1)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images01 = torch.rand(images, 1, 8, 8, generator=generator).to(device)
    labels = (torch.arange(images) % 2).to(device)
    normalised = data.normalise(images01, SPEC)
    return Client(model, normalised, labels, client_update(model, normalised, labels, fl))


def ig(c: Client) -> list[torch.Tensor]:
    box = data.pixel_box(SPEC, c.images)
    result = invert_gradients(
        c.model,
        [c.update],
        c.labels.unsqueeze(0),
        [IGConfig(iterations=3, restarts=2)],
        [0],
        box,
        tuple(c.images.shape),
    )
    return [result.images]


def dlg_known_labels(c: Client) -> list[torch.Tensor]:
    result, labels = deep_leakage(
        c.model,
        [c.update],
        c.labels.unsqueeze(0),
        [IGConfig(iterations=2)],
        [0],
        tuple(c.images.shape),
        SPEC.num_classes,
    )
    return [result.images, labels]


def dlg_joint_labels(c: Client) -> list[torch.Tensor]:
    result, labels = deep_leakage(
        c.model, [c.update], None, [IGConfig(iterations=2)], [0], tuple(c.images.shape), SPEC.num_classes
    )
    return [result.images, labels]


def analytic(c: Client) -> list[torch.Tensor]:
    return [first_linear_input(c.model, c.update)]


def labels(c: Client) -> list[torch.Tensor]:
    return [recover_labels(c.update, SPEC.num_classes)]


CASES = {
    "ig-fedsgd": (ig, "convnet", 2, 2, FEDSGD),
    "ig-fedavg-minibatches": (ig, "convnet", 2, 2, FEDAVG),
    "dlg-known-labels": (dlg_known_labels, "convnet", 2, 2, FEDSGD),
    "dlg-joint-labels-fedavg-minibatches": (dlg_joint_labels, "convnet", 2, 2, FEDAVG),
    "analytic": (analytic, "mlp", 16, 1, FEDSGD),
    "labels-one-image": (labels, "convnet", 2, 1, FEDSGD),
    "labels-batch": (labels, "convnet", 2, 3, FEDSGD),
}


@pytest.mark.parametrize("case", CASES)
def test_attack_makes_no_tensor_on_the_default_device(case):
    attack, model_name, width, images, fl = CASES[case]
    c = client(model_name, width, images, fl, "cpu")
    watcher = MetaWatcher()
    with torch.device("meta"), watcher:
        try:
            outputs = attack(c)
        except Exception:  # a stray meta tensor usually breaks the attack: the watcher says where
            if not watcher.calls:
                raise
    assert watcher.calls == []
    assert all(t.device.type == "cpu" and torch.isfinite(t.float()).all() for t in outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", CASES)
def test_attack_runs_on_a_gpu(case):
    attack, model_name, width, images, fl = CASES[case]
    outputs = attack(client(model_name, width, images, fl, "cuda"))
    assert all(t.device.type == "cuda" and torch.isfinite(t.float()).all() for t in outputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "attack, model, labels",
    [("ig", "convnet", "recovered"), ("dlg", "convnet", "recovered"), ("analytic", "mlp", "known")],
)
def test_whole_trials_run_on_a_gpu(attack, model, labels):
    images = (0,) if attack == "analytic" else (0, 1)
    spec = TrialSpec(
        dataset="faces", images=images, image_size=8, labels=labels, model=model, width=16, attack=attack, iterations=3
    )
    (outcome,) = run_trials([spec], device="cuda")
    assert outcome.status == "ok", outcome.error
    assert outcome.reconstruction.device.type == "cpu" and outcome.metrics["psnr"] > 0
