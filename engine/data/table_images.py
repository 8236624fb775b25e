"""The shard samples that a table's rows name (each row carries its ``shard`` and ``key``).

Ray-free. A label or predict job writes one Parquet part per input shard, so the rows of one part
read one shard, once, in file order: exports (plabel.data.export.parts) and the student's training
set (plabel.training.student_set) both take their images this way instead of joining on id.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Iterator, TypeVar

from plabel.data import storage
from plabel.data.shard_reader import read_shard_file
from plabel.errors import InputError

Row = TypeVar("Row")


def samples_of(rows: Iterable[Row], shard_of: Callable[[Row], str], key_of: Callable[[Row], str]
               ) -> Iterator[tuple[Row, dict | None, str | None]]:
    """``(row, sample, None)`` for every row whose sample its shard holds, ``(row, None, reason)``
    for one whose sample is missing or unusable (truncated, duplicate key...). Rows come out grouped
    by shard, in each shard's file order. ``shard_of(row)``: a local path or a URI (resolved here,
    in the worker). A shard that cannot be opened raises InputError naming it."""
    by_shard: dict[str, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        by_shard[shard_of(row)][key_of(row)] = row
    for shard, wanted in by_shard.items():
        fs, path = (None, shard) if not storage.is_uri(shard) else storage.resolve(shard)
        try:
            for sample in read_shard_file(path, shard, fs):
                row = wanted.pop(str(sample["__key__"]), None)
                if row is None:
                    continue
                if sample.get("__error__") is not None:
                    yield row, None, f"unusable sample in {storage.redact(shard)}: {sample['__error__']}"
                else:
                    yield row, sample, None
        except FileNotFoundError:
            raise InputError(f"{storage.redact(shard)}: the shard that holds this table's images is missing "
                             "(the table names the shards its images come from)") from None
        for row in wanted.values():
            yield row, None, f"sample {key_of(row)} not found in {storage.redact(shard)}"
