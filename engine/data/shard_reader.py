"""Reading plabel's WebDataset shards (local paths or object-store URIs), tolerant of bad tars.

Ray Data's ``read_webdataset`` fails the whole job on a tar cut mid-member and silently merges
samples whose key repeats. plabel therefore parses each shard itself, streaming, one Ray task per
shard (plabel.jobs.shard_dataset.read_shards), with :func:`iter_shard_samples` (no Ray needed). Every sample becomes
one row; a sample that cannot be used carries the reason in ``__error__`` and the jobs turn it
into an error row (label job) or an error naming the shard and key (training, evaluation).

Row columns (what ``read_webdataset(decoder=None, include_paths=True)`` gave, plus three):

* ``__key__``        sample key: the member name up to the first ``.`` of its base name
                     (WebDataset's rule), e.g. ``case_7`` for ``case_7.png``; unique within a
                     shard (``<key>#<n>`` for repeats, ``@<offset>`` for unattributable data);
* ``__url__``        the shard: its path as given, or its redacted URI (``s3://bucket/...``);
* ``png`` ``jpg`` ``jpeg`` ``tif`` ``tiff`` ``json`` ``masks.npz``: raw member bytes, null when
                     the sample has no such member (members with other suffixes are not kept);
* ``__error__``      null, or why the sample is unusable (the reason only; consumers prefix
                     ``<shard>:<key>``);
* ``__occurrence__`` 1 for the first sample with this key in the shard, 2, 3, ... for repeats;
* ``__id__``         null, or the row id to use instead of the sample's JSON id (rows that are
                     not a proper sample: unsafe member names, data the reader cannot attribute).

What the reader does with bad tars:

* a member cut by the end of the file (the shard was truncated mid-member): the samples before
  it are read normally; the sample the member belongs to gets ``__error__`` naming the member and
  the byte offset. When the name of the cut member cannot be read (the file ends inside a
  header, or exactly between members without the end-of-archive marker): if the sample being
  read has no image member yet it is the cut one and gets the error; else (it is whole: plabel
  writes a sample's image member last) one extra row ``__key__ = "@<offset>"``,
  ``__id__ = "<shard>@<offset>"`` names the shard and the offset. Either way one error row per cut;
* a corrupt header (bad checksum, bad number fields): handled like a cut whose name is unknown;
  the rest of the shard is not read (a tar has no index to resynchronise on);
* a key seen before in the same shard, whether later in the file or repeated right after its
  first sample (``a.json a.png a.json a.png``): the first sample is used; every later one is a
  row with ``__occurrence__`` = 2, 3, ..., ``__key__`` ``a#2``, ``a#3``, ... (row keys stay unique
  within a shard) and ``__error__`` "duplicate key 'a' in shard ...". Nothing is merged or
  overwritten;
* a member whose name is absolute (``/etc/x.png``, ``C:...``, ``\\x``) or has a ``..``
  component: refused; its sample is an error row naming the member, with ``__id__`` = its key
  (its JSON is not trusted). Member names are never used as file paths anywhere;
* links, devices, FIFOs and sparse files: refused the same way (error naming the member);
  directories are skipped;
* a member larger than ``max_member_bytes``: not loaded; its sample is an error row;
* members without a key or suffix (``README``, ``.png``) belong to no sample and are skipped
  with a logged warning.

A tar cut exactly between two members *with* its end-of-archive blocks intact cannot be told from
a complete one here; the label job's table writer (plabel.data.table_commit) compares the keys
that arrived with the shard's manifest entry and writes an error row for each missing sample.
"""
from __future__ import annotations

import logging
import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Sequence

import pyarrow as pa

from plabel.data.shards import IMAGE_EXTS, MASKS_MEMBER, META_MEMBER

log = logging.getLogger(__name__)

__all__ = [
    "MAX_MEMBER_BYTES",
    "MEMBER_COLUMNS",
    "iter_shard_samples",
    "read_shard_file",
    "read_shard_batch",
    "sample_schema",
    "unsafe_member_name",
]

