"""Which row of a trial key counts where a crash left several: the rule every reader of a results
directory counts by (gradinv.results.store, analysis.load) and the writer repairs the files by."""

from __future__ import annotations

import pyarrow as pa


class Winners:
    """Which row of a trial key counts where several hold it (a crash between writing a batch and dropping
    the rows it replaces leaves both): the row in the newest file (names sort by the time they were
    written), the first there. The writer repairs the files by this rule; every reader counts by it
    (``filter``) until then.
    """

    def __init__(self, keys_by_file: dict[str, list[str]]):
        """``keys_by_file``: each file's key column, the files in name order."""
        self.file_of: dict[str, str] = {}
        self.duplicated = False
        for file, keys in keys_by_file.items():
            for key in keys:
                self.duplicated |= key in self.file_of
                self.file_of[key] = file
        self._counted: set[str] = set()

    def filter(self, table: pa.Table, read_from: str | pa.ChunkedArray) -> pa.Table:
        """The rows of ``table`` that count; ``read_from``: the file all rows were read from, or each row's.
        Rows of one file come in its order; a key counted once is never counted again by this reader."""
        if not self.duplicated:
            return table
        files = [read_from] * table.num_rows if isinstance(read_from, str) else read_from.to_pylist()
        mask = []
        for key, file in zip(table["key"].to_pylist(), files):
            counts = self.file_of.get(key) == file and key not in self._counted
            mask.append(counts)
            if counts:
                self._counted.add(key)
        return table.filter(pa.array(mask, pa.bool_()))
