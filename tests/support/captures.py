"""A federated client written in plain PyTorch, as a user's training loop would be: one FedSGD gradient on one
Fashion-MNIST image, saved with gradinv.capture before any step."""

from __future__ import annotations

import torch.nn.functional as F

from gradinv import data, models
from gradinv.capture import save_update


def client_step(path, *, side: int, index=0, width=32, seed=0, labels=True, images=True):
    """The capture of one client's gradient on test image ``index`` at ``side`` x ``side``; labels and the
    image itself (ground truth, for scoring) are saved only when asked."""
    info = data.dataset_spec("fashion-mnist")
    x, y = data.load_images("fashion-mnist", [index], image_size=side)
    model = models.build_model("convnet", channels=1, num_classes=10, image_size=side, width=width, seed=seed)
    model.zero_grad()
    F.cross_entropy(model((x - info.mean[0]) / info.std[0]), y).backward()
    gradient = [p.grad for p in model.parameters()]
    return save_update(
        path,
        model=model,
        num_images=1,
        gradient=gradient,
        labels=y if labels else None,
        images=x if images else None,
    )
