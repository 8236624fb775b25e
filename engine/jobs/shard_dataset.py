"""The Ray Dataset of plabel's WebDataset shards: one streaming read task per shard, parsed by
plabel.data.shard_reader (tolerant of bad tars; see its docstring for the row columns)."""
from __future__ import annotations

import os
from typing import Sequence

import pyarrow.fs as pafs
import ray

from plabel.data import storage
from plabel.data.shard_reader import MAX_MEMBER_BYTES, read_shard_batch


def read_shards(paths: Sequence[str], max_member_bytes: int = MAX_MEMBER_BYTES):
    """Ray Dataset of the samples of the shards: one streaming read task per shard, one row per
    sample (columns: :func:`sample_schema`; see the module docstring for bad tars).

    Local paths are read as given. URIs (all on one filesystem) are resolved here and read with
    that pyarrow filesystem, so rows never carry credentials a URI may hold: ``__url__`` is the
    shard's redacted URI (``s3://bucket/...``), or the path of a local shard. A shard that does
    not exist raises FileNotFoundError naming it, before anything runs.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("read_shards: no shards given")
    fs, resolved = storage.resolve_all(paths)
    names = [storage.redact(p) for p in paths]
    if fs is None:
        infos = pafs.LocalFileSystem().get_file_info([os.path.abspath(r) for r in resolved])
    else:
        infos = fs.get_file_info(resolved)
    missing = [n for n, info in zip(names, infos) if info.type != pafs.FileType.File]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {', '.join(missing[:10])}"
                                + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    items = [{"path": r, "name": n} for r, n in zip(resolved, names)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(read_shard_batch, fn_kwargs={"filesystem": fs, "max_member_bytes": int(max_member_bytes)},
                          batch_format="pyarrow", batch_size=1)
