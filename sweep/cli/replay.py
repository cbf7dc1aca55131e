"""`gradinv attack --replay RESULTS KEY`: one row's trial computed again, its metrics beside the stored ones.

A trial's numbers depend on the trials it shared lanes with, so replay rebuilds the row's whole pack
(the rows with its ``pack_id``, in ``lane_index`` order) and runs it as the worker did: on the same
kind of device, with the row's thread count. On the same machine the numbers are then identical.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
import torch

from analysis.load import existing
from gradinv.errors import ConfigError
from gradinv.parameters import layers_of_columns
from gradinv.results.schema import SCHEMA, trial_key
from gradinv.results.text import visible
from gradinv.trial import TrialOutcome, TrialSpec, run_trials
from gradinv.victims import victim_source

COMPARED = ("psnr", "ssim", "mse", "feature_mse", "psnr_gain", "label_accuracy")
PROVENANCE = ("host", "device", "torch_version", "commit")  # where a difference explains differing numbers


@dataclass(frozen=True)
class Replay:
    row: dict
    outcome: TrialOutcome
    notes: tuple[str, ...]  # one line each: why the numbers may differ


def replay(results: str | Path, key: str, *, data_root=None) -> Replay:
    """Run the pack of the row with ``key`` again and return that row and its lane's new outcome."""
    row, pack = find_pack(results, key)
    specs = [spec_from_row(mate) for mate in pack]
    notes = [note for note in (_victim_note(row, specs[pack.index(row)]), _provenance_note(row)) if note]
    outcome = run_pack_again(specs, row, data_root)[pack.index(row)]
    return Replay(row, outcome, tuple(notes))


def find_pack(results: str | Path, key: str) -> tuple[dict, list[dict]]:
    """The row with ``key`` and the rows computed with it, in lane order (the row alone if it ran alone)."""
    store = existing(results, "--replay RESULTS", "no such results directory; give one that `gradinv run` wrote")
    path = store.path
    table = store.read([name for name in SCHEMA.names if not name.endswith("_png")])  # not the images
    found = table.filter(pc.equal(table["key"], key)).to_pylist()
    if not found:
        raise ConfigError("--replay KEY", key, f"no row of {path} has this key; copy one from its 'key' column")
    row = found[0]
    if (row["lanes"] or 1) == 1 or row["pack_id"] is None:  # it ran alone (or its pack ran one by one)
        return row, [row]
    pack = sorted(table.filter(pc.equal(table["pack_id"], row["pack_id"])).to_pylist(), key=lambda r: r["lane_index"])
    if len(pack) != row["lanes"]:
        raise ConfigError(
            "--replay KEY",
            key,
            f"its pack ran {row['lanes']} lanes but {len(pack)} of its rows remain "
            "(the others were run again); replay needs the whole pack",
        )
    return row, pack


def spec_from_row(row: dict) -> TrialSpec:
    """The trial a row records: its non-null parameter columns (null: not applicable, so the default)."""
    values = {f.name: row[f.name] for f in dataclasses.fields(TrialSpec) if f.init and row.get(f.name) is not None}
    values.pop("layers", None)
    if (layers := layers_of_columns(row)) is not None:  # indices, or a name in its own column
        values["layers"] = layers
    spec = TrialSpec(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})
    if trial_key(spec) != row["key"]:
        raise ConfigError(
            "--replay KEY",
            row["key"],
            "its parameters give another key here: the row was written by "
            "another results format; replay it with the gradinv version that wrote it",
        )
    return spec


def device_kind(row: dict) -> str:
    """cpu or cuda: provenance records the CPU as 'cpu (...)' and a GPU by its name."""
    return "cpu" if str(row["device"] or "cpu").startswith("cpu") else "cuda"


