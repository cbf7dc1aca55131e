"""Attack throughput: trial-iterations per second of inverting gradients, lanes against the plain loop.

(a) the plain one-trial loop as reference implementations write it: the update by
    torch.autograd.grad(loss, all parameters, create_graph=True), the cosine cost plus TV, then
    .backward() accumulating into every leaf, Adam on the signed image gradient;
(b) gradinv's attack with L = 1 lane; (c) gradinv with L = 2, 4, 8, 16 lanes in one computation.

Each configuration runs a few iterations after a warm-up; configurations are interleaved and
repeated, and the table shows medians and the ratio to (a). Same threads for all.

    .venv/bin/python benchmarks/attack_throughput.py [--device cuda] [--repeats 3] [--cases convnet64,...]
    .venv/bin/python benchmarks/attack_throughput.py --repeats 1 --iterations 1 --max-lanes 2 --width 2   # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from arguments import positive  # benchmarks/ is on sys.path when a script runs

from gradinv import data
from gradinv.attacks.inverting import invert_gradients
from gradinv.attacks.objective import IGConfig, total_variation
from gradinv.client.update import client_update
from gradinv.trial import TrialSpec
from gradinv.victims import Untrained


@dataclass(frozen=True)
class Case:
    name: str
    spec: TrialSpec
    lanes: tuple[int, ...]


def cases() -> dict[str, Case]:
    cifar = dict(dataset="photos", image_size=32)  # CIFAR-sized colour images that exist offline
    fedavg = dict(fl="fedavg", local_steps=5, images=(0, 1, 2, 3))
    return {
        c.name: c
        for c in (
            Case("convnet64-32x32x3", TrialSpec(**cifar, model="convnet", width=64), (1, 2, 4, 8, 16)),
            Case("resnet20w4-32x32x3", TrialSpec(**cifar, model="resnet20", width=4), (1, 2, 4, 8, 16)),
            Case("convnet64-4img-fedavg5", TrialSpec(**cifar, **fedavg, model="convnet", width=64), (1, 2, 4)),
            Case("resnet20w4-4img-fedavg5", TrialSpec(**cifar, **fedavg, model="resnet20", width=4), (1, 2, 4)),
            Case("convnet32-28x28x1", TrialSpec(dataset="fashion-mnist", model="convnet", width=32), (1, 2, 4, 8, 16)),
        )
    }


def at_width(case: Case, width: int) -> Case:
    """The case with another model width (a quick run of the script; the README's table uses its own)."""
    return replace(case, name=f"{case.name} at width {width}", spec=replace(case.spec, width=width))


def setup(case: Case, lanes: int, device: str):
    """Model, one client update per lane (lane l attacks test images shifted by l), labels, box."""
    spec = case.spec
    model = Untrained(spec).model().to(device)
    info = spec.data_spec
    updates, labels, shape = [], [], None
    for lane in range(lanes):
        indices = tuple((i + lane) % info.test_images for i in spec.images)
        images01, y = data.load_images(spec.dataset, indices, image_size=spec.image_size)
        images = data.normalise(images01.to(device), info)
        updates.append(client_update(model, images, y.to(device), spec.fl_config()))
        labels.append(y.to(device))
        shape = tuple(images.shape)
    box = data.pixel_box(info, torch.zeros(1, device=device))
    return model, updates, torch.stack(labels), box, shape


def ours(case: Case, lanes: int, iterations: int, device: str) -> float:
    model, updates, labels, box, shape = setup(case, lanes, device)
    config = IGConfig(iterations=iterations, restarts=1, tv=1e-4, lr=0.1)

    def run(n):
        configs = [IGConfig(iterations=n, restarts=1, tv=1e-4, lr=0.1)] * lanes
        return invert_gradients(model, updates, labels, configs, list(range(lanes)), box, shape)

    run(1)  # warm-up
    # Time 1 + N iterations minus 1 iteration: per-call work (building the objective, the final
    # restart scoring) is paid once per attack, not per iteration, and a real attack runs thousands.
    seconds = []
    for count in (1, 1 + config.iterations):
        _sync(device)
        start = time.perf_counter()
        run(count)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return lanes * iterations / max(seconds[1] - seconds[0], 1e-9)


def plain_loop(case: Case, iterations: int, device: str) -> float:
    """The reference implementations' one-trial step, parameters requiring grad as usual."""
    model, updates, labels, box, shape = setup(case, 1, device)
    spec = case.spec
    params = [p.requires_grad_(True) for p in model.parameters()]
    target = updates[0].tensors
    lower, upper = box
    x = torch.randn(shape, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([x], lr=0.1)
    fl = spec.fl_config()

    def client_view(images):
        if fl.fl == "fedsgd":
            return torch.autograd.grad(F.cross_entropy(model(images), labels[0]), params, create_graph=True)
        from torch.func import functional_call

        weights = dict(model.named_parameters())
        for _ in range(fl.local_steps):
            loss = F.cross_entropy(functional_call(model, weights, (images,)), labels[0])
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
            weights = {n: w - fl.local_lr * g for (n, w), g in zip(weights.items(), grads)}
        return [weights[n] - p for n, p in model.named_parameters()]

    def step():
        optimiser.zero_grad()
        guess = client_view(x)
        dot = sum((g * t).sum() for g, t in zip(guess, target))
        norms = sum(g.pow(2).sum() for g in guess).sqrt() * sum(t.pow(2).sum() for t in target).sqrt()
        cost = 1 - dot / norms + 1e-4 * total_variation(x.unsqueeze(0))[0]
        cost.backward()
        x.grad.sign_()
        optimiser.step()
        with torch.no_grad():
            x.data = torch.maximum(torch.minimum(x, upper), lower)

    step()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    _sync(device)
    return iterations / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=positive, default=3)
    parser.add_argument("--iterations", type=positive, default=3, help="timed iterations per measurement")
    parser.add_argument("--cases", default=",".join(cases()), help="comma-separated case names")
    parser.add_argument("--max-lanes", type=positive, default=64)
    parser.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--width", type=positive, help="every case's model width instead of its own (a quick run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.cases.split(",")) - set(cases()))
    if unknown:
        parser.error(f"--cases: {','.join(unknown)} is not valid; choose from {','.join(cases())}")
    chosen = [cases()[name] for name in args.cases.split(",")]
    if args.width:
        chosen = [at_width(case, args.width) for case in chosen]
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.repeats} interleaved repeats of {args.iterations} iterations\n"
    )
    for case in chosen:
        extra = (32, 64) if args.device.startswith("cuda") and max(case.lanes) == 16 else ()
        lanes = [lane for lane in (*case.lanes, *extra) if lane <= args.max_lanes]
        labels = ["(a) plain loop", *[f"({'b' if lane == 1 else 'c'}) lanes={lane}" for lane in lanes]]
        samples: dict[str, list[float]] = {label: [] for label in labels}
        for _ in range(args.repeats):
            samples[labels[0]].append(plain_loop(case, args.iterations, args.device))
            for label, lane in zip(labels[1:], lanes):
                samples[label].append(ours(case, lane, args.iterations, args.device))
        reference = statistics.median(samples[labels[0]])
        print(f"{case.name}")
        print(f"  {'configuration':<18}{'trial-its/s':>12}{'ratio to (a)':>14}{'min..max':>18}")
        for label in labels:
            median = statistics.median(samples[label])
            spread = f"{min(samples[label]):.2f}..{max(samples[label]):.2f}"
            print(f"  {label:<18}{median:>12.2f}{median / reference:>14.2f}{spread:>18}")
        print()


if __name__ == "__main__":
    main()
