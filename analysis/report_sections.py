"""The report's sections, in the order of its questions: leakage per setting, trained against untrained
victims, the attack's progress and leakage against local steps and images per client; then the tuning
history, every table and the failures. (The summary is in report_summary, the reconstructions'
sections in report_images.)"""

from __future__ import annotations

import html

import pandas as pd

from . import curves, figures, load, stats, tuning_history
from . import report_html as markup
from .roles import Roles

METRIC_TITLES = {
    "psnr": "PSNR (dB)",
    "psnr_gain": "PSNR gain over the no-information baseline (dB)",
    "ssim": "SSIM",
    "label_accuracy": "Label accuracy",
}


# ---------------------------------------------------------------------------------------------
# Leakage


def leakage(table: pd.DataFrame, by: list[str], roles: Roles) -> str:
    question = "Does each setting reconstruct more than an attacker who knows nothing about the client?"
    note = markup.note(
        "Baseline: the best score of a data-only attacker without the update (the mean image of a pool of "
        "training images, a flat image at the data mean, or the class-mean image for the labels it has). "
        "Gain: a trial's PSNR minus that baseline. A setting leaks when the 95% interval of its median gain "
        "lies above 0 (an order-statistic interval, valid for any distribution; it needs 6 or more trials, "
        "fewer say \u201cn too small\u201d); otherwise it is marked \u201cno leakage detected\u201d, "
        "followed by what the attack's curve says: \u201cconverged\u201d, or \u201cstill improving\u201d "
        "when more budget may leak (see Attack progress). The mean gain with its interval is under All tables."
    )
    parts = [note]
    if table["gain_median"].notna().any():
        parts.append(markup.figure(figures.gain_per_setting(table, by, question), question))
    else:
        parts.append(
            markup.note(
                "These rows carry no baseline (written before baselines were recorded): their "
                "PSNR cannot be read as leakage, so there is nothing to plot."
            )
        )
    shown = table[[*by, "trials", "baseline_psnr", "psnr", "gain_median"]].assign(
        interval=markup.intervals(table["gain_median"], table["median_low"], table["median_high"]),
        verdict=table["verdict"],
    )
    return markup.section("Leakage per setting", *parts, markup.table(shown, "leakage", 2, roles.settings))


# ---------------------------------------------------------------------------------------------
# Trained vs untrained


def trained(runs: pd.DataFrame, by: list[str], seed: int, roles: Roles) -> str:
    title = "Trained vs untrained victims"
    epochs = sorted(stats.finished(runs)["trained_epochs"].dropna().unique())
    if len(epochs) < 2 or epochs[0] != 0:
        which = "untrained" if epochs == [0] else f"trained for {epochs} epochs" if epochs else "none finished"
        return markup.empty_section(title, f"All finished trials share one model state ({which}): nothing to pair.")
    pair_on = [name for name in roles.settings_in(runs) if name not in stats.MODEL_STATE]
    pairs = stats.trained_pairs(runs, pair_on)
    if pairs.empty:
        return markup.empty_section(
            title,
            "No image was attacked under both an untrained and a trained victim with "
            "every other setting equal: nothing to pair.",
        )
    arms = [name for name in stats.MODEL_STATE if pairs[name].nunique(dropna=False) > 1]
    compared = [name for name in by if name not in stats.MODEL_STATE and pairs[name].nunique(dropna=False) > 1]
    table = stats.paired_difference(pairs, [*compared, *arms], seed)
    value = "gain" if table["untrained_gain"].notna().any() else "psnr"
    question = "Do trained victims leak as much as untrained ones? (the same images under both)"
    xlabel = {"gain": "mean PSNR gain over the no-information baseline (dB)", "psnr": "mean PSNR (dB)"}[value]
    panels = [name for name in ("dataset",) if name in compared]
    rows = [name for name in [*compared, *arms] if name not in panels]
    note = markup.note(
        "Each pair is one image attacked under an untrained and a trained victim with every other setting "
        "equal (images, seeds, FL recipe, attack). Difference: trained minus untrained PSNR, averaged over "
        f"pairs, with a BCa bootstrap interval from {stats.MIN_BOOTSTRAP} pairs on."
    )
    shown = table.drop(columns=["untrained_gain", "trained_gain", "ci_low", "ci_high", "reading"]).assign(
        interval=markup.intervals(table["difference"], table["ci_low"], table["ci_high"]), reading=table["reading"]
    )
    plot = figures.paired_arms(table, rows, panels, value, question, xlabel)
    return markup.section(title, note, markup.figure(plot, question), markup.table(shown, "trained", 2, roles.settings))


# ---------------------------------------------------------------------------------------------
# Quality against iterations and against settings


