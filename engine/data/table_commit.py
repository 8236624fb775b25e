"""The pseudo-label table on disk: per-shard parts, resume, completion marker.

The label job (plabel.jobs.label_job) hands every block of rows it receives from Ray Data to
a :class:`ShardTableWriter`, which groups the rows by their input shard. A shard whose rows have
all arrived is written at once as ONE Parquet part, ``part-<shard stem>.parquet``:

* atomically: a temporary file renamed into place on local disk, one PUT in an object store, so
  a part exists whole or not at all;
* into the table's *staging location*: on local disk the folder ``.<name>.inprogress/`` next to
  the table (renamed to ``<name>/`` when the table is complete, so a local table folder is only
  ever complete); in an object store the table prefix itself (a prefix cannot be renamed; readers
  refuse it until the marker exists).

The staging location also holds ``_plabel_job.json``: what the job computes (classes, teacher
SHA-256, SAM / cleaning / gate settings, the shard list) and which part belongs to which shard.
A job started again on the same output with the same settings finds it, keeps the parts that are
there and reads only the shards without a part (``shards_skipped``); a job with other settings
discards the staged parts and starts afresh. When every shard has its part the writer adds the
completion marker ``_plabel_complete.json`` (row counts, the teacher's SHA-256, the part files)
LAST: readers (:func:`table_files`) take exactly the files it lists and refuse a table without it
in object storage.

When is a shard complete? Its sample keys are known in advance from the shards' manifest
(``manifest.json`` two folders up, as ``plabel ingest`` writes it) or, for local shards without
one, from the tar's member names. A shard is written as soon as every expected key arrived; a
shard whose keys are unknown or never all arrive (a damaged shard, error rows with other keys)
is written when the Ray Data stream ends. Only the shards in flight are buffered. Rows are
de-duplicated by sample key within a shard (a retried task can never add a row twice) and each
part is sorted by key, so an interrupted and resumed job writes the same parts as an
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from plabel.data import storage
from plabel.data.ingest import load_manifest
from plabel.errors import InputError

log = logging.getLogger(__name__)

MARKER_NAME = "_plabel_complete.json"  # '_' prefix: pyarrow and Ray Data skip it when reading the folder
MARKER_FORMAT = "plabel-pseudo-labels"
JOB_NAME = "_plabel_job.json"  # the staged job's settings and shard -> part map
JOB_FORMAT = "plabel-label-job"
STAGING_SUFFIX = ".inprogress"


class IncompleteTableError(InputError):
    """A pseudo-label table in object storage without its completion marker (interrupted commit)."""


# ----------------------------------------------------------------------------- reading


def table_marker(table_dir) -> dict | None:
    """The table's completion marker (a dict), or None when there is none."""
    marker = storage.join(str(table_dir), MARKER_NAME)
    try:
        return json.loads(storage.read_text(marker))
    except FileNotFoundError:
        return None


def table_files(table_dir) -> tuple:
    """``(pyarrow filesystem or None for local paths, Parquet file paths)`` of a finished table.

    The files are those the marker lists. Raises FileNotFoundError when there is no table and
    IncompleteTableError for files in object storage without a marker.
    """
    table_dir = str(table_dir)
    marker = table_marker(table_dir)
    name = storage.redact(table_dir)
    if marker is None:
        if storage.is_remote(table_dir):
            if storage.list_files(table_dir):
                raise IncompleteTableError(
                    f"{name}: the pseudo-label table is incomplete: it has no "
                    f"{storage.join(name, MARKER_NAME)} (an interrupted write?); run the label job again")
            raise FileNotFoundError(f"{name}: no pseudo-label table there")
        if not Path(storage.local_path(table_dir)).is_dir():
            raise FileNotFoundError(f"{name}: no pseudo-label table there")
        files = [f for f in storage.list_files(storage.local_path(table_dir), ".parquet")
                 if not _hidden(os.path.relpath(f, storage.local_path(table_dir)))]
    else:
        if marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("files"), list):
            raise IncompleteTableError(f"{storage.join(name, MARKER_NAME)}: not a plabel completion marker")
        files = [storage.join(table_dir, *f.split("/")) for f in marker["files"]]
    return storage.resolve_all(files)


def _hidden(rel: str) -> bool:
    """Names pyarrow's dataset discovery skips: any path component starting with '.' or '_'."""
    return any(part.startswith((".", "_")) for part in rel.replace(os.sep, "/").split("/"))