#: Member suffixes kept as columns (lower case), in column order.
MEMBER_COLUMNS = tuple(IMAGE_EXTS) + (META_MEMBER, MASKS_MEMBER)
#: Members above this many bytes are not loaded (their sample becomes an error row).
MAX_MEMBER_BYTES = 1 << 30

_BLOCK = 512
_CHUNK = 1 << 20
_ROWS_PER_BLOCK = 16
_BYTES_PER_BLOCK = 64 << 20
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
_EXTENSIONS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)
_DRIVE = re.compile(r"^[A-Za-z]:")


def sample_schema():
    """Arrow schema of the rows :func:`read_shards` gives."""

    return pa.schema(
        [("__key__", pa.string()), ("__url__", pa.string())]
        + [(c, pa.large_binary()) for c in MEMBER_COLUMNS]
        + [("__error__", pa.string()), ("__occurrence__", pa.int32()), ("__id__", pa.string())]
    )


def unsafe_member_name(name: str) -> bool:
    """True for member names that would escape a folder if used as a path: absolute
    (``/x``, ``\\x``, ``C:x``), with a ``..`` component, empty, or containing NUL."""
    if not name or "\x00" in name:
        return True
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return True
    return ".." in re.split(r"[/\\]", name)


def _split_name(name: str) -> tuple[str | None, str | None]:
    """(key, suffix) by WebDataset's rule: key = folder + base name up to its first '.'."""
    folder, sep, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not stem or not dot or not suffix:
        return None, None
    return folder + sep + stem, suffix


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the file."""
    parts, got = [], 0
    while got < n:
        chunk = fh.read(min(n - got, _CHUNK))
        if not chunk:
            break
        parts.append(bytes(chunk))
        got += len(chunk)
    return b"".join(parts)


def _skip(fh: BinaryIO, n: int) -> int:
    """Discard ``n`` bytes (in chunks); returns how many were there."""
    got = 0
    while got < n:
        chunk = fh.read(min(n - got, _CHUNK))
        if not chunk:
            break
        got += len(chunk)
    return got


def _pax_records(data: bytes) -> dict[str, str]:
    """Records of a pax extended header (``"<len> <key>=<value>\\n"`` ...)."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError as exc:
            raise tarfile.HeaderError(f"bad pax record at {pos}") from exc
        if length <= 0 or pos + length > len(data):
            raise tarfile.HeaderError(f"bad pax record length {length} at {pos}")
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        k, eq, v = record.partition(b"=")
        if eq:
            out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


@dataclass
class _Sample:
    key: str
    occurrence: int
    offset: int
    members: dict = field(default_factory=dict)
    suffixes: set = field(default_factory=set)
    errors: list = field(default_factory=list)
    fixed_id: str | None = None
    row_key: str | None = None


