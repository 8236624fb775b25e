"""Files on local disk or in object storage, through ``pyarrow.fs`` (no Ray needed).

A *location* is either a local path (``runs/x``, ``/data/shards``) or a URI with one of the
schemes in :data:`SCHEMES` (``s3://bucket/key``, ``gs://bucket/key``, ``gcs://...``,
``file:///abs/path``). Credentials come from pyarrow's standard chains (AWS: environment, shared
config/credentials files, instance or pod identity; GCS: application default credentials).
A URI's user info and query string may carry options for pyarrow, so :func:`redact` strips them
whenever a location is named in a message or a log.

Writes are all-or-nothing: on local disk a temporary file in the target folder is renamed into
place; in an object store an object only appears once its upload has completed.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import tempfile
from urllib.parse import unquote

import pyarrow.fs as pafs

__all__ = [
    "SCHEMES",
    "StorageError",
    "copy_file",
    "default_cache_dir",
    "delete_dir",
    "dirname",
    "exists",
    "is_dir",
    "is_remote",
    "is_uri",
    "join",
    "list_dir",
    "list_files",
    "local_copy",
    "local_path",
    "makedirs",
    "read_bytes",
    "read_text",
    "redact",
    "resolve",
    "resolve_all",
    "scheme",
    "write_bytes",
    "write_text",
]

#: URI schemes plabel reads and writes (``gcs`` is an alias of ``gs``).
SCHEMES = ("s3", "gs", "gcs", "file")

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # files written through a temporary file get open()'s usual mode


class StorageError(ValueError):
    """A location that cannot be used (unknown scheme, malformed URI); the message names it."""


def is_uri(location) -> bool:
    """True for ``scheme://...`` strings, False for local paths."""
    return bool(_URI.match(str(location)))


def scheme(location) -> str | None:
    """The lower-case URI scheme, or None for a local path."""
    m = _URI.match(str(location))
    return m.group(1).lower() if m else None


def is_remote(location) -> bool:
    """True for object-store URIs; local paths and ``file://`` URIs are local."""
    return is_uri(location) and scheme(location) != "file"


def local_path(location) -> str:
    """The local path of a local path (unchanged) or of a ``file://`` URI."""
    if is_remote(location):
        raise StorageError(f"{redact(location)}: expected a local path, got an object-store URI")
    return resolve(location)[1] if is_uri(location) else os.fspath(location)


def redact(location) -> str:
    """``location`` safe to print: a URI loses its user info, query string and fragment."""
    text = os.fspath(location) if not isinstance(location, str) else location
    if not is_uri(text):
        return text
    head, rest = text.split("://", 1)
    authority, sep, path = rest.partition("/")
    authority = authority.rpartition("@")[2]
    path = path.split("?", 1)[0].split("#", 1)[0]
    authority = authority.split("?", 1)[0].split("#", 1)[0]
    return f"{head}://{authority}{sep}{path}"


def _split_uri(uri: str) -> tuple[str, str, str]:
    """(``scheme://[userinfo@]authority``, path without leading '/', ``?query`` or '')."""
    base, q, query = uri.partition("?")
    head, rest = base.split("://", 1)
    authority, _, path = rest.partition("/")
    return f"{head}://{authority}", path, (q + query)


@functools.lru_cache(maxsize=64)
def _filesystem(root: str) -> pafs.FileSystem:
    """One filesystem per bucket (and options): S3 may look up the bucket's region once."""
    return pafs.FileSystem.from_uri(root)[0]


