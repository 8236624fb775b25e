"""The CLI's checks of its inputs, run before any Ray job starts, so that a wrong argument ends
in one line naming it (cli/errors.py) instead of a failure inside a worker.

Each check raises :class:`cli.errors.UsageError` with ``<what is wrong> (<option> <value>)``.
"""
from __future__ import annotations

import re
import socket
from typing import Optional

from plabel.cli.errors import UsageError


def _named(option: str, value) -> str:
    # local: storage imports pyarrow; it is loaded by the time a check runs
    from plabel.data.storage import redact

    return f"{option} {redact(str(value))}" if option else redact(str(value))


def manifest(option: str, location: str) -> dict:
    """The manifest of an ingested folder (or of the manifest.json given)."""
    from plabel.data.ingest import IngestError, load_manifest  # local: keeps --help light

    try:
        return load_manifest(location)
    except IngestError as exc:
        text = str(exc)
        if text.startswith("manifest not found"):
            text = "no manifest.json: not a folder written by `plabel ingest`"
        raise UsageError(f"{text} ({_named(option, location)})") from None


def split(option: str, value: str, manifest_: dict) -> None:
    """``value`` must be a split of the manifest."""
    if value not in manifest_["splits"]:
        raise UsageError(f"unknown split {value!r}; the data has {sorted(manifest_['splits'])} ({option} {value})")


def checkpoint(option: str, location: str, classes: Optional[list[str]] = None, data_option: str = "",
               with_config: bool = False):
    """Load a U-Net checkpoint on the driver (a missing or foreign file fails here, not in a
    worker); with ``classes``, its classes must equal the data's. Returns its metadata, or
    (UNetConfig, metadata) ``with_config``."""
    from plabel.method.unet import CheckpointError, load_checkpoint  # local: torch

    where = _named(option, location)
    try:
        _, config, extra = load_checkpoint(location)
    except FileNotFoundError:
        raise UsageError(f"no such checkpoint file ({where})") from None
    except CheckpointError as exc:
        raise UsageError(f"{_without_name(str(exc), location)} ({where})") from None
    if classes is not None:
        classes_fit(option, location, extra, classes, data_option)
    return (config, extra) if with_config else extra


def classes_fit(option: str, location: str, extra: dict, classes: list[str], data_option: str = "") -> None:
    """The classes a checkpoint's metadata ``extra`` records must equal the data's ``classes``."""
    from plabel.method.unet import CheckpointError, check_classes  # local: torch

    try:
        check_classes(extra, classes, "the checkpoint")
    except CheckpointError as exc:
        raise UsageError(f"{exc} ({_named(option, location)}{', ' + data_option if data_option else ''})") from None


def _without_name(text: str, location: str) -> str:
    """A message that starts with the file's name, told without it (the option names the file)."""
    from plabel.data.storage import redact  # local: pyarrow, loaded by now

    name = redact(str(location))
    if not text.startswith(name):
        return text
    rest = text[len(name):].lstrip(" :")
    return f"the file {rest}" if rest.startswith("is ") else rest


def address(value: Optional[str], timeout: float = 3.0) -> None:
    """A ``host:port`` or ``ray://host:port`` address must accept a TCP connection (Ray itself
    retries for minutes before it gives up). None and "auto" are left to Ray."""
    if not value or value == "auto":
        return
    m = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)/?", value)
    if not m:
        raise UsageError(f"expected 'auto', host:port or ray://host:port (--address {value})")
    host, port = m.group(1), int(m.group(2))
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UsageError(f"cannot reach a Ray cluster at {host}:{port}: {reason} (--address {value})") from None


def config_error(exc: Exception, options: dict[str, str]) -> UsageError:
    """A ConfigError of a section the CLI built from its options ("label.sam.backend: expected ...,
    got 'x'"), told with the option's name instead of the dotted key."""
    text = str(exc)
    key, sep, rest = text.partition(": ")
    if sep and key in options:
        return UsageError(f"{rest} ({options[key]})")
    return UsageError(text)
