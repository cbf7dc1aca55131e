"""A "no leakage detected" reads the attack's curve: the report and `gradinv status` say "converged" when the
gain and the best gradient cost had both settled over the run's last quarter, and "still improving" (more
budget may leak) when either was still moving. Curves are constructed, so each case is exact."""

import html
from datetime import datetime, timezone

import pandas as pd
import pytest

from analysis import curves, stats
from analysis.load import load_curves
from analysis.report import build_report
from gradinv.results.schema import parameter_columns, trial_key
from gradinv.results.store import ResultsDir
from gradinv.trial import TrialSpec
from sweep.cli.main import main

CHECKPOINTS = [38, 75, 112, 150, 188, 225, 262, 300]  # 8 evenly spaced, as the attacks record them
CURVE_COLUMNS = ["curve_iterations", "curve_costs", "curve_psnr", "curve_gain"]


def curve_columns(end_gain: float, tail_rise: float, cost_fall: float) -> dict:
    """A curve reaching ``end_gain`` whose gain rose by ``tail_rise`` dB and whose best cost fell by the share
    ``cost_fall`` over the last quarter (from checkpoint 225 to 300)."""
    at_tail = end_gain - tail_rise
    gains = [at_tail - 8 + 8 * (k + 1) / 6 for k in range(6)] + [at_tail + tail_rise / 2, end_gain]
    costs = [1.0 / (k + 1) for k in range(6)]
    costs += [costs[-1] * (1 - cost_fall / 2), costs[-1] * (1 - cost_fall)]
    baseline = 10.0
    return {
        "curve_iterations": CHECKPOINTS,
        "curve_costs": costs,
        "curve_psnr": [baseline + gain for gain in gains],
        "curve_gain": gains,
        "baseline_psnr": baseline,
        "psnr": baseline + end_gain,
        "psnr_gain": end_gain,
    }


# setting (its TV weight) -> (end gains of its trials, the tail's gain rise, the tail's cost fall, verdict)
CASES = {
    1e-4: ([9.0, 10.0, 11.0, 12.0, 13.0, 14.0], 0.1, 0.01, stats.LEAKS),
    1e-3: ([-3.0, -2.5, -2.0, -1.5, -1.0, 0.5], 0.2, 0.01, stats.CONVERGED),
    1e-2: ([-3.0, -2.5, -2.0, -1.5, -1.0, 0.5], 1.6, 0.20, stats.STILL_IMPROVING),  # the gain rises
    1e-1: ([-3.0, -2.5, -2.0, -1.5, -1.0, 0.5], 0.1, 0.30, stats.STILL_IMPROVING),  # only the cost falls
}


def rows() -> list[dict]:
    found = []
    for tv, (gains, rise, fall, _) in CASES.items():
        for image, gain in enumerate(gains):
            spec = TrialSpec(dataset="faces", images=(image,), image_size=8, width=2, iterations=300, tv=tv)
            found.append(
                {
                    **parameter_columns(spec),
                    "study": "curves",
                    "key": trial_key(spec),
                    "status": "ok",
                    "attempt": 1,
                    "finished_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
                    **curve_columns(gain, rise, fall),
                }
            )
    return found


def test_each_verdict_is_read_from_its_constructed_curve():
    frame = pd.DataFrame(rows())
    table = stats.leakage(frame, ["tv"], curves=frame[["key", *CURVE_COLUMNS]])
    assert dict(zip(table["tv"], table["verdict"])) == {tv: case[3] for tv, case in CASES.items()}
    rising = table.set_index("tv").loc[1e-2]
    assert rising["tail_gain_rise"] == pytest.approx(1.6)
    assert rising["gain_slope"] == pytest.approx(1.6 / 75 * 1000)  # dB per 1,000 iterations over 225 -> 300
    assert rising["tail_cost_fall"] == pytest.approx(0.20)


def test_rows_written_before_curve_gain_read_it_from_psnr_less_their_baseline():
    frame = pd.DataFrame(rows()).drop(columns=["curve_gain"])
    table = stats.leakage(frame, ["tv"], curves=frame[["key", "curve_iterations", "curve_costs", "curve_psnr"]])
    assert dict(zip(table["tv"], table["verdict"])) == {tv: case[3] for tv, case in CASES.items()}


def test_without_curves_a_no_leakage_says_only_that():
    frame = pd.DataFrame(rows())
    empty = frame[["key"]].assign(curve_iterations=[[]] * len(frame), curve_costs=None, curve_psnr=None)
    for given in (None, empty):
        verdicts = set(stats.leakage(frame, ["tv"], curves=given)["verdict"])
        assert verdicts == {stats.LEAKS, stats.NO_LEAKAGE}


def test_a_setting_counts_its_exactly_zero_updates_in_its_verdict_in_status_and_report(tmp_path, capsys):
    found = [{**row, "zero_update": 6 <= i < 10} for i, row in enumerate(rows())]  # four of six at TV 1e-3
    frame = pd.DataFrame(found)
    verdicts = stats.leakage(frame, ["tv"], curves=frame[["key", *CURVE_COLUMNS]]).set_index("tv")["verdict"]
    counted = f"{stats.CONVERGED}; 4 of 6 updates exactly zero (nothing to attack)"
    assert verdicts[1e-3] == counted and verdicts[1e-4] == stats.LEAKS
    with ResultsDir(tmp_path / "r") as directory:
        directory.write(found)
    assert main(["status", str(tmp_path / "r")]) == 0
    assert sum(line.endswith(counted) for line in capsys.readouterr().out.splitlines()) == 1
    assert html.escape(counted) in build_report(tmp_path / "r")


def test_the_last_part_of_a_short_curve_is_its_last_two_checkpoints():
    assert curves.tail_start([150, 300]) == 0
    assert curves.tail_start(CHECKPOINTS) == 5  # 225 = 0.75 * 300
    assert curves.tail_start([100, 200, 250, 290, 300]) == 2  # 250 >= 225


def test_status_shows_the_three_verdicts(tmp_path, capsys):
    with ResultsDir(tmp_path / "r") as directory:
        directory.write(rows())
    assert main(["status", str(tmp_path / "r")]) == 0
    table = capsys.readouterr().out.split("and the verdict:\n")[1].splitlines()
    shown = {float(line.split()[0]): line for line in table[2:6]}
    for tv, (*_, verdict) in CASES.items():
        assert shown[tv].endswith(verdict), (tv, shown[tv])


def test_the_report_shows_each_verdict_beside_the_curves(tmp_path):
    with ResultsDir(tmp_path / "r") as directory:
        directory.write(rows())
    page = build_report(tmp_path / "r")
    progress = page.split("<h2>Attack progress</h2>")[1]
    table = progress.split("id=curve-verdicts")[1].split("</table>")[0]
    for verdict in (stats.LEAKS, stats.CONVERGED, stats.STILL_IMPROVING):
        assert html.escape(verdict) in table or verdict in table
    assert table.count(stats.STILL_IMPROVING.split(" \u2014")[0]) == 2
    assert "21.33" in table  # the rising setting's slope: 1.6 dB over 75 iterations


def test_no_finished_trial_reads_no_curves_and_no_verdict_from_them(tmp_path):
    failed = [{**row, "status": "failed"} for row in rows()]
    with ResultsDir(tmp_path / "r") as directory:
        directory.write(failed)
    assert load_curves(tmp_path / "r", []).empty
    assert "No quality curves" in build_report(tmp_path / "r")
