"""`gradinv export --format hf`: the reconstructions as a Hugging Face dataset, with its card.

``OUT/data/train-NNNNN.parquet`` holds one row per reconstructed image: ``truth`` and ``reconstruction``
as ``datasets`` Image features (Arrow ``struct<bytes: binary, path: string>``, declared in the files'
``huggingface`` schema metadata, so the loader decodes them without being told), then the PNG index's
columns (analysis.export) with list settings as lists, and the code version that made the row.
``OUT/README.md`` is the dataset card: YAML front matter as the Hub reads it (configs, features,
licence), then what the images are, where they came from and how to load them. Trials are streamed a
batch at a time; a shard closes past ``shard_bytes`` of PNG data. The shards are written into a new
folder that replaces ``OUT/data`` whole, so a reader never sees two exports' shards mixed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from gradinv.errors import ConfigError
from gradinv.files import partial_name, write_atomic

from . import load
from .export import image_entries, image_name, prepare
from .roles import Roles

DATA_DIR = "data"
SHARD_NAME, SHARD = "train-{:05d}.parquet", re.compile(r"train-\d{5}\.parquet")
SHARD_BYTES = 500_000_000  # PNG bytes per Parquet file: datasets' push_to_hub shards at 500 MB too
ROW_GROUP = 100  # rows per row group, as datasets wrote image datasets: a reader fetches a few images at a time
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image storage
PROVENANCE = ("gradinv_version", "commit")
_DTYPES = {"double": "float64", "float": "float32"}  # Arrow names datasets spells otherwise


@dataclass
class Tally:
    """What the card says about the rows: trials and images per study, code versions, datasets."""

    trials: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)  # (gradinv version, commit) -> images
    datasets: set = field(default_factory=set)
    shards: int = 0
    download_size: int = 0  # the Parquet files' bytes
    num_bytes: int = 0  # the rows' bytes in memory, as datasets counts a split

    def add(self, row: dict, images: int) -> None:
        self.trials[row["study"]] += 1
        self.images[row["study"]] += images
        self.versions[(row.get("gradinv_version"), row.get("commit"))] += images
        self.datasets.add(row.get("dataset"))


def export_hf(results: str | Path, to: str | Path, shard_bytes: int = SHARD_BYTES) -> Tally:
    """Write every finished trial's images under ``to`` as a Hugging Face dataset; returns its tally."""
    to = Path(to)
    if not load.finished_keys(results):
        raise _no_images(results)
    _require_replaceable(to / DATA_DIR)
    for leftover in to.glob(f".{DATA_DIR}.*.tmp"):  # staged by an export that was killed: no reader sees it
        shutil.rmtree(leftover, ignore_errors=True)  # refuses a link, so it deletes only what it names
    staged = partial_name(to / DATA_DIR)
    prepare(results, to, staged.name)
    try:
        source = load.dataset(results).schema
        roles, tally = Roles.of_schema(source), Tally()
        schema = parquet_schema(roles, source)
        _write_shards(_row_groups(results, roles, schema, tally), schema, staged, shard_bytes, tally)
        if not tally.shards:  # finished trials without images
            raise _no_images(results)
        _replace(staged, to / DATA_DIR)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    write_atomic(to / "README.md", card(tally, schema, f"{DATA_DIR}/train-*.parquet").encode())
    return tally


def _no_images(results: str | Path) -> ConfigError:
    """``datasets`` cannot load a split without rows, so results without images are refused."""
    return ConfigError("results", str(results), "no finished trial in it holds images; export once trials finish")


def _require_replaceable(data: Path) -> None:
    """``data`` is replaced whole, so it may hold an earlier export's shards and nothing else."""
    if not (data.exists() or data.is_symlink()):
        return
    plain = data.is_dir() and not data.is_symlink()
    foreign = [path.name for path in data.iterdir() if not SHARD.fullmatch(path.name)] if plain else []
    if not plain or foreign:
        what = f"holds files an export did not write ({', '.join(foreign[:3])})" if plain else "is not a folder"
        raise ConfigError("--to", str(data.parent), f"{data} {what}, and exporting replaces it; name another directory")