def quality(trial_curves: pd.DataFrame, runs: pd.DataFrame, by: list[str], leakage: pd.DataFrame, roles: Roles) -> str:
    """``trial_curves``: load.load_curves of the finished runs; ``leakage``: stats.leakage read with them."""
    title, question = "Attack progress", "Was the attack budget enough? PSNR of the best restart at each checkpoint"
    done = stats.finished(runs)
    trial_curves = trial_curves[trial_curves["curve_psnr"].map(len) > 0]
    if trial_curves.empty:
        return markup.empty_section(title, "No quality curves in these rows (written before they were recorded).")
    points = (
        trial_curves[["key", "curve_iterations", "curve_psnr"]]
        .explode(["curve_iterations", "curve_psnr"])
        .rename(columns={"curve_iterations": "iteration"})
    )
    points = points.astype({"iteration": int, "curve_psnr": float}).merge(done[["key", "baseline_psnr", *by]], on="key")
    panels, series = figures.split_panels(points, by)
    note = markup.note(
        "Median over a setting's trials of the best restart's PSNR at each checkpoint; the dashed line "
        "is the median no-information baseline of the panel's trials. A curve still rising at the end "
        "means the budget was too short."
    )
    return markup.section(
        title,
        note,
        _panel_cap(points, panels),
        markup.figure(figures.quality_curves(points, panels, series, question), question),
        _curve_verdicts(leakage, by, roles),
    )


def _curve_verdicts(leakage: pd.DataFrame, by: list[str], roles: Roles) -> str:
    note = markup.note(
        f"Each setting's verdict beside its curve's last part (the checkpoints from "
        f"{curves.TAIL_FROM:.0%} of the run on): the rise of its median gain (dB), that rise per 1,000 "
        f"iterations, and the median share by which the best gradient cost fell. A setting without "
        f"leakage is \u201c{stats.SETTLED_WORDS[True]}\u201d when its gain rose by less than "
        f"{curves.PLATEAU_GAIN_DB:g} dB and its cost fell by less than {curves.PLATEAU_COST_FALL:.0%}; "
        f"otherwise it was \u201c{stats.SETTLED_WORDS[False]}\u201d: its \u201cno leakage\u201d is "
        "the budget's, not yet the setting's. Run it again with more iterations before reading it."
    )
    shown = leakage[[*by, "trials", "gain_median", "tail_gain_rise", "gain_slope", "tail_cost_fall", "verdict"]]
    shown = shown.rename(
        columns={
            "gain_median": "median gain",
            "tail_gain_rise": "gain rise at the end",
            "gain_slope": "dB per 1,000 iterations",
            "tail_cost_fall": "cost fall at the end",
        }
    )
    return note + markup.table(shown, "curve-verdicts", 2, roles.settings)


def gain_against(runs: pd.DataFrame, by: list[str], x: str, title: str, question: str) -> str:
    done = stats.finished(runs)
    values = sorted(done[x].dropna().unique())
    if len(values) < 2:
        what = f"One value of {x} ({values[0]})" if values else f"No finished trial has a value of {x}"
        return markup.empty_section(title, f"{what}: nothing to compare.")
    subset = done[done[x].notna()]
    if subset["psnr_gain"].isna().all():
        return markup.empty_section(title, "These rows carry no baseline (written before baselines were recorded).")
    others = [name for name in by if name != x and subset[name].nunique(dropna=False) > 1]
    table = stats.leakage(subset, [*others, x])
    panels, series = figures.split_panels(table, others)
    notes = [
        markup.note("Median PSNR gain over the no-information baseline, its 95% interval shaded (6 or more trials).")
    ]
    if skipped := len(done) - len(subset):
        notes.append(
            markup.note(f"{skipped} finished trials have no {x} (it does not apply to them) and are left out.")
        )
    return markup.section(
        title,
        *notes,
        _panel_cap(table, panels),
        markup.figure(figures.gain_against(table, x, panels, series, question), question),
    )


def _panel_cap(frame: pd.DataFrame, panels: list[str]) -> str:
    count = len(frame.groupby(panels, dropna=False)) if panels else 1
    if count <= figures.MAX_PANELS:
        return ""
    return markup.note(f"Showing {figures.MAX_PANELS} of {count} panels; group more coarsely with --by.")


# ---------------------------------------------------------------------------------------------
# Tuning, the full tables, failures


def tuning(frame: pd.DataFrame, tuned: list[str], seed: int, roles: Roles) -> str:
    title = "Tuning"
    if not tuned:
        return markup.empty_section(title, "No tuning candidates in these results.")
    parts = [
        markup.note(
            "Each candidate's numbers come from its own trials on the tuning images (held-out trials "
            "are shown only in the comparison). Mean PSNR as the driver scores it (an exact copy counts "
            f"as {stats.PSNR_CAP:g} dB); pruned and failed candidates carry the best so far."
        )
    ]
    for study in tuned:
        rows = frame[frame["study"] == study]
        compute = markup.duration(load.compute_seconds(rows).sum())
        parts += [
            f"<h3>{html.escape(study)}</h3>",
            markup.note(f"Compute: {compute} (each trial's share of its task)."),
        ]
        strongest = tuning_history.strongest(rows, roles, seed)
        parts.append(
            _strongest(study, strongest, roles)
            if not strongest.empty
            else markup.note("No held-out comparison in these rows (the driver writes it after the search ends).")
        )
        for setting, group in tuning_history.searches(rows, roles):
            parts.append(_search(study, setting, group, roles))
    return markup.section(title, *parts)


