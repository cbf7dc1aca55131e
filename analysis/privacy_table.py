"""The privacy–utility section's table: which defence each finished row ran and how strong, who the
victim was, and per defence and strength the attack's PSNR, the victim's accuracy and the guarantee.

Every defence column may be absent (files written before defences existed) or null (the knob does not
apply): both read as off. A new defence is its knobs, declared ``defence=True`` (gradinv.parameters), and one
more entry in DEFENCES.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradinv.parameters import checkpoint_identity, parameters

from . import figures, stats
from . import report_html as markup

NONE = "none"
VICTIM_STATE = stats.MODEL_STATE  # what makes a victim untrained or trained (and on how much data)
EPSILONS = {"epsilon": "ε (DP-SGD)", "update_epsilon": "ε (update)"}  # outcome column -> its heading
PLAIN, OWN, UNTRAINED, UNRECORDED = "plain victim", "defended checkpoint", "untrained", "not recorded"


def _value(row: Mapping, name: str, off=None):
    """``row[name]``, or ``off`` where the column is absent or null (the knob is off or does not apply)."""
    value = row.get(name)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return off
    return value


def _g(value) -> str:
    return f"{float(value):g}"


# ---------------------------------------------------------------------------------------------
# Which defence a row ran, and how strong


@dataclass(frozen=True)
class Defence:
    """One defence: when a row has it on, its strength in words, an order of strengths (weakest
    first) and the column saying whether the attacker mirrored it in its cost (None: nothing to mirror)."""

    label: str
    on: Callable[[Mapping], bool]
    strength: Callable[[Mapping], str]
    order: Callable[[Mapping], float]
    aware: str | None = None


def _clip(row) -> float | None:
    return _value(row, "clip_update")


def _noise(row) -> float:
    return _value(row, "noise_std", 0.0)


def _keep(row) -> float:
    return _value(row, "keep_fraction", 1.0)


def _bits(row) -> int | None:
    return _value(row, "quant_bits")


def _clients(row) -> int:
    return int(_value(row, "aggregated_clients", 1))


def _dp_on(row) -> bool:
    return _value(row, "dp_clip") is not None or _value(row, "dp_noise", 0.0) > 0


def _pruning_strength(row) -> str:
    scope = " global" if _value(row, "prune_scope") == "global" else ""
    return f"keep {_keep(row) * 100:g}%{scope}"


def _dp_strength(row) -> str:
    clip, rate = _value(row, "dp_clip"), _value(row, "dp_sample_rate", 1.0)
    return (
        f"DP σ={_g(_value(row, 'dp_noise', 0.0))}"
        + (f" C={_g(clip)}" if clip is not None else "")
        + (f" q={_g(rate)}" if rate < 1 else "")
    )


DEFENCES = (
    Defence(
        "update clip+noise",
        lambda r: _clip(r) is not None and _noise(r) > 0,
        lambda r: f"clip {_g(_clip(r))} · noise_std {_g(_noise(r))}",
        lambda r: _noise(r) / _clip(r),
        aware="clip_aware",
    ),
    Defence(
        "update clip",
        lambda r: _clip(r) is not None and _noise(r) == 0,
        lambda r: f"clip {_g(_clip(r))}",
        lambda r: -_clip(r),
        aware="clip_aware",
    ),
    Defence("noise", lambda r: _clip(r) is None and _noise(r) > 0, lambda r: f"noise_std {_g(_noise(r))}", _noise),
    Defence("pruning", lambda r: _keep(r) < 1, _pruning_strength, lambda r: -_keep(r), aware="prune_aware"),
    Defence(
        "quantisation",
        lambda r: _bits(r) is not None,
        lambda r: f"{_bits(r)} bit{'s' * (_bits(r) != 1)} {_value(r, 'quant_rounding', 'stochastic')}",
        lambda r: -_bits(r),
    ),
    Defence("DP-SGD", _dp_on, _dp_strength, lambda r: _value(r, "dp_noise", 0.0), aware="dp_aware"),
    Defence("secure aggregation", lambda r: _clients(r) > 1, lambda r: f"{_clients(r)} clients", _clients),
)


def defence_columns() -> list[str]:
    """The parameters declared a defence (with the seed of their randomness, and whether the victim trained
    under them): the section groups by defence and strength (and says where the accuracy comes from), so
    none of them is part of a row's other settings."""
    return [name for name, declared in parameters().items() if declared.defence]


