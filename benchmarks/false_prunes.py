"""How often does `gradinv tune`'s pruner stop a candidate that would have won? The study's search runs
(or resumes: a finished one re-runs nothing), then every pruned candidate is run to the end on the same
tuning images (sweep.tune.audit.rerun_pruned, in this process, nothing written) and its final objective
is set beside the median of the candidates that completed. A pruned candidate that ends above that
median is a false prune; one that ends above the best completed candidate would have changed the answer.

    .venv/bin/python benchmarks/false_prunes.py                       # the tune quickstart, ~15 minutes
    .venv/bin/python benchmarks/false_prunes.py STUDY.yaml --results DIR
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from sweep.study import load_study
from sweep.tune.audit import rerun_pruned
from sweep.tune.search import best_trial, open_study, storage_url
from sweep.tune.section import tune_searches
from sweep.tune.tuner import tune_study

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", nargs="?", type=Path, default=REPO / "studies" / "tune-quickstart.yaml")
    parser.add_argument(
        "--results", type=Path, default=None, help="the search's results (default: a temporary directory)"
    )
    args = parser.parse_args()
    study = load_study(args.study)
    with tempfile.TemporaryDirectory(prefix="false-prunes-") as scratch:
        results = args.results or Path(scratch) / "results"
        tune_study(study, results, progress=False)
        records = rerun_pruned(study, results)
        best = {s.name: best_trial(open_study(s, storage_url(results, None))) for s in tune_searches(study)}
    print(f"\n{'search':<32} {'candidate':>9} {'pruned at':>9} {'final':>8} {'median':>8} {'best':>8}  verdict")
    for r in records:
        top = best[r["search"]].value if best[r["search"]] else math.nan
        final = math.nan if r["final"] is None else r["final"]
        verdict = "would have won" if final > top else "false prune" if r["false_prune"] else "rightly pruned"
        print(
            f"{r['search']:<32} {r['candidate']:>9} {r['pruned_at']:>7}/8 {final:8.2f} {r['median_completed']:8.2f} "
            f"{top:8.2f}  {verdict}"
        )
    false = sum(r["false_prune"] for r in records)
    rate = f"{false / len(records):.2f}" if records else "n/a"
    print(
        f"\npruned {len(records)}, false prunes {false} (rate {rate}): pruned candidates that finished above the "
        f"median of the completed ones"
    )


if __name__ == "__main__":
    main()
