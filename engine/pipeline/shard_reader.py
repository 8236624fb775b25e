"""Ray Data reads of plabel's WebDataset shards, on local disk or in object storage."""
from __future__ import annotations

from typing import Sequence

from engine import storage


def _prefix_urls(batch, prefix: str):
    """pyarrow batch: put the URI scheme back in front of ``__url__`` / ``path``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in ("__url__", "path"):
        if name in batch.column_names:
            i = batch.column_names.index(name)
            col = batch.column(i)
            joined = pc.binary_join_element_wise(pa.scalar(prefix, col.type), col, pa.scalar("", col.type))
            batch = batch.set_column(i, name, joined)
    return batch


def read_shards(paths: Sequence[str]):
    """``ray.data.read_webdataset`` of shards (raw members, ``decoder=None``, ``include_paths=True``).

    Local paths are read as given. URIs (all on one filesystem) are resolved here and read with
    that pyarrow filesystem, so Ray never sees credentials a URI may carry; ``__url__`` then holds
    the shard's redacted URI (``s3://bucket/...``), as it holds the path of a local shard.
    """
    import ray

    paths = [str(p) for p in paths]
    fs, resolved = storage.resolve_all(paths)
    if fs is None:
        return ray.data.read_webdataset(paths, decoder=None, include_paths=True)
    ds = ray.data.read_webdataset(resolved, filesystem=fs, decoder=None, include_paths=True)
    return ds.map_batches(_prefix_urls, fn_kwargs={"prefix": f"{storage.scheme(paths[0])}://"},
                          batch_format="pyarrow", batch_size=None)