# ----------------------------------------------------------------------------- whole-folder commit (legacy API)


def _clear_output(out: str) -> None:
    """Refuse a finished table at ``out``; delete stale temp folders and an interrupted commit."""
    name = storage.redact(out)
    if storage.is_remote(out):
        _check_prefix(out)
        if table_marker(out) is not None:
            raise FileExistsError(f"{name}: the table exists already; remove it or choose another output")
        leftover = storage.list_files(out)
        if any(not _table_file(f) for f in leftover):
            raise FileExistsError(f"{name} holds files that are not a plabel table; choose another output")
        if leftover:
            log.warning("%s: Parquet files without %s (an interrupted commit); overwriting them", name, MARKER_NAME)
            storage.delete_dir(out)
        _delete_stale_tmp(out)
        return
    out_dir = Path(out)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: the table exists already; remove it or choose another output")
    _delete_stale_tmp(out)


def _check_prefix(out: str) -> None:
    if "/" not in storage.redact(out).split("://", 1)[1].strip("/"):
        raise ValueError(f"{storage.redact(out)}: give the table a prefix inside the bucket, not the bucket itself")


def _table_file(location: str) -> bool:
    base = storage.redact(location).rstrip("/").rsplit("/", 1)[-1]
    return base.endswith(".parquet") or base == JOB_NAME


def _delete_stale_tmp(out: str) -> None:
    """Delete ``.<name>.tmp-*`` folders next to ``out`` (left by an interrupted whole-folder commit)."""
    prefix = f".{_base_name(out)}.tmp-"
    if storage.is_remote(out):
        for entry in storage.list_dir(storage.dirname(out)):
            if storage.redact(entry).rstrip("/").rsplit("/", 1)[-1].startswith(prefix):
                storage.delete_dir(entry)
        return
    for stale in Path(out).parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _base_name(out: str) -> str:
    return storage.redact(out).rstrip("/").rsplit("/", 1)[-1]


def _marker_text(files: Sequence[str], counts: dict) -> str:
    marker = {"format": MARKER_FORMAT, "version": 1, **counts, "files": list(files)}
    return json.dumps(marker, indent=2, sort_keys=True) + "\n"


def _commit_table(tmp: str, out: str, counts: dict) -> None:
    """Move a whole table written to ``tmp`` to ``out``, marker included (whole-folder commit)."""
    files = storage.list_files(tmp, ".parquet")
    rel = [storage.redact(f)[len(storage.redact(tmp)):].lstrip("/") if storage.is_uri(f) else os.path.relpath(f, tmp)
           for f in files]
    rel = [r.replace(os.sep, "/") for r in rel]
    text = _marker_text(rel, counts)
    if not storage.is_remote(out):
        storage.write_text(storage.join(tmp, MARKER_NAME), text)
        os.replace(tmp, out)
        return
    for f, r in zip(files, rel):
        storage.copy_file(f, storage.join(out, *r.split("/")))
    storage.write_text(storage.join(out, MARKER_NAME), text)  # last: the commit point
    storage.delete_dir(tmp)


# ----------------------------------------------------------------------------- shards and their keys


def shard_id(location) -> str:
    """A shard's identity as rows name it: the redacted URI, or the absolute normalised local path."""
    text = os.fspath(location) if not isinstance(location, str) else location
    if storage.is_remote(text):
        return storage.redact(text)
    return os.path.normpath(os.path.abspath(storage.local_path(text)))


def part_names(shards: Sequence[str]) -> dict[str, str]:
    """``{shard id: part file name}``: ``part-<stem>.parquet``, plus a hash where stems collide."""
    ids = [shard_id(s) for s in shards]
    stems = {}
    for sid in ids:
        base = sid.rstrip("/").rsplit("/", 1)[-1]
        base = base[:-4] if base.endswith(".tar") else base
        stems[sid] = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip("._") or "shard"
    counts: dict[str, int] = {}
    for s in stems.values():
        counts[s] = counts.get(s, 0) + 1
    return {sid: (f"part-{stem}.parquet" if counts[stem] == 1
                  else f"part-{stem}-{hashlib.sha256(sid.encode()).hexdigest()[:8]}.parquet")
            for sid, stem in stems.items()}


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # Ray Data's (and WebDataset's) sample-key rule


