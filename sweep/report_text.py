"""Plain-text views for the terminal: the dry run of a study and the status of a results directory."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from gradinv.errors import ConfigError

from .results import ResultsDir
from .study import Study


def dry_run(study: Study, max_trials: int) -> str:
    lines = [f"study {study.name} ({study.path})"]
    for axis, values in study.axes.items():
        lines.append(f"  axis {axis}: {values}")
    lines.append(f"  resources per trial: {study.resources.num_cpus:g} CPU, {study.resources.num_gpus:g} GPU; "
                 f"max_retries {study.max_retries}; timeout {study.timeout or 'none'}")  # fmt: skip
    if study.trials is None:  # counted from the axes; expanding would take minutes and gigabytes
        lines.append(f"{study.points} trials before collapsing, above the cap of {max_trials}; "
                     "not expanded (--max-trials N)")  # fmt: skip
        return "\n".join(lines)
    images = sorted({i for spec in study.trials for i in spec.images})
    lines.append(f"  images: {len(images)} distinct test images")
    if study.collapsed:
        lines.append(f"  {study.collapsed} grid points collapsed into identical trials (settings that do not apply)")
    lines.append(f"{len(study.trials)} trials")
    return "\n".join(lines)


SUMMARY_BY = ["dataset", "trained_epochs", "fl", "local_steps", "images_per_client"]


def psnr_table(frame) -> list[str]:
    """Mean PSNR of the finished trials per setting, the settings that vary only."""
    ok = frame[frame["status"] == "ok"]
    varying = [c for c in SUMMARY_BY if ok[c].nunique(dropna=False) > 1]
    if ok.empty or not varying:
        return []
    grouped = ok.groupby(varying, dropna=False)["psnr"].agg(["count", "mean", "std"]).round(2)
    return ["mean PSNR (dB) of ok trials:", grouped.to_string(), ""]


def status(path: Path, newest_errors: int = 5) -> str:
    if not path.is_dir():
        raise ConfigError("results", str(path), "name an existing results directory (gradinv run --results DIR)")
    results = ResultsDir(path)  # reading only: no lock, no repair
    columns = ["study", "key", "status", "error", "finished_at", *SUMMARY_BY, "psnr"]
    journalled = results.read_journal(columns)  # finished rows a running or killed driver has not batched yet
    batched = results.read(columns)
    replaced = pc.is_in(batched["key"], value_set=journalled["key"])  # a journalled retry replaces its old row
    table = pa.concat_tables([batched.filter(pc.invert(replaced)), journalled])
    if table.num_rows == 0:
        return f"{path}: no rows yet"
    where = f"{len(results.files())} files" + (f" and {journalled.num_rows} in the journal" if journalled.num_rows else "")
    frame = table.to_pandas()
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