def resolve(location) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path in it)`` for a local path or a URI.

    Local paths map to ``LocalFileSystem`` and an absolute path; ``s3://``, ``gs://``, ``gcs://``
    and ``file://`` URIs go through ``pyarrow.fs.FileSystem.from_uri``. Anything else raises
    StorageError naming the (redacted) location.
    """
    if not isinstance(location, str):
        location = os.fspath(location)
    sch = scheme(location)
    if sch is None:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    if sch not in SCHEMES:
        raise StorageError(
            f"{redact(location)}: unsupported storage scheme {sch!r} (use a local path or one of "
            + ", ".join(f"{s}://" for s in SCHEMES) + ")")
    try:
        if sch == "file":
            return pafs.FileSystem.from_uri(location)
        root, path, query = _split_uri(location)
        bucket = root.split("://", 1)[1].rpartition("@")[2]
        if not bucket:
            raise StorageError(f"{redact(location)}: the URI names no bucket")
        return _filesystem(root + query), unquote(f"{bucket}/{path}".rstrip("/"))
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised naming the location without its credentials
        # pyarrow's message may quote the whole URI: only shown when the URI carries nothing to hide
        detail = f": {exc}" if redact(location) == location else ""
        raise StorageError(f"{redact(location)}: cannot open the storage ({type(exc).__name__}{detail})") from None


def resolve_all(locations) -> tuple[pafs.FileSystem | None, list[str]]:
    """Resolve several locations that must share one filesystem.

    Returns ``(None, local paths unchanged)`` when all are local, else ``(filesystem, paths)``.
    Mixing local paths, schemes or buckets raises StorageError.
    """
    locations = [os.fspath(x) if not isinstance(x, str) else x for x in locations]
    if not any(is_uri(x) for x in locations):
        return None, locations
    roots = {_split_uri(x)[0] + _split_uri(x)[2] if is_uri(x) else "" for x in locations}
    if len(roots) > 1:
        names = sorted({redact(_split_uri(x)[0]) if is_uri(x) else "local paths" for x in locations})
        raise StorageError(f"locations must share one filesystem, got {', '.join(names)}")
    fs, paths = None, []
    for x in locations:
        fs, path = resolve(x)
        paths.append(path)
    return fs, paths


def join(base, *parts: str) -> str:
    """``base/part/...`` for a local path (os.path.join) or a URI (keeping its query string)."""
    base = os.fspath(base) if not isinstance(base, str) else base
    if not is_uri(base):
        return os.path.join(base, *parts)
    root, path, query = _split_uri(base)
    pieces = [p for p in [path.strip("/"), *(str(p).strip("/") for p in parts)] if p]
    return f"{root}/{'/'.join(pieces)}{query}"


def dirname(location) -> str:
    """The parent folder of a local path, or the parent prefix of a URI (keeping its query string)."""
    location = os.fspath(location) if not isinstance(location, str) else location
    if not is_uri(location):
        return os.path.dirname(location)
    root, path, query = _split_uri(location)
    parent = path.rstrip("/").rpartition("/")[0]
    return f"{root}/{parent}{query}" if parent else f"{root}{query}"


def _info(location) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, path = resolve(location)
    return fs, path, fs.get_file_info(path)


def exists(location) -> bool:
    """True when a file or a folder (an object-store prefix with objects under it) is there."""
    return _info(location)[2].type != pafs.FileType.NotFound


def is_dir(location) -> bool:
    """True for a folder, or an object-store prefix with objects under it."""
    return _info(location)[2].type == pafs.FileType.Directory


def _not_found(location) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "no such file", redact(location))


def read_bytes(location) -> bytes:
    """The whole file; FileNotFoundError naming the location when it is missing."""
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except OSError:
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise _not_found(location) from None
        raise


def read_text(location, encoding: str = "utf-8") -> str:
    """The whole file decoded as text."""
    return read_bytes(location).decode(encoding)


def write_bytes(location, data: bytes) -> None:
    """Write a whole file atomically: readers see the old content or the new, never a part.

    Local disk: a temporary file in the same folder, fsync, ``os.replace``. Object stores: one
    upload, the object appears only when it completed.
    """
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
        try:
            os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 -> what open() would give
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def write_text(location, text: str, encoding: str = "utf-8") -> None:
    """:func:`write_bytes` of ``text`` encoded."""
    write_bytes(location, text.encode(encoding))


def makedirs(location) -> None:
    """Create a local folder and its parents; a no-op in object stores (prefixes need no folder)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)


def list_files(location, suffix: str = "") -> list[str]:
    """Sorted locations of the files under ``location`` (recursively) whose names end with ``suffix``.

    Returned in the caller's form: local paths under a local path, URIs under a URI. A missing
    location gives [].
    """
    fs, path = resolve(location)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    base = os.fspath(location) if not isinstance(location, str) else location
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.base_name.endswith(suffix):
            continue
        rel = info.path[len(path):].lstrip("/")
        out.append(join(base, *rel.split("/")))
    return sorted(out)


def list_dir(location) -> list[str]:
    """Sorted locations of the entries (files and folders) directly under ``location``; [] if missing."""
    fs, path = resolve(location)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    base = os.fspath(location) if not isinstance(location, str) else location
    return sorted(join(base, info.base_name) for info in fs.get_file_info(selector))


def delete_dir(location) -> None:
    """Remove a folder (object-store prefix) and everything under it; missing is fine."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(path)


def copy_file(src, dst) -> None:
    """Copy one file between any two locations (server-side inside one object store).

    A local destination is written atomically (temporary file + ``os.replace``).
    """
    sfs, spath = resolve(src)
    dfs, dpath = resolve(dst)
    if sfs.get_file_info(spath).type != pafs.FileType.File:
        raise _not_found(src)
    if isinstance(dfs, pafs.LocalFileSystem):
        folder = os.path.dirname(dpath)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dpath)}.tmp-", dir=folder)
        os.close(fd)
        try:
            pafs.copy_files(spath, tmp, source_filesystem=sfs, destination_filesystem=dfs)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, dpath)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    elif sfs.type_name == dfs.type_name and sfs.equals(dfs):
        dfs.copy_file(spath, dpath)
    else:
        pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def default_cache_dir() -> str:
    """``$PLABEL_CACHE_DIR`` or ``~/.cache/plabel/storage``: where :func:`local_copy` keeps files."""
    return os.environ.get("PLABEL_CACHE_DIR") or os.path.expanduser("~/.cache/plabel/storage")


def local_copy(location, cache_dir=None):
    """A local path holding the file at ``location``; local paths are returned unchanged.

    A remote file is downloaded once into ``cache_dir`` (default :func:`default_cache_dir`),
    under a name keyed by its URI, size and modification time, so a file rewritten at the same
    URI is fetched again. The download goes to a temporary name renamed into place, so
    concurrent processes never see a partial copy.
    """
    if not is_remote(location):
        return local_path(location)
    fs, path, info = _info(location)
    if info.type != pafs.FileType.File:
        raise _not_found(location)
    head, rest = str(location).split("://", 1)
    authority, sep, path_part = rest.partition("/")
    keyed = f"{head}://{authority.rpartition('@')[2]}{sep}{path_part}"  # the URI less its user info
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    key = hashlib.sha256(f"{keyed}\n{info.size}\n{mtime}".encode()).hexdigest()[:16]
    folder = os.path.join(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(), key)
    dest = os.path.join(folder, info.base_name or "file")
    if os.path.exists(dest) and os.path.getsize(dest) == info.size:
        return dest
    copy_file(location, dest)
    return dest