def _search(study: str, setting: dict, rows: pd.DataFrame, roles: Roles) -> str:
    """One search's candidates in the order proposed: a figure and a table."""
    searched, _, _ = tuning_history.split(rows)
    table = tuning_history.history(searched, roles)
    described = ", ".join(f"{name} {value}" for name, value in setting.items())
    question = "Did the search find a stronger attack as it went?"
    baseline = searched["baseline_psnr"].astype(float).mean()
    slug = markup.slug(f"{study} {described}" if setting else study)
    return "".join(
        [
            f"<h4>Search: {html.escape(described)}</h4>" if setting else "",
            markup.figure(figures.tuning_history(table, baseline, question), question),
            markup.table(table, f"tuning-{slug}", 2, roles.settings),
        ]
    )


def _strongest(study: str, table: pd.DataFrame, roles: Roles) -> str:
    """The strongest attack per setting (one row without `per:`), on the held-out clients."""
    shown = table.assign(interval=markup.intervals(table["gain"], table["ci_low"], table["ci_high"]))
    shown = shown.rename(columns={"gain": "gain_over_defaults"}).drop(columns=["ci_low", "ci_high", "unpaired"])
    setting = [c for c in shown.columns if c in roles.settings]  # the per: axes
    order = [
        *setting,
        "family",
        "candidate",
        "clients",
        "baseline_psnr",
        "tuned_psnr",
        "defaults_psnr",
        "gain_over_baseline",
        "gain_over_defaults",
        "interval",
    ]
    note = markup.note(
        f"Strongest attack per setting: the best candidate (its family) against the paper's defaults "
        f"(inverting gradients, tv 1e-4, lr 0.1, step decay) on the same held-out clients, and the "
        f"no-information baseline on them: mean PSNR of each, the gain over the baseline, and the mean "
        f"paired gain over the defaults with a BCa bootstrap interval from {stats.MIN_BOOTSTRAP} "
        f"clients on."
    )
    return (
        "<h4>Strongest attack per setting</h4>"
        + note
        + markup.table(shown[order], f"strongest-{markup.slug(study)}", digits=2, settings=roles.settings)
    )


def all_tables(runs: pd.DataFrame, by: list[str], threshold: float, seed: int, roles: Roles) -> str:
    parts = [
        markup.note(
            f"One observation per finished trial (its metric is the mean over the client's images). "
            f"Interval: {stats.CONFIDENCE:.0%} BCa bootstrap interval of the mean ({stats.RESAMPLES} "
            f"resamples, seed {seed}), none under {stats.MIN_BOOTSTRAP} trials "
            f"(\u201c{stats.TOO_SMALL}\u201d); success rates with Wilson intervals."
        )
    ]
    for metric, table in stats.summarise_all(runs, by, seed).items():
        shown = table.assign(interval=markup.intervals(table["mean"], table["ci_low"], table["ci_high"]))
        shown = shown[[*by, "trials", "mean", "interval", "median", "std"]]
        shown_table = markup.table(shown, metric.replace("_", "-"), settings=roles.settings)
        parts.append(f"<h3>{METRIC_TITLES[metric]}</h3>" + shown_table)
    parts += [
        "<h3>Success rate</h3>",
        markup.note(f"A trial succeeds when its PSNR reaches {threshold:g} dB."),
        markup.table(stats.success_rate(runs, by, threshold), "success", settings=roles.settings),
    ]
    best = stats.best_of_restarts(runs, by, seed)
    parts.append("<h3>Best of restarts</h3>")
    if best is None:
        parts.append(
            markup.note("Each client's images were attacked with one attack seed: nothing to pick the best from.")
        )
    else:
        parts += [
            markup.note("Per client, the highest PSNR over trials that differ only in the attack seed."),
            markup.table(best, "best-of-restarts", settings=roles.settings),
        ]
    body = "\n".join(parts)
    return markup.section(
        "All tables",
        f"<details><summary>Metrics, success rates and best of restarts per setting</summary>{body}</details>",
    )


def failures(frame: pd.DataFrame) -> str:
    failed = frame[frame["status"] == "failed"]
    if failed.empty:
        return markup.empty_section("Failures", "No failed trials.")
    table = failed[["key", "study", "attempt", "error"]].sort_values(["study", "key"])
    return markup.section(
        "Failures",
        markup.note(f"{len(failed)} failed trial{'s' * (len(failed) != 1)}."),
        markup.table(table, "failures"),
    )