def _active(row: Mapping) -> list[Defence]:
    return [defence for defence in DEFENCES if defence.on(row)]


def defence_of(row: Mapping) -> str:
    """ "none", one defence's label, or the labels of a combination joined with " + "."""
    return " + ".join(defence.label for defence in _active(row)) or NONE


def strength_of(row: Mapping) -> str:
    """How strong each active defence is, e.g. "noise_std 0.01", "keep 10%", "4 bits stochastic"."""
    return ", ".join(defence.strength(row) for defence in _active(row)) or NONE


def strength_order(row: Mapping) -> tuple:
    """Sorts a defence's strengths weakest first (no defence before any)."""
    return tuple(defence.order(row) for defence in _active(row))


def aware_of(row: Mapping) -> str:
    """Whether the attacker mirrored the defence in its cost: yes, no, "only <defences>" for a part of
    a combination, "–" where no active defence can be mirrored."""
    mirrorable = [defence for defence in _active(row) if defence.aware]
    if not mirrorable:
        return "–"
    mirrored = [defence.label for defence in mirrorable if _value(row, defence.aware, False)]
    if len(mirrored) == len(mirrorable):
        return "yes"
    return f"only {' + '.join(mirrored)}" if mirrored else "no"


def labelled(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The finished rows with their defence, strength, its order, whether the attacker knew it, the
    victim ("untrained", "trained 2 ep") and the other compared settings as one label."""
    done = stats.finished(runs)
    records = done.to_dict("records")
    context = [name for name in by if name not in ("dataset", *VICTIM_STATE, *defence_columns())]
    state = [name for name in VICTIM_STATE if name in done.columns]
    return done.assign(
        defence=[defence_of(row) for row in records],
        strength=[strength_of(row) for row in records],
        order=[strength_order(row) for row in records],
        aware=[aware_of(row) for row in records],
        victim=[figures.setting_label({name: row[name] for name in state}) for row in records],
        setting=[figures.setting_label({name: row.get(name) for name in context}) for row in records],
    )


def _accuracy_source(rows: pd.DataFrame) -> pd.Series:
    """Where each row's accuracy comes from. The defences act on the client's update, not on how the
    victim was trained: a defended row whose checkpoint is the one the undefended rows of the same
    victim used shows the plain victim's accuracy. Only a checkpoint of its own (another key for the
    same victim) measures the defended training's accuracy."""
    identity = [name for name in checkpoint_identity() if name in rows.columns]
    victim = rows[identity].astype(object).fillna("null").astype(str).agg("|".join, axis=1)
    key = rows["checkpoint_key"] if "checkpoint_key" in rows.columns else pd.Series(None, index=rows.index)
    plain = rows["defence"] == NONE
    plain_keys = set(zip(victim[plain], key[plain]))
    plain_victims = set(victim[plain])
    trained = pd.to_numeric(rows["trained_epochs"], errors="coerce").fillna(0) > 0
    recorded = rows["model_accuracy"].notna() if "model_accuracy" in rows.columns else trained & False
    own = [
        not is_plain and v in plain_victims and (v, k) not in plain_keys for is_plain, v, k in zip(plain, victim, key)
    ]
    return pd.Series(np.select([~trained, ~recorded, own], [UNTRAINED, UNRECORDED, OWN], PLAIN), index=rows.index)


# ---------------------------------------------------------------------------------------------
# The table


GROUP = ["dataset", "victim", "setting", "defence", "strength", "aware"]


def privacy_table(runs: pd.DataFrame, by: list[str], seed: int = 0) -> pd.DataFrame | None:
    """Per (dataset, victim, other settings, defence, strength, attacker knew): trials, mean PSNR and its
    95% interval, median gain, the victim's accuracy and where it comes from, epsilon and delta where a
    DP mechanism ran. Only contexts holding a defended row; None when no finished row has a defence on."""
    return summary_table(labelled(runs, by), seed)