def parquet_schema(roles: Roles, source: pa.Schema) -> pa.Schema:
    """The dataset's columns, typed as the results type them, with datasets' features in the metadata."""
    types = {
        "position": pa.int32(),
        "image": source.field("images").type.value_type,
        "trial_psnr": source.field("psnr").type,
        "truth": IMAGE,
        "reconstruction": IMAGE,
    }
    names = _entry(_blank_row(source), roles)[0].keys()
    fields = [pa.field(name, types.get(name) or source.field(name).type) for name in names]
    features = {f.name: feature(f.type) for f in fields}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def _blank_row(source: pa.Schema) -> dict:
    """A one-image trial whose every column is null: its entry has the columns every entry has."""
    return {**dict.fromkeys(source.names), "truth_png": [b""], "reconstruction_png": [b""]}


def feature(kind: pa.DataType) -> dict:
    """``kind`` as a datasets feature, in the JSON form its files' metadata holds. Lists are written as
    Sequence, which datasets before 4.0 read and later ones read as List."""
    if kind == IMAGE:
        return {"_type": "Image"}
    if pa.types.is_list(kind):
        return {"feature": feature(kind.value_type), "_type": "Sequence"}
    return {"dtype": _DTYPES.get(str(kind), str(kind)), "_type": "Value"}


def _entry(row: dict, roles: Roles) -> list[dict]:
    """The dataset's rows of one trial: the PNG index's entries with the images in place of their files."""

    def images(position: int, truth: bytes, recon: bytes) -> dict:
        return {
            kind: {"bytes": png, "path": Path(image_name(row["key"], position, kind)).name}
            for kind, png in (("truth", truth), ("reconstruction", recon))
        }

    provenance = {name: row.get(name) for name in PROVENANCE}
    return [{**entry, **provenance} for entry in image_entries(row, roles, images)]


def _row_groups(results: str | Path, roles: Roles, schema: pa.Schema, tally: Tally) -> Iterator[pa.Table]:
    """The rows, ROW_GROUP at a time, from trials read a batch at a time."""
    group = []
    for row in load.iter_image_rows(results):
        entries = _entry(row, roles)
        tally.add(row, len(entries))
        group += entries
        while len(group) >= ROW_GROUP:
            yield pa.Table.from_pylist(group[:ROW_GROUP], schema=schema)
            group = group[ROW_GROUP:]
    if group:
        yield pa.Table.from_pylist(group, schema=schema)


def _write_shards(groups: Iterator[pa.Table], schema: pa.Schema, folder: Path, limit: int, tally: Tally) -> None:
    """Shards of about ``limit`` PNG bytes each (at least one row group), each written whole."""
    pending = next(groups, None)

    def fill(sink) -> None:
        nonlocal pending
        size = 0
        with pq.ParquetWriter(sink, schema) as writer:
            while pending is not None and (size == 0 or size < limit):
                writer.write_table(pending, row_group_size=ROW_GROUP)
                size += _png_bytes(pending)
                tally.num_bytes += pending.nbytes
                pending = next(groups, None)

    while pending is not None:
        shard = folder / SHARD_NAME.format(tally.shards)
        write_atomic(shard, fill)
        tally.shards += 1
        tally.download_size += shard.stat().st_size


def _png_bytes(table: pa.Table) -> int:
    return sum(table[name].combine_chunks().field("bytes").nbytes for name in ("truth", "reconstruction"))


