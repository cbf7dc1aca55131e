"""Budget where it pays (max_iterations): after `iterations`, a trial whose best gradient cost still fell by
5% or more over its round's last quarter runs another round, twice as long, while a whole round fits in
max_iterations; the decision reads only the cost (what the attacker sees), each lane stops on its own, and
each ends with its round end of least cost. Without max_iterations nothing changes (the replay tests pin
that)."""

import pytest
import torch

from gradinv.attacks.base import SETTLED_COST_FALL
from gradinv.attacks.inverting import Budget
from gradinv.errors import ConfigError
from gradinv.trial.run import run_trials
from gradinv.trial.spec import TrialSpec
from sweep.cli.main import main

PERIOD = 8  # the first round; the next are 16 and 32 long
RECIPE = {"lr": 0.3, "decay": "cosine", "init": "rand"}


def feed(budget: Budget, costs_per_iteration: list[list[float]]) -> list[torch.Tensor]:
    """Drive ``budget`` with each iteration's best cost per lane; the images are the iteration number."""
    x = torch.zeros(len(budget.stopped_at), 1)  # one restart per lane
    for done, costs in enumerate(costs_per_iteration, start=1):
        if not budget.running():
            break
        x = budget.only_running(torch.full_like(x, float(done)), x)
        x = budget.observe(done, torch.tensor(costs), x)
    return x


def round_costs(start: float, fall: float, length: int = PERIOD) -> list[float]:
    """A round's best cost: ``start`` until its last quarter, then falling by ``fall`` to its end."""
    tail = length // 4
    return [start] * (length - tail) + [start * (1 - fall * (k + 1) / tail) for k in range(tail)]


def test_a_lane_still_falling_runs_another_round_and_a_settled_one_stops():
    budget = Budget(lanes=2, restarts=1, iterations=PERIOD, cap=7 * PERIOD, device="cpu")  # rounds 8, 16, 32
    falling = round_costs(1.0, 0.5) + round_costs(0.5, 0.2, 2 * PERIOD) + round_costs(0.4, 0.2, 4 * PERIOD)
    settled = round_costs(1.0, SETTLED_COST_FALL / 2, 7 * PERIOD)
    x = feed(budget, [list(pair) for pair in zip(falling, settled)])
    assert budget.stopped_at == [7 * PERIOD, PERIOD]  # three whole rounds; the first round
    assert x[1].item() == PERIOD  # a stopped lane's images stay where it stopped while the other runs on
    assert budget.kept.flatten().tolist() == [7 * PERIOD, PERIOD]  # each lane's round end of least cost


def test_a_round_that_undoes_progress_is_not_the_one_kept():
    budget = Budget(lanes=1, restarts=1, iterations=PERIOD, cap=3 * PERIOD, device="cpu")
    first, worse = round_costs(1.0, 0.5), round_costs(0.9, 0.1, 2 * PERIOD)  # ends at 0.5, then at 0.81
    feed(budget, [[cost] for cost in first + worse])
    assert budget.stopped_at == [3 * PERIOD] and budget.kept.item() == PERIOD


def test_a_cap_between_rounds_runs_whole_rounds_only():
    budget = Budget(lanes=1, restarts=1, iterations=PERIOD, cap=3 * PERIOD - 1, device="cpu")  # 8 + 16 > 23
    feed(budget, [[cost] for cost in round_costs(1.0, 0.5) + round_costs(0.5, 0.5, 2 * PERIOD)])
    assert budget.stopped_at == [PERIOD]  # still falling, but the next round would end past the cap


def test_checkpoints_are_evenly_spaced_in_each_round():
    budget = Budget(lanes=1, restarts=1, iterations=PERIOD, cap=3 * PERIOD, device="cpu")
    seen = []
    for done, cost in enumerate(round_costs(1.0, 0.5) + round_costs(0.5, 0.5, 2 * PERIOD), start=1):
        if budget.checkpoint(done, 4):
            seen.append(done)
        budget.observe(done, torch.tensor([cost]), torch.zeros(1, 1))
    assert seen == [2, 4, 6, 8, 12, 16, 20, 24]


def test_lanes_of_one_pack_spend_their_own_iterations_and_rows_record_them():
    """Face 0 at a small TV weight still improves after 20 iterations; face 1 at a large one has settled."""
    specs = [
        TrialSpec(
            dataset="faces", images=(i,), image_size=16, width=4, iterations=20, max_iterations=60, tv=tv, **RECIPE
        )
        for i, tv in ((0, 1e-4), (1, 1e-2))
    ]
    improving, settled = run_trials(specs)
    assert improving.curve[-1][0] == 60 and settled.curve[-1][0] == 20  # rounds of 20 and 40; one round
    assert len(improving.quality_curve) == len(improving.curve) and len(settled.quality_curve) == 8


def test_max_iterations_below_iterations_is_one_line(capsys, tmp_path):
    with pytest.raises(ConfigError, match="max_iterations"):
        TrialSpec(dataset="faces", images=(0,), iterations=20, max_iterations=10)
    flags = ["--dataset", "faces", "--iterations", "20", "--max-iterations", "10", "--out", str(tmp_path / "out")]
    code = main(["attack", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not (tmp_path / "out").exists()
    assert "max_iterations: 10" in err[0] and "at least iterations (20)" in err[0]
