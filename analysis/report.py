"""`gradinv report`: one self-contained HTML file about a results directory.

The page answers, in order: does each setting leak (PSNR over what an attacker who knows nothing
scores), do trained victims leak as much as untrained ones (paired per image), how leakage moves with
the federation round whose global model was attacked, was the attack budget enough, how leakage moves
with local steps and images per client, what the reconstructions look like; then the tuning history,
every table (collapsed) and the failures. Everything is inline (plots as base64 PNG from matplotlib's
Agg renderer, the trials' own PNGs as data URIs, a small style block), so the file opens offline and
makes no network request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from gradinv.errors import ConfigError
from gradinv.files import partial_name

from . import load, stats, tuning_history
from . import report_federation as federation
from . import report_html as markup
from . import report_images as images
from . import report_privacy as privacy
from . import report_sections as sections
from . import report_summary as summary
from .roles import Roles


def write_report(
    results: str | Path,
    out: str | Path,
    by: list[str] | None = None,
    threshold: float = stats.SUCCESS_PSNR,
    seed: int = 0,
) -> Path:
    out = Path(out)
    if out.is_dir():
        raise ConfigError("--out", str(out), "name a file to write, e.g. report.html")
    load.require_outside("--out", out, results)
    load.result_files(results)  # bad results fail before anything is written
    partial = partial_name(out)
    with _writing(out):  # before the work: a place we cannot write fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
        partial.touch(exist_ok=False)  # a new file, never one (or a link) already there
    try:
        page = build_report(results, by, threshold, seed)
        with _writing(out):
            partial.write_text(page, encoding="utf-8")
            partial.replace(out)  # a reader never sees half a report
    finally:
        partial.unlink(missing_ok=True)
    return out


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """An OSError while writing ``out`` (no such directory, read-only, no permission, disk full) as one line."""
    try:
        yield
    except OSError as error:
        raise ConfigError(
            "--out",
            str(out),
            f"cannot write there ({error.strerror or error}: {error.filename}); name a file in a writable directory",
        ) from None


def build_report(
    results: str | Path, by: list[str] | None = None, threshold: float = stats.SUCCESS_PSNR, seed: int = 0
) -> str:
    frame, roles = load.load_trials(results), load.column_roles(results)
    tuned = tuning_history.tuned_studies(frame)
    runs = frame[~frame["study"].isin(tuned)]  # a tuned study's rows are searched, not designed settings
    by = _check_by(frame, by, roles) if by else roles.varying_settings(runs)
    trial_curves = load.load_curves(results, stats.finished(runs)["key"].tolist())
    leakage = stats.leakage(runs, by, seed, curves=trial_curves)
    parts = [summary.section(frame, runs, results, by, leakage, roles)]
    if runs.empty:
        everything_tuned = markup.note("Every row belongs to a tuned study; see the tuning section.")
        parts.append(markup.section("Results", everything_tuned))
    else:
        parts += [
            sections.leakage(leakage, by, roles),
            sections.trained(runs, by, seed, roles),
            privacy.section(results, runs, by, seed),
            federation.section(runs, by, seed),
            sections.quality(trial_curves, runs, by, leakage, roles),
            sections.gain_against(
                runs, by, "local_steps", "Leakage vs local steps", "Does leakage fall with more local steps?"
            ),
            sections.gain_against(
                runs,
                by,
                "images_per_client",
                "Leakage vs images per client",
                "Does leakage fall with more images per client?",
            ),
            images.one_image(results, runs, by),
            images.grids(results, runs, by),
        ]
    parts.append(sections.tuning(frame, tuned, seed, roles))
    if not runs.empty:
        parts.append(sections.all_tables(runs, by, threshold, seed, roles))
    parts.append(sections.failures(frame))
    return markup.page(f"gradinv report: {', '.join(sorted(frame['study'].unique()))}", parts)


def _check_by(frame: pd.DataFrame, by: list[str], roles: Roles) -> list[str]:
    allowed = ["study", *roles.settings_in(frame)]
    for name in by:
        if name not in allowed:
            raise ConfigError("--by", name, f"name a setting column: {', '.join(allowed)}")
    return list(dict.fromkeys(by))