def _replace(staged: Path, data: Path) -> None:
    """Put ``staged`` in place of ``data`` by renames: the old shards leave before the new arrive."""
    old = partial_name(data)
    if data.exists():
        os.replace(data, old)
    try:
        os.replace(staged, data)
    except OSError:
        if old.exists():  # the earlier export stays
            os.replace(old, data)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- the card ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A dataset's images as the card states them: what they are, their licence, the Hub's id for it."""

    images: str
    licence: str
    hub: str


SOURCES = {
    "fashion-mnist": Source("Fashion-MNIST test images (Zalando Research)", "MIT licence", "mit"),
    "mnist": Source("MNIST test images (LeCun, Cortes, Burges)", "no licence stated by its publishers", "unknown"),
    "cifar10": Source("CIFAR-10 test images (Krizhevsky)", "no licence stated by its publishers", "unknown"),
    "cifar100": Source("CIFAR-100 test images (Krizhevsky)", "no licence stated by its publishers", "unknown"),
    "imagenet": Source(
        "ImageNet validation images", "ImageNet's terms of access: non-commercial research and education", "other"
    ),
    "faces": Source(
        "scikit-image's `lfw_subset`: faces from Labeled Faces in the Wild, photographs of real people (mind "
        "their privacy before publishing), and non-face crops of the same photographs",
        "no licence stated by scikit-image or Labeled Faces in the Wild",
        "unknown",
    ),
    "photos": Source(
        "six of scikit-image's photographs (astronaut, chelsea, coffee, rocket, immunohistochemistry, "
        "hubble_deep_field)",
        "as scikit-image states: astronaut (NASA), rocket (SpaceX) and hubble_deep_field (NASA) public domain, "
        "chelsea and coffee CC0, immunohistochemistry no known copyright restrictions",
        "other",
    ),
}
FOLDER = Source("images from an image folder", "the licence of the folder's images, which its owner states", "other")
UNKNOWN = Source("images from a dataset gradinv does not describe", "unknown", "unknown")
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


def source(dataset: str | None) -> Source:
    if dataset and dataset.startswith("folder:"):
        return FOLDER
    return SOURCES.get(dataset, UNKNOWN)


def card(tally: Tally, schema: pa.Schema, pattern: str) -> str:
    """The dataset card: YAML front matter as the Hub reads it, then the text."""
    return (
        f"---\n{yaml.safe_dump(_front_matter(tally, schema, pattern), sort_keys=False)}---\n\n{_text(tally, pattern)}"
    )


def _front_matter(tally: Tally, schema: pa.Schema, pattern: str) -> dict:
    hubs = {source(name).hub for name in tally.datasets} or {"unknown"}
    rows = sum(tally.images.values())
    return {
        "license": hubs.pop() if len(hubs) == 1 else "other",
        "pretty_name": f"gradinv reconstructions: {', '.join(sorted(tally.trials)) or 'none'}",
        "task_categories": ["image-to-image"],
        "tags": ["gradient-inversion", "federated-learning", "privacy"],
        "size_categories": [next((name for limit, name in _SIZES if rows < limit), "n>1M")],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": pattern}]}],
        "dataset_info": {
            "features": [_yaml_feature(f.name, f.type) for f in schema],
            "splits": [{"name": "train", "num_bytes": tally.num_bytes, "num_examples": rows}],
            "download_size": tally.download_size,
            "dataset_size": tally.num_bytes,
        },
    }


def _yaml_feature(name: str, kind: pa.DataType) -> dict:
    """A feature as the card's YAML lists it (``sequence``: read by every datasets version)."""
    if kind == IMAGE:
        return {"name": name, "dtype": "image"}
    if pa.types.is_list(kind):
        return {"name": name, "sequence": feature(kind.value_type)["dtype"]}
    return {"name": name, "dtype": feature(kind)["dtype"]}


def _text(tally: Tally, pattern: str) -> str:
    studies = "\n".join(
        f"- `{study}`: {tally.images[study]} images from {tally.trials[study]} trials" for study in sorted(tally.trials)
    )
    versions = "\n".join(
        f"- gradinv {version or 'unknown'}, commit `{commit or 'unknown'}`: {images} images"
        for (version, commit), images in sorted(tally.versions.items(), key=lambda item: str(item[0]))
    )
    sources = "\n".join(
        f"- `{name}`: {source(name).images}. Licence: {source(name).licence}."
        for name in sorted(tally.datasets, key=str)
    )
    return f"""# gradinv reconstructions

Each row is one image that a gradient-inversion attack reconstructed from a federated-learning client's
update (its gradient or weight update), in studies run by gradinv. `truth` is the client's image as the
attacked model saw it, `reconstruction` what the attacker recovered from the update alone. Beside them:
the image's own scores (`psnr`, `ssim`, `mse`, `feature_mse`, and `psnr_gain`, its PSNR over the best
no-information baseline: the mean image, a flat image or the class mean), the trial's (`trial_psnr`,
`baseline_psnr`, `label_accuracy`, `model_accuracy`), every setting of the trial (dataset, model,
federated-learning mode, attack and its budget, defences), the trial `key` and the code version. A
`psnr_gain` at or below 0 shows no more than an attacker knows without the update.

## Studies

{studies}

## Code

{versions}

## Source images and their licence

The ground-truth images are copies of the source images (cropped or resized as the trials' settings say)
and the reconstructions are derived from them, so both fall under the source's terms:

{sources}

## Loading

```python
from datasets import load_dataset

data = load_dataset("parquet", data_files="{pattern}", split="train")  # run in this folder
data[0]["truth"], data[0]["reconstruction"]  # PIL images
```

`load_dataset("path/to/this/folder", split="train")` reads the same files through this card.
"""
