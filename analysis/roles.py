"""Each results column's role (identity, setting, outcome, provenance, heavy), as the files declare it.

The writer puts a column's role into its Parquet field metadata (``gradinv.results.schema.ROLE_KEY``), so the
analysis takes roles from the files and keeps no list of its own: a column the schema gains later
groups trials only when its file declares it a setting. Files written before roles were recorded
(schema versions 1 and 2) take the role the current schema declares for a column of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from gradinv.results.schema import HEAVY, OUTCOME, REPETITION_KEY, ROLE_KEY, SCHEMA, SETTING

PER_IMAGE_SUFFIX = "_per_image"  # an outcome per image beside its mean over the client's images


def annotated(schemas: Iterable[pa.Schema]) -> pa.Schema:
    """One schema for files read together, every field carrying its role: each column as the last
    file declaring it has it; columns no file declares as the current schema has them (for files
    without roles, and for columns older files lack, which read as nulls)."""
    fields = {field.name: field for field in SCHEMA}
    for schema in schemas:
        for field in schema:
            if ROLE_KEY in (field.metadata or {}):
                fields[field.name] = field
            elif field.name not in fields:  # in no schema this code knows: read, but never grouped by
                fields[field.name] = field.with_metadata({ROLE_KEY: OUTCOME.encode()})
    return pa.schema(list(fields.values()))


@dataclass(frozen=True)
class Roles:
    """Column name -> role, and the settings that tell repetitions apart (which client, which seed)."""

    of: Mapping[str, str]
    repetition: frozenset[str]

    @classmethod
    def of_schema(cls, schema: pa.Schema) -> Roles:
        """The roles in an ``annotated`` schema's field metadata."""
        roles = {field.name: field.metadata[ROLE_KEY].decode() for field in schema}
        repetition = frozenset(field.name for field in schema if field.metadata.get(REPETITION_KEY) == b"true")
        return cls(roles, repetition)

    def columns(self, role: str) -> list[str]:
        return [name for name, declared in self.of.items() if declared == role]

    @property
    def settings(self) -> list[str]:
        return self.columns(SETTING)

    @property
    def heavy(self) -> list[str]:
        return self.columns(HEAVY)

    def settings_in(self, frame: pd.DataFrame) -> list[str]:
        """The setting columns of ``frame``, in its order."""
        return [name for name in frame.columns if self.of.get(name) == SETTING]

    def varying_settings(self, frame: pd.DataFrame) -> list[str]:
        """Settings with more than one value across ``frame``, repetitions left out. Nulls do not count:
        a null means "does not apply" (local steps under FedSGD), which another setting already says."""
        return [name for name in self.settings_in(frame) if name not in self.repetition and frame[name].nunique() > 1]

    def per_image(self) -> list[str]:
        """Outcomes recorded per image as well: ``name`` beside ``name`` + PER_IMAGE_SUFFIX."""
        outcomes = set(self.columns(OUTCOME))
        return [name for name in self.columns(OUTCOME) if f"{name}{PER_IMAGE_SUFFIX}" in outcomes]