def _tar_keys(path: str) -> list[str] | None:
    """Sample keys of a local tar from its member names (None when it cannot be listed)."""
    keys: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                m = _KEY.match(member.name)
                if m and (not keys or keys[-1] != m.group(1)):
                    keys.append(m.group(1))
    except (OSError, tarfile.TarError, EOFError):
        return None
    return keys


def expected_keys(shards: Sequence[str]) -> dict[str, frozenset | None]:
    """``{shard id: the sample keys it holds, or None when unknown}``.

    From ``manifest.json`` two folders above the shard (``<root>/<split>/<split>-NNNNNN.tar``, as
    ``plabel ingest`` writes it) when it names the shard, else (local shards) from the tar's
    member names; None for anything that cannot be read (the shard is then finished when the
    stream ends).
    """

    out: dict[str, frozenset | None] = {}
    manifests: dict[str, dict] = {}
    for shard in shards:
        sid = shard_id(shard)
        root = storage.dirname(storage.dirname(str(shard)))
        if root not in manifests:
            try:
                manifest = load_manifest(storage.join(root, "manifest.json"))
                manifests[root] = {
                    shard_id(storage.join(root, *entry["path"].split("/"))): frozenset(entry["keys"])
                    for split in manifest["splits"].values() for entry in split["shards"]
                    if isinstance(entry.get("keys"), list)}
            except Exception:  # noqa: BLE001 - no usable manifest: fall back to the tar
                manifests[root] = {}
        keys = manifests[root].get(sid)
        if keys is None and not storage.is_remote(str(shard)):
            listed = _tar_keys(storage.local_path(str(shard)))
            keys = frozenset(listed) if listed is not None else None
        out[sid] = keys
    return out


# ----------------------------------------------------------------------------- the writer


def job_fingerprint(config: dict, shards: Sequence[str]) -> str:
    """SHA-256 of a label job's settings and its input shards (by shard id): equal fingerprints, equal rows."""
    config = {**config, "shards": [shard_id(str(s)) for s in shards]}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


