"""Plain-text views for the terminal: the dry run of a study and the status of a results directory."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc

from gradinv.errors import ConfigError

from .results import ResultsDir
from .study import Study


def dry_run(study: Study) -> str:
    lines = [f"study {study.name} ({study.path})"]
    for axis, values in study.axes.items():
        lines.append(f"  axis {axis}: {values}")
    images = sorted({i for spec in study.trials for i in spec.images})
    lines.append(f"  images: {len(images)} distinct test images")
    lines.append(f"  resources per trial: {study.resources.num_cpus:g} CPU, {study.resources.num_gpus:g} GPU; "
                 f"max_retries {study.max_retries}; timeout {study.timeout or 'none'}")  # fmt: skip
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
    table = results.read(["study", "key", "status", "error", "finished_at", *SUMMARY_BY, "psnr"])
    if table.num_rows == 0:
        return f"{path}: no rows yet"
    lines = [f"{path}: {table.num_rows} rows in {len(results.files())} files"]
    frame = table.to_pandas()
    counts = frame.groupby(["study", "status"]).size().unstack(fill_value=0)
    lines += ["", counts.to_string(), ""]
    lines += psnr_table(frame)
    failed = table.filter(pc.equal(table["status"], "failed")).to_pandas().sort_values("finished_at", ascending=False)
    if len(failed):
        lines.append(f"newest errors ({min(newest_errors, len(failed))} of {len(failed)}):")
        for row in failed.head(newest_errors).itertuples():
            lines.append(f"  {row.key} {row.finished_at:%Y-%m-%d %H:%M:%S}: {row.error}")
    return "\n".join(lines)