def iter_shard_samples(fh: BinaryIO, shard: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Parse a tar stream into WebDataset samples, one dict per sample, in file order.

    Each dict holds ``__key__``, ``__url__`` (= ``shard``), ``__occurrence__``, the member bytes by
    suffix (as in the tar, e.g. ``"png"``, ``"masks.npz"``), and, when the sample is unusable,
    ``__error__`` (the reason) and possibly ``__id__`` (see the module docstring). Never raises for
    bad tar content; I/O errors of ``fh`` propagate.
    """
    seen: dict[str, int] = {}  # key -> samples with it so far
    row_keys: set[str] = set()
    state: dict = {"current": None}
    offset = 0
    pax_global: dict[str, str] = {}
    long_name: str | None = None
    pax_local: dict[str, str] = {}

    def finish() -> Iterator[dict]:
        cur = state["current"]
        state["current"] = None
        if cur is None:
            return
        sample = {"__key__": cur.row_key or cur.key, "__url__": shard, "__occurrence__": cur.occurrence}
        sample.update(cur.members)
        if cur.errors:
            sample["__error__"] = "; ".join(cur.errors)
        if cur.fixed_id is not None:
            sample["__id__"] = cur.fixed_id
        yield sample

    def add(name: str, at: int, data: bytes | None, error: str | None = None) -> Iterator[dict]:
        """Group a member into the current sample (or start a new one)."""
        key, suffix = _split_name(name)
        if key is None:
            log.warning("%s: member %r at byte %d has no key.suffix name; skipped", shard, name, at)
            return
        cur = state["current"]
        if cur is not None and (key != cur.key or suffix in cur.suffixes):
            yield from finish()
            cur = None
        if cur is None:
            occurrence = seen.get(key, 0) + 1
            seen[key] = occurrence
            row_key = key if occurrence == 1 else f"{key}#{occurrence}"  # rows stay unique by (shard, key)
            while row_key in row_keys:
                row_key += "#"
            row_keys.add(row_key)
            cur = state["current"] = _Sample(key, occurrence, at, row_key=row_key)
            if occurrence > 1:
                cur.errors.append(
                    f"duplicate key {key!r} in shard {shard} (occurrence {occurrence}, at byte {at}); "
                    "only the first sample with this key is used"
                )
        cur.suffixes.add(suffix)
        if unsafe_member_name(name):
            cur.errors.append(f"unsafe member name {name!r} refused (absolute path or '..' component)")
            cur.fixed_id = cur.row_key
        elif error is not None:
            cur.errors.append(error)
        elif data is not None:
            cur.members[suffix] = data

    def unattributed(at: int, reason: str) -> Iterator[dict]:
        """Data lost from byte ``at`` on, its sample unknown. A sample in progress without its image
        member yet is certainly cut: it carries the error. Otherwise (plabel writes the image member
        last, so such a sample is whole) one extra row names the shard and the offset."""
        cur = state["current"]
        if cur is not None and not any(sfx.lower() in IMAGE_EXTS for sfx in cur.suffixes):
            cur.errors.append(reason)
            yield from finish()
            return
        yield from finish()
        yield {"__key__": f"@{at}", "__url__": shard, "__occurrence__": 1, "__id__": f"{shard}@{at}",
               "__error__": reason}

    def cut(name: str | None, at: int, reason: str) -> Iterator[dict]:
        """The file ended inside member ``name`` (header at ``at``): its sample is the error row,
        or, when the name gives no sample key, a row naming the offset."""
        if name and _split_name(name)[0] is not None:
            yield from add(name, at, None, reason)
            yield from finish()
        else:
            yield from unattributed(at, reason + "; any member from there on is lost")

    while True:
        at = offset
        buf = _read_exact(fh, _BLOCK)
        offset += len(buf)
        if not buf:
            what = "the shard is empty (0 bytes)" if at == 0 else "the shard ends without the end-of-archive marker"
            yield from unattributed(at, f"tar truncated at byte {at}: {what}; any member after it is lost")
            return
        if len(buf) < _BLOCK and buf.count(0) == len(buf):  # a cut end-of-archive marker: nothing lost
            yield from finish()
            return
        if len(buf) < _BLOCK:
            name = None
            if len(buf) >= 100:
                raw = buf[:100].split(b"\x00", 1)[0]
                name = long_name or pax_local.get("path") or (raw.decode("utf-8", "surrogateescape") if raw else None)
            if name and _split_name(name)[0] is not None:
                yield from cut(name, at, f"tar truncated at byte {offset}: inside the header of member {name!r} "
                                         f"(at byte {at})")
            else:
                yield from cut(None, at, f"tar truncated at byte {offset}: inside a member header at byte {at}")
            return
        if buf.count(0) == _BLOCK:  # end-of-archive marker
            yield from finish()
            return
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
            size = int(info.size)
            if "size" in pax_local and info.type not in _EXTENSIONS:
                size = int(pax_local["size"])
            if size < 0:
                raise tarfile.HeaderError(f"negative size {size}")
        except (tarfile.HeaderError, ValueError) as exc:
            yield from unattributed(at, f"corrupt tar header at byte {at} ({exc}); the rest of the shard is not read")
            return
        padded = -(-size // _BLOCK) * _BLOCK
        if info.type in _EXTENSIONS:
            if size > max_member_bytes:
                yield from unattributed(at, f"tar header extension of {size} bytes at byte {at} is too large; "
                                            "the rest of the shard is not read")
                return
            data = _read_exact(fh, padded)
            offset += len(data)
            if len(data) < size:
                yield from unattributed(at, f"tar truncated at byte {offset}: inside a header extension at byte {at}; "
                                            "any member from there on is lost")
                return
            data = data[:size]
            try:
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
                elif info.type == tarfile.XGLTYPE:
                    pax_global.update(_pax_records(data))
                elif info.type != tarfile.GNUTYPE_LONGLINK:
                    pax_local.update(_pax_records(data))
            except tarfile.HeaderError as exc:
                yield from unattributed(at, f"corrupt pax header at byte {at} ({exc}); "
                                            "the rest of the shard is not read")
                return
            continue
        name = long_name or pax_local.get("path") or pax_global.get("path") or info.name
        long_name, pax_local = None, {}
        if info.type == tarfile.DIRTYPE:
            got = _skip(fh, padded)
            offset += got
            if got < padded:
                yield from unattributed(at, f"tar truncated at byte {offset}: inside directory entry {name!r}")
                return
            continue
        error = None
        data = None
        if info.type not in _REGULAR:
            kind = _KINDS.get(info.type, f"of tar type {info.type!r}")
            error = f"member {name!r} is {kind}; refused (only regular files are read)"
        elif size > max_member_bytes:
            error = f"member {name!r} is {size} bytes, above the limit of {max_member_bytes} bytes; not read"
        if error is None:
            data = _read_exact(fh, size)
            offset += len(data)
            if len(data) < size:
                yield from cut(name, at, f"tar truncated at byte {offset}: member {name!r} (at byte {at}) "
                                         f"declares {size} bytes, only {len(data)} are present")
                return
            pad = padded - size
        else:
            pad = padded
        got = _skip(fh, pad)
        offset += got
        if error is not None and got < pad:
            yield from cut(name, at, f"tar truncated at byte {offset}: inside member {name!r} (at byte {at})")
            return
        yield from add(name, at, data, error)


def read_shard_file(path: str, shard: str | None = None, filesystem=None,
                    max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """:func:`iter_shard_samples` of a file: a local path, or ``path`` in a pyarrow ``filesystem``.
    ``shard`` is how rows name it (default: the path)."""
    shard = path if shard is None else shard
    if filesystem is None:
        with open(path, "rb", buffering=_CHUNK) as fh:
            yield from iter_shard_samples(fh, shard, max_member_bytes)
    else:
        with filesystem.open_input_stream(path) as fh:
            yield from iter_shard_samples(fh, shard, max_member_bytes)


def samples_table(samples: Sequence[dict]):
    """pyarrow Table (:func:`sample_schema`) of sample dicts; other suffixes are left out."""

    schema = sample_schema()
    cols = {name: [] for name in schema.names}
    for s in samples:
        lower = {k.lower(): v for k, v in s.items() if not k.startswith("__")}
        for name in schema.names:
            cols[name].append(s.get(name) if name.startswith("__") else lower.get(name))
    return pa.Table.from_pydict(cols, schema=schema)


def read_shard_batch(batch, filesystem=None, max_member_bytes: int = MAX_MEMBER_BYTES):
    """Ray UDF: rows {path, name} (one per shard) -> pyarrow tables of samples, streamed."""
    for path, name in zip(batch.column("path").to_pylist(), batch.column("name").to_pylist()):
        pending, size = [], 0
        for sample in read_shard_file(path, name, filesystem, max_member_bytes):
            pending.append(sample)
            size += sum(len(v) for k, v in sample.items() if isinstance(v, (bytes, bytearray)))
            if len(pending) >= _ROWS_PER_BLOCK or size >= _BYTES_PER_BLOCK:
                yield samples_table(pending)
                pending, size = [], 0
        if pending:
            yield samples_table(pending)
