"""How the CLI ends on an error: one line on stderr, no traceback (``--debug`` shows it).

    error: <what is wrong> (<the input>)      exit 2: a user mistake (a missing file, a bad option,
                                                       a checkpoint that does not fit the data ...)
    error: internal error: <type>: <message>  exit 1: anything else (a bug: rerun with --debug)

Every command runs inside :class:`PlabelGroup`, which maps exceptions to these lines; commands
only raise. Light on purpose: no torch, Ray or pyarrow (``plabel --help`` stays fast).
"""
from __future__ import annotations

import sys
import traceback

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from plabel.errors import InputError

#: on: set by ``--debug`` (print the traceback too); log_file: the command's log file, if any
#: (an internal error names it: the traceback and the framework's lines are there).
DEBUG: dict = {"on": False, "log_file": None}


class UsageError(Exception):
    """A user mistake found by the CLI's own checks; its message names the input."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: plabel's InputError (IngestError, CheckpointError,
    ImageDecodeError, ShardError ... derive from it), the config's ConfigError (loaded when a
    config was read) and the file-system errors about the paths given."""
    types: list[type[BaseException]] = [UsageError, InputError, FileNotFoundError, FileExistsError,
                                        IsADirectoryError, NotADirectoryError, PermissionError, ConnectionError]
    config = sys.modules.get("plabel.schemas.config")  # not imported here: it loads pydantic
    if config is not None:
        types.append(config.ConfigError)
    return tuple(types)


_RAY_DATA_RETRY_NOTE = "Failed to apply UDF transform after"


def _text(exc: BaseException) -> str:
    """The message of ``exc`` on one line (Ray wraps task errors: their cause's message)."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the original exception
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        text = f"{exc.strerror} ({exc.filename})"
    else:
        text = str(exc) or type(exc).__name__
    text = text.split(_RAY_DATA_RETRY_NOTE)[0]  # Ray Data appends its retry advice to a UDF's error
    return " ".join(text.split())


def _user_cause(exc: BaseException) -> BaseException | None:
    """The user error inside ``exc``: itself, or the one a Ray task raised (RayTaskError keeps it as
    ``cause``; Ray Data wraps a UDF's error in UserCodeException, its ``__cause__``)."""
    seen: set[int] = set()
    types = _user_error_types()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, types):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, message) for an exception that ended a command."""
    user = _user_cause(exc)
    if user is not None:
        return 2, _text(user)
    where = f"; log: {DEBUG['log_file']}" if DEBUG.get("log_file") else ""
    return 1, f"internal error: {type(exc).__name__}: {_text(exc)} (rerun with --debug for the traceback{where})"


class PlabelGroup(TyperGroup):
    """Typer's command group, with plabel's error lines around every command."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException):  # Typer's own exits and usage errors
            raise
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if DEBUG["on"]:
                traceback.print_exc()
            code, message = describe(exc)
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code) from None
