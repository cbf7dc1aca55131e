"""Plain-text views for the terminal: the dry run of a study and the status of a results directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from analysis import stats
from analysis.load import CURVES, existing
from gradinv.results.schema import REPETITION, ROLE_KEY, SCHEMA, SETTING
from gradinv.results.text import visible

if TYPE_CHECKING:  # sweep.study imports torch through gradinv.trial: `gradinv status` does without
    from ..study import Study


# Characters that steer a terminal or reorder text rather than show: C0 (ESC, BEL, newlines...), DEL,
# C1 (CSI, OSC...) and the bidirectional overrides and isolates.
def _visible_cells(column):
    """A column with every string in it passed through ``visible`` (other values as they are)."""
    if column.dtype.kind != "O":  # text, categories or Python objects: the columns that can hold a string
        return column
    return column.map(lambda value: visible(value) if isinstance(value, str) else value)


def dry_run(study: Study, max_trials: int) -> str:
    lines = [f"study {study.name} ({study.path})"]
    for axis, values in study.axes.items():
        lines.append(f"  axis {axis}: {values}")
    lines.append(
        f"  resources per trial: {study.resources.num_cpus:g} CPU, {study.resources.num_gpus:g} GPU; "
        f"max_retries {study.max_retries}; timeout {study.timeout or 'none'}"
    )
    if study.trials is None:  # counted from the axes; expanding would take minutes and gigabytes
        lines.append(
            f"{study.points} trials before collapsing, above the cap of {max_trials}; not expanded (--max-trials N)"
        )
        return "\n".join(lines)
    images = sorted({i for spec in study.trials for i in spec.images})
    where = (
        "positions in each attacked federation client's images"
        if any(spec.round is not None for spec in study.trials)
        else "test images"
    )
    lines.append(f"  images: {len(images)} distinct {where}")
    if study.collapsed:
        lines.append(f"  {study.collapsed} grid points collapsed into identical trials (settings that do not apply)")
    lines.append(f"{len(study.trials)} trials")
    return "\n".join(lines)


# The settings a status table may group by: the schema's, less those that only tell repetitions apart
GROUPING = [f.name for f in SCHEMA if f.metadata[ROLE_KEY] == SETTING.encode() and f.name not in REPETITION]
SHOWN = ["psnr", "baseline_psnr", "psnr_gain"]


def psnr_table(frame) -> list[str]:
    """PSNR, the no-information baseline and the gain over it, per setting (the settings that vary), with
    the report's verdict: leakage, or no leakage detected and whether the attack's curve had settled."""
    ok = frame[frame["status"] == "ok"].copy()
    for column in GROUPING:  # lists (layers) as text, so that they group
        ok[column] = ok[column].map(
            lambda value: value if value is None or isinstance(value, (int, float, str)) else repr(value)
        )
    # a null means "does not apply" (local steps under FedSGD), which another setting already says
    varying = [c for c in GROUPING if ok[c].nunique() > 1]
    if ok.empty or not varying:
        return []
    table = stats.leakage(ok, varying, curves=ok[["key", *CURVES]])
    shown = {"trials": "trials", "psnr": "psnr", "baseline_psnr": "baseline", "gain_median": "median_gain"}
    grouped = table.set_index(varying)[[*shown, "verdict"]].rename(columns=shown).round(2)
    return [
        "ok trials: mean PSNR, mean no-information baseline, median gain over it (dB) and the verdict:",
        grouped.to_string(),
        "",
    ]


def status(path: Path | str, newest_errors: int = 5) -> str:
    results = existing(path, "results", "name an existing results directory (gradinv run --results DIR)")
    columns = ["study", "key", "status", "error", "finished_at", "zero_update", *GROUPING, *SHOWN, *CURVES]
    journalled = results.read_journal(columns)  # finished rows a running or killed driver has not batched yet
    batched = results.read(columns)
    replaced = pc.is_in(batched["key"], value_set=journalled["key"])  # a journalled retry replaces its old row
    table = pa.concat_tables([batched.filter(pc.invert(replaced)), journalled])
    if table.num_rows == 0:
        return f"{path}: no rows yet"
    where = f"{len(results.files())} files" + (
        f" and {journalled.num_rows} in the journal" if journalled.num_rows else ""
    )
    frame = table.to_pandas().apply(_visible_cells)  # every string below comes from the files
    lines = [f"{path}: {len(frame)} rows in {where}"]
    counts = frame.groupby(["study", "status"]).size().unstack(fill_value=0)
    lines += ["", counts.to_string(), ""]
    lines += psnr_table(frame)
    failed = frame[frame["status"] == "failed"].sort_values("finished_at", ascending=False)
    if len(failed):
        lines.append(f"newest errors ({min(newest_errors, len(failed))} of {len(failed)}):")
        for row in failed.head(newest_errors).itertuples():
            lines.append(f"  {row.key} {row.finished_at:%Y-%m-%d %H:%M:%S}: {row.error}")
    return "\n".join(lines)
