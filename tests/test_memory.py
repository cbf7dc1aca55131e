"""Memory: a trial's estimate from its settings, refused in one line before anything runs when the
machine cannot hold it, and asked of Ray per task so that Ray never packs more trials than fit."""

import dataclasses
import types

import pytest
from cli_refusals import assert_attack_refuses

from gradinv import memory
from gradinv.trial import TrialSpec
from sweep import runner
from sweep.cli.main import main
from sweep.study import load_study
from sweep.task_loop import pack_task
from sweep.worker import Pack

LIMIT = 16 * 2**30  # the machine these tests pretend to run on
BASE = "name: big\ndata: {dataset: faces, images: 2}\nfixed: {model: convnet, iterations: 2, %s}\n"
# The probes' settings that were accepted and then OOM-killed workers or asked for a 2.9 TB allocation.
OVERSIZED = {
    "image_size": ("data: {dataset: faces, images: 2, image_size: 60000}\n", "data.image_size", 60000, "a smaller"),
    "width": ("width: 200000", "fixed.width", 200000, "a smaller"),
    "restarts": ("restarts: 1000000", "fixed.restarts", 1000000, "fewer"),
    "imprint_bins": (
        "attack: imprint, threat_model: malicious, imprint_sample: 100, imprint_bins: 1000000000",
        "fixed.imprint_bins",
        1000000000,
        "a smaller",
    ),
    "local_steps": ("fl: fedavg, local_steps: 2147483647", "fixed.local_steps", 2147483647, "fewer"),
}


def study_text(name: str) -> str:
    setting = OVERSIZED[name][0]
    if name == "image_size":  # a data setting: its own line replaces the data line
        return BASE.replace("data: {dataset: faces, images: 2}\n", setting) % "width: 32"
    return BASE % (setting if name == "width" else f"width: 32, {setting}")


@pytest.fixture
def small_machine(monkeypatch):
    monkeypatch.setattr(memory, "machine_memory", lambda: LIMIT)
    monkeypatch.setattr(runner, "connect", lambda *args, **kwargs: pytest.fail("Ray was started"))


@pytest.mark.parametrize("name", list(OVERSIZED))
def test_a_trial_the_machine_cannot_hold_is_refused_in_one_line_before_anything_runs(
    name, small_machine, write_study, tmp_path, capsys
):
    path = write_study(study_text(name))
    results = tmp_path / "results"
    _, where, value, fewer = OVERSIZED[name]
    estimate = memory.trial_bytes(load_study(path).trials[0])
    line = 3 if where.startswith("fixed") else 2
    code = main(["run", str(path), "--results", str(results), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        f"gradinv run: error: {path}:{line}: {where}: {value} is not valid; a trial needs about "
        f"{memory.human(estimate)} of memory (estimated from its settings), more than the 16 GiB this machine "
        f"has; use {fewer} {name}"
    ]
    assert estimate > LIMIT and not results.exists()


def test_gradinv_attack_refuses_what_the_machine_cannot_hold(small_machine, tmp_path, capsys):
    spec = TrialSpec(dataset="faces", image_size=60000)
    line = (
        f"image_size: 60000 is not valid; a trial needs about {memory.human(memory.trial_bytes(spec))} of memory "
        "(estimated from its settings), more than the 16 GiB this machine has; use a smaller image_size"
    )
    assert_attack_refuses(["--dataset", "faces", "--image-size", "60000"], line, tmp_path, capsys)


def test_the_quickstart_fits_and_its_trials_are_estimated_at_a_few_hundred_megabytes():
    study = load_study("studies/quickstart.yaml")
    memory.check_study(study, 1, "cpu", LIMIT, "this machine")  # no error
    own = [memory.trial_bytes(spec) - memory.PROCESS for spec in study.trials]
    assert all(0.2 * 2**30 < size < 0.6 * 2**30 for size in own), [memory.human(s) for s in own]


GROWTH = {  # each setting's values, smallest first
    "image_size": [16, 32, 64, 128],
    "width": [2, 8, 32, 128],
    "restarts": [1, 2, 8, 64],
    "imprint_bins": [256, 4096, 65536],
    "local_steps": [1, 2, 16, 1024],
    "images": [(0,), (0, 1), (0, 1, 2, 3)],
}


@pytest.mark.parametrize("name", list(GROWTH))
def test_the_estimate_grows_with_each_setting(name):
    base = TrialSpec(dataset="faces", width=8, imprint_sample=100)
    if name == "imprint_bins":
        base = dataclasses.replace(base, attack="imprint", threat_model="malicious")
    if name == "local_steps":
        base = dataclasses.replace(base, fl="fedavg")
    sizes = [memory.trial_bytes(dataclasses.replace(base, **{name: value})) for value in GROWTH[name]]
    assert all(smaller < larger for smaller, larger in zip(sizes, sizes[1:])), sizes


def test_more_lanes_need_more_and_a_gpu_keeps_the_tensors_off_the_host():
    spec = TrialSpec(dataset="faces", width=32, restarts=4)
    assert memory.trial_bytes(spec, 1) < memory.trial_bytes(spec, 4)
    assert memory.trial_bytes(spec, 4, "cuda") < memory.trial_bytes(spec, 4, "cpu")


def test_the_setting_named_is_the_one_that_makes_the_trial_large():
    spec = TrialSpec(dataset="faces", width=200000, restarts=2, images=(0, 1))
    assert memory.culprit(spec) == ("width", 200000)
    assert memory.culprit(dataclasses.replace(spec, width=8), lanes=64) == ("lanes", 64)


class FakeRay:
    """Records the options each task is submitted with; two nodes, the larger offering 10 GiB."""

    def __init__(self):
        self.submitted: list[dict] = []

    def nodes(self):
        return [
            {"Alive": True, "Resources": {"CPU": 2, "memory": 10 * 2**30}},
            {"Alive": True, "Resources": {"CPU": 2, "memory": 4 * 2**30}},
            {"Alive": False, "Resources": {"CPU": 64, "memory": 999 * 2**30}},
        ]

    def remote(self, function):
        fake = self

        class Remote:
            def options(self, **options):
                return types.SimpleNamespace(remote=lambda *args: fake.submitted.append({**options, "args": args}))

        return Remote()


def test_pack_task_asks_ray_for_each_packs_estimated_memory_at_most_the_largest_nodes(write_study):
    study = load_study(write_study(BASE % "width: 32"))
    ray = FakeRay()
    task = pack_task(ray, print, study)
    small = Pack("big", ("a", "b"), (study.trials[0],) * 2)
    huge = Pack("big", ("c",), (dataclasses.replace(study.trials[0], restarts=1000000),))
    task.remote(small, "weights")
    task.remote(huge)
    assert [s["memory"] for s in ray.submitted] == [memory.trial_bytes(study.trials[0], 2), 10 * 2**30]
    assert ray.submitted[0]["args"] == (small, "weights") and ray.submitted[0]["num_cpus"] == 1
    assert memory.largest_node_memory(ray) == 10 * 2**30
