"""The one exception type for bad input (plain Python: no torch, Ray or pyarrow).

An :class:`InputError` is the user's to fix: a file, folder, option or sample plabel cannot use.
Its message names the input. The CLI ends on it with ``error: <message>`` and exit code 2
(cli/errors.py); every other exception is a bug (exit 1). IngestError (plabel.data.ingest) and
CheckpointError (plabel.method.unet) are InputErrors; the config's ConfigError (plabel.schemas,
which imports nothing from plabel) is treated alike by the CLI.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message names it. A ValueError, so older callers still catch it."""