def summary_table(rows: pd.DataFrame, seed: int) -> pd.DataFrame | None:
    """:func:`privacy_table` of rows already :func:`labelled`."""
    if not (rows["defence"] != NONE).any():
        return None
    defended = rows.loc[rows["defence"] != NONE, ["dataset", "victim", "setting"]].drop_duplicates()
    rows = rows.merge(defended, on=["dataset", "victim", "setting"])  # undefended rows only beside defended ones
    rows = rows.assign(accuracy_from=_accuracy_source(rows))
    table = [_summary(key, group, seed) for key, group in rows.groupby(GROUP, sort=False, dropna=False)]
    table = pd.DataFrame(table).sort_values(["dataset", "epochs", "victim", "setting", "rank", "order", "aware"])
    return table.drop(columns=["rank", "epochs"]).reset_index(drop=True)


def _summary(key: tuple, group: pd.DataFrame, seed: int) -> dict:
    psnr = group["psnr"].astype(float)
    low, high = stats.mean_interval(psnr, seed)
    defence = key[GROUP.index("defence")]
    row = {
        **dict(zip(GROUP, key)),
        "rank": defence_rank(defence),
        "order": group["order"].iloc[0],
        "epochs": pd.to_numeric(group["trained_epochs"], errors="coerce").max(),  # untrained victims first
        "trials": len(group),
        "psnr": psnr.mean(),
        "ci_low": low,
        "ci_high": high,
        "gain_median": group["psnr_gain"].astype(float).median() if "psnr_gain" in group else math.nan,
        "baseline_psnr": group["baseline_psnr"].astype(float).median() if "baseline_psnr" in group else math.nan,
        "accuracy": group["model_accuracy"].astype(float).mean() if "model_accuracy" in group else math.nan,
        "accuracy_from": ", ".join(sorted(group["accuracy_from"].unique())),
        "delta": _one_or_range(group["dp_delta"]) if "dp_delta" in group else "–",
        "accountant": ", ".join(sorted(group["accountant"].dropna().unique())) if "accountant" in group else "",
    }
    row.update({name: _one_or_range(group[name]) if name in group else "–" for name in EPSILONS})
    return row


def defence_rank(defence: str) -> int:
    """No defence first, then the defences in DEFENCES' order, combinations after."""
    labels = [NONE, *(defence.label for defence in DEFENCES)]
    return labels.index(defence) if defence in labels else len(labels)


def _one_or_range(values: pd.Series) -> str:
    """A group's value (epsilon is one number per setting) as text; "low–high" where it varies."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "–"
    low, high = (_number(v) for v in (values.min(), values.max()))
    return low if low == high else f"{low}–{high}"


def _number(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.4g}"


def shown_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the page shows it: accuracy as text ("untrained" where the victim is), the interval
    in words, and only the columns some row fills."""
    accuracy = [
        UNTRAINED if source == UNTRAINED else markup.cell(value, 3)
        for value, source in zip(table["accuracy"], table["accuracy_from"])
    ]
    shown = pd.DataFrame(
        {
            "dataset": table["dataset"],
            "victim": table["victim"],
            "setting": table["setting"],
            "defence": table["defence"],
            "strength": table["strength"],
            "attacker knew": table["aware"],
            "trials": table["trials"],
            "mean psnr": table["psnr"],
            "interval": markup.intervals(table["psnr"], table["ci_low"], table["ci_high"]),
            "median gain": table["gain_median"],
            "accuracy": accuracy,
            "accuracy from": table["accuracy_from"],
            **{heading: table[name] for name, heading in EPSILONS.items()},
            "δ": table["delta"],
            "accountant": table["accountant"],
        }
    )
    optional = ("setting", *EPSILONS.values(), "accountant")
    empty = [name for name in optional if shown[name].isin(["all", "–", ""]).all()]
    if all(heading in empty for heading in EPSILONS.values()):
        empty.append("δ")  # a delta says something only beside its epsilon
    if (table["aware"] == "–").all():
        empty.append("attacker knew")
    return shown.drop(columns=empty)