class ShardTableWriter:
    """Writes a pseudo-label table shard by shard into ``out`` (local folder or URI); see the module
    docstring. Use: ``remaining = w.prepare()``; ``w.add(block)`` for every block of rows;
    ``w.finish(extra)`` writes the marker and returns the counts."""

    def __init__(self, out: str, shards: Sequence[str], schema, config: dict):
        self.out = out
        self.remote = storage.is_remote(out)
        self.schema = schema
        self.shards = [str(s) for s in shards]
        self.ids = [shard_id(s) for s in self.shards]
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("the label job was given the same shard twice")
        self.parts = part_names(self.shards)
        self._shard_of = dict(zip(self.ids, self.shards))
        self.config = {**config, "shards": self.ids}
        self.fingerprint = job_fingerprint(config, self.shards)
        self.staging = out if self.remote else storage.join(storage.dirname(out) or ".", f".{_base_name(out)}{STAGING_SUFFIX}")
        self.expected: dict[str, frozenset | None] = {}
        self.done: set[str] = set()  # shard ids with a part
        self.skipped = 0
        self._buffers: dict[str, list] = {}  # shard id -> list of pyarrow tables
        self._seen: dict[str, set] = {}  # shard id -> keys buffered
        self._written_keys: dict[str, set] = {}  # shard id -> keys written by this run
        self._extra_parts: list[str] = []  # late rows, rows of unknown shards
        self.duplicates_dropped = 0
        self.missing_samples = 0  # expected keys (manifest) that never arrived, in shards written by this run
        self._ids_of: dict = {}  # shard column value -> shard id

    # -- start

    def prepare(self) -> list[str]:
        """Check the output, resume a staged job of the same settings; returns the shards to read."""
        name = storage.redact(self.out)
        if self.remote:
            _check_prefix(self.out)
            if table_marker(self.out) is not None:
                raise FileExistsError(f"{name}: the table exists already; remove it or choose another output")
        elif Path(self.out).exists():
            raise FileExistsError(f"{name}: the table exists already; remove it or choose another output")
        _delete_stale_tmp(self.out)
        job = self._read_job()
        if job is not None and job.get("fingerprint") == self.fingerprint:
            self._resume(job)
        else:
            if job is not None:
                log.warning("%s: staged parts of a label job with other settings; discarding them", name)
                if self.remote:
                    self._discard_remote_job()  # _clear_output below deletes its parts
                else:
                    storage.delete_dir(self.staging)
            if self.remote:
                _clear_output(self.out)  # refuses foreign files, deletes an interrupted commit
            elif storage.exists(self.staging):
                shutil.rmtree(storage.local_path(self.staging), ignore_errors=True)
            storage.makedirs(self.staging)
            self._write_job()
        remaining = [s for s, sid in zip(self.shards, self.ids) if sid not in self.done]
        self.skipped = len(self.shards) - len(remaining)
        self.expected = expected_keys(remaining)
        for sid in (shard_id(s) for s in remaining):
            self._buffers[sid], self._seen[sid] = [], set()
        if self.skipped:
            log.info("%s: resuming: %d of %d shards were committed by an earlier run, skipped",
                     name, self.skipped, len(self.shards))
        return remaining

    def _job_path(self) -> str:
        return storage.join(self.staging, JOB_NAME)

    def _read_job(self) -> dict | None:
        try:
            job = json.loads(storage.read_text(self._job_path()))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}
        return job if isinstance(job, dict) and job.get("format") == JOB_FORMAT else {}

    def _write_job(self) -> None:
        job = {"format": JOB_FORMAT, "version": 1, "fingerprint": self.fingerprint, "config": self.config,
               "parts": {sid: self.parts[sid] for sid in self.ids}}
        storage.write_text(self._job_path(), json.dumps(job, indent=2, sort_keys=True) + "\n")

    def _discard_remote_job(self) -> None:
        fs, path = storage.resolve(self._job_path())
        fs.delete_file(path)

    def _resume(self, job: dict) -> None:
        if not self.remote:  # temporary files of writes the interruption cut short
            for f in Path(storage.local_path(self.staging)).iterdir():
                if f.name.startswith(".") and ".tmp-" in f.name:
                    f.unlink(missing_ok=True)
        present = {storage.redact(f).rstrip("/").rsplit("/", 1)[-1] for f in storage.list_files(self.staging, ".parquet")}
        self.done = {sid for sid in self.ids if self.parts[sid] in present}
        # parts of rows that arrived after their shard's part (or named no shard of the job): kept
        self._extra_parts = sorted(present - set(self.parts.values()))

    # -- rows

    def add(self, block) -> None:
        """Buffer a block of rows (a pyarrow Table); write the shards it completes."""
        if block.num_rows == 0:
            return
        block = block.select(self.schema.names).cast(self.schema)
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(block.column("shard").to_pylist()):
            if s not in self._ids_of:
                self._ids_of[s] = shard_id(s) if s else ""
            groups.setdefault(self._ids_of[s], []).append(i)
        for sid, idx in groups.items():
            rows = block.take(idx)
            if sid in self._written_keys:  # the shard was written already by this run: late rows
                self._late(sid, rows)
                continue
            if sid not in self._buffers:
                self._buffers[sid], self._seen[sid] = [], set()
            self._buffers[sid].append(rows)
            self._seen[sid].update(rows.column("key").to_pylist())
            keys = self.expected.get(sid)
            if keys is not None and keys <= self._seen[sid]:
                self._write_shard(sid)

    def _late(self, sid: str, rows) -> None:
        written = self._written_keys[sid]
        keys = rows.column("key").to_pylist()
        keep = [i for i, k in enumerate(keys) if k is None or k not in written]
        self.duplicates_dropped += len(keys) - len(keep)
        if not keep:
            return
        rows = rows.take(keep)
        written.update(rows.column("key").to_pylist())
        log.warning("%d row(s) of %s arrived after its part was written; writing them to an extra part",
                    rows.num_rows, storage.redact(sid))
        base = self.parts.get(sid, f"part-other-{hashlib.sha256(sid.encode()).hexdigest()[:8]}.parquet")
        name = f"{base[:-len('.parquet')]}.late-{uuid.uuid4().hex[:8]}.parquet"
        self._write_part(name, rows)
        self._extra_parts.append(name)

    def _write_shard(self, sid: str) -> None:
        tables = self._buffers.pop(sid)
        seen = self._seen.pop(sid, set())
        expected = self.expected.get(sid)
        if expected is not None and not expected <= seen:  # e.g. a tar shorter than its manifest says
            missing = sorted(expected - seen)
            self.missing_samples += len(missing)
            log.warning("%s: %d sample(s) the manifest lists gave no row: %s", storage.redact(sid), len(missing),
                        ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
            tables = self._account_missing(sid, tables, missing)
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        keys = table.column("key").to_pylist()
        first: dict = {}  # key -> first row; rows without a key are all kept
        for i, k in enumerate(keys):
            first.setdefault(k if k is not None else ("<no key>", i), i)
        if len(first) < len(keys):
            self.duplicates_dropped += len(keys) - len(first)
            log.warning("%s: %d duplicate row(s) dropped", storage.redact(sid) or "rows without a shard",
                        len(keys) - len(first))
            table = table.take(sorted(first.values()))
        if table.num_rows:
            table = table.sort_by([("key", "ascending")])
        if sid in self.parts:
            name = self.parts[sid]
        else:  # rows naming a shard the job was not given (should not happen): kept, never lost
            name = f"part-other-{hashlib.sha256(sid.encode()).hexdigest()[:8]}.parquet"
            log.warning("%d row(s) name shard %r, which the job was not given; written to %s",
                        table.num_rows, storage.redact(sid), name)
            self._extra_parts.append(name)
        self._write_part(name, table)
        self._written_keys[sid] = {k for k in first if isinstance(k, str)}
        self.done.add(sid)

    def _account_missing(self, sid: str, tables: list, missing: list[str]) -> list:
        """Rows for samples the shard should hold (its expected keys) that never arrived: one error
        row each (id = key), so images in = rows. A reader row that only names where data was lost
        (key ``@<byte offset>``: a cut between whole samples) is folded into their messages."""

        causes: list[str] = []
        kept = []
        for t in tables:
            lost_at = pc.starts_with(t.column("key").fill_null(""), "@")
            if pc.any(lost_at).as_py():
                for r in t.filter(lost_at).select(["shard", "key", "message"]).to_pylist():
                    prefix = f"{r['shard']}:{r['key']}: "
                    m = r["message"] or ""
                    causes.append(m[len(prefix):] if m.startswith(prefix) else m)
                t = t.filter(pc.invert(lost_at))
            kept.append(t)
        shard = storage.redact(self._shard_of.get(sid, sid))
        cause = "; ".join(dict.fromkeys(causes))
        note = "listed in the manifest but not in the shard (the tar changed or was cut after ingest)"
        rows = [{"id": k, "shard": shard, "key": k, "height": 0, "width": 0, "status": "error",
                 "message": f"{shard}:{k}: {note}" + (f": {cause}" if cause else "")} for k in missing]
        return kept + [pa.Table.from_pylist(rows, schema=self.schema)]

    def _write_part(self, name: str, table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(self.staging, name), buf.getvalue())  # atomic: temp + rename / one PUT

    @property
    def in_flight(self) -> int:
        """Shards with rows buffered and no part yet."""
        return sum(1 for b in self._buffers.values() if b)

    # -- end

    def finish(self, extra: dict) -> dict:
        """Write the shards still buffered (ending the stream completes them), then the marker;
        returns the counts {rows, ok, empty, error}."""
        for sid in list(self._buffers):
            if sid in self.parts or self._buffers[sid]:
                self._write_shard(sid)
        missing = [sid for sid in self.ids if sid not in self.done]
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) have no part: {[storage.redact(m) for m in missing[:5]]}")
        files = [self.parts[sid] for sid in self.ids] + self._extra_parts
        fs, paths = storage.resolve_all([storage.join(self.staging, f) for f in files])
        status = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["status"]).column("status")
        status = status.to_pylist()
        counts = {"rows": len(status), **{s: status.count(s) for s in ("ok", "empty", "error")}}
        text = _marker_text(files, {**counts, **extra})
        if self.remote:
            storage.write_text(storage.join(self.out, MARKER_NAME), text)  # last: the commit point
        else:
            storage.write_text(storage.join(self.staging, MARKER_NAME), text)
            os.replace(storage.local_path(self.staging), storage.local_path(self.out))  # the table appears whole
        return counts


def read_pseudo_labels(table_dir: str | Path):
    """The whole pseudo-label table as a pyarrow.Table with plabel's schema metadata.

    Raises IncompleteTableError for a table without its completion marker in object storage."""
    fs, files = table_files(table_dir)
    return pads.dataset(files, filesystem=fs, format="parquet").to_table()