def run_pack_again(specs: list[TrialSpec], row: dict, data_root=None) -> list[TrialOutcome]:
    """The pack run as its worker ran it: the row's device kind and thread count (restored afterwards)."""
    device = device_kind(row)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--replay KEY", row["key"], f"it ran on {row['device']}; replay it on a machine with a GPU")
    threads = torch.get_num_threads()
    torch.set_num_threads(row_threads(row))
    try:
        return run_trials(specs, data_root=data_root, device=device)
    finally:
        torch.set_num_threads(threads)


def row_threads(row: dict) -> int:
    """The thread count the row's worker ran with (none recorded: 1)."""
    threads = row["threads"]
    if threads is not None and threads < 1:  # gradinv writes 1 or more: the file was changed since
        raise ConfigError(
            f"threads of row {row['key']}",
            threads,
            "a trial runs on 1 or more threads; correct the row's threads column or replay another row",
        )
    return threads or 1


def _victim_note(row: dict, spec: TrialSpec) -> str | None:
    """Trained victims come from this machine's cache; a recipe that now keys another checkpoint is said."""
    expected = victim_source(spec).row_columns().get("checkpoint_key")
    if expected == row["checkpoint_key"]:
        return None
    return f"the row attacked checkpoint {row['checkpoint_key']}; this cache gives {expected}"


def _provenance_note(row: dict) -> str | None:
    from gradinv.provenance import provenance

    here = provenance(device_kind(row))
    here = {"host": here["host"], "device": here["device"], "torch_version": here["torch"], "commit": here["commit"]}
    differ = [f"{name} {row[name]} -> {here[name]}" for name in PROVENANCE if row[name] not in (None, here[name])]
    return "computed elsewhere: " + ", ".join(differ) if differ else None


def compare(row: dict, outcome: TrialOutcome) -> list[tuple[str, float | None, float | None]]:
    """(metric, stored, new) for the compared means and each image's PSNR."""
    pairs = [(name, row[name], outcome.metrics.get(name)) for name in COMPARED]
    stored, new = row["psnr_per_image"] or [], outcome.per_image.get("psnr", [])
    pairs += [(f"psnr[{i}]", _at(stored, i), _at(new, i)) for i in range(max(len(stored), len(new)))]
    return pairs


def identical(pairs) -> bool:
    return all(_same(stored, new) for _, stored, new in pairs)


def _same(a, b) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return a == b or both_nan


def _at(values: list, index: int):
    return values[index] if index < len(values) else None


def report(result: Replay) -> str:
    """The stored and new metrics side by side (every digit), then whether they are identical."""
    row, outcome = result.row, result.outcome
    pairs = compare(row, outcome)
    lines = [
        f"trial {row['key']}: pack {row['pack_id']}, lane {row['lane_index']} of {row['lanes']}, "
        f"threads {row['threads']}, device {row['device']}"
    ]
    lines += [f"note: {note}" for note in result.notes]
    if row["status"] != "ok":  # its metrics are missing: say why rather than only that they differ
        lines.append(visible(f"the stored trial {row['status']}: {row['error'] or 'no error recorded'}"))
    if outcome.status != "ok":
        lines.append(f"the replay failed: {outcome.error}")
    lines.append(f"{'metric':<16}{'stored':>24}{'new':>24}")
    lines += [
        f"{name:<16}{_text(stored):>24}{_text(new):>24}{'' if _same(stored, new) else '  differs'}"
        for name, stored, new in pairs
    ]
    lines.append("identical: yes" if identical(pairs) else "identical: no")
    return "\n".join(lines)


def _text(value) -> str:
    return "-" if value is None else repr(value)


def command(results: str, key: str, *, data_root=None, out: Path | None = None) -> int:
    """Print the comparison (and write the new outcome's files into ``out``); 0 when identical, else 1."""
    result = replay(results, key, data_root=data_root)
    if out is not None:
        from .attack import write_outcome

        write_outcome(result.outcome, out, device_kind(result.row))
    print(report(result))
    return 0 if result.outcome.status == "ok" and identical(compare(result.row, result.outcome)) else 1
