"""What a person sees while plabel works: stage lines, one live progress display per long step, and
the framework's logs kept out of the way (Ray-free; rich draws the live display).

    console = Console(sys.stdout)
    with console.progress("label", total=140, unit="images") as bar:   # done of total, rate, ETA
        bar.advance(16)
    console.echo("[label] finished in 412.0 s: 140 rows (ok 140, empty 0, error 0)")

On a terminal the display is a live rich bar; elsewhere (CI, a log file, `plabel submit`'s job log)
it is a plain line at most every ``every_s`` seconds or 10 % of the total, plus the last one.

:func:`capture_logs` sends everything else written to stdout / stderr while it is active (Ray's
logging, its C++ core worker, the workers' forwarded output, warnings) to a log file, at the level
of the file descriptors, so that the console holds only plabel's own lines.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Callable, Iterator, Optional


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of one step: ``done`` of ``total`` ``unit`` (total may be None: unknown), its rate and
    ETA. Use :meth:`Console.progress`; update with :meth:`advance` (a count) or :meth:`update` (the
    count so far); ``note`` is shown after the numbers (e.g. the last epoch's loss)."""

    def __init__(self, console: "Console", label: str, total: Optional[int], unit: str, every_s: float = 10.0,
                 echo: Optional[Callable[[str], None]] = None):
        self.console, self.label, self.total, self.unit, self.every_s = console, label, total, unit, every_s
        self.echo = echo or console.echo
        self.done, self.note = 0, ""
        self.t0 = time.monotonic()
        self._last_line_t, self._last_line_done = self.t0, 0
        self._live = None
        if console.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn,  # local: rich only on a terminal
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.progress import Progress as RichProgress

            self._live = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn(unit), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"),
                                      console=console.rich, transient=True,
                                      redirect_stdout=False, redirect_stderr=False)  # capture_logs owns them
            self._task = self._live.add_task(label, total=total, rate="", note="")
            self._live.start()

    # -- numbers
    def rate(self) -> Optional[float]:
        """Units per second so far (None before the first)."""
        elapsed = time.monotonic() - self.t0
        return self.done / elapsed if self.done and elapsed > 0 else None

    def eta(self) -> Optional[float]:
        """Seconds left at the rate so far (None when unknown)."""
        r = self.rate()
        return (self.total - self.done) / r if r and self.total is not None else None

    def rate_text(self, short: bool = False) -> str:
        """The rate for a person: ``2.31 images/s`` or, below one per second, ``3.7 s per image``
        (short, for the live bar: ``2.31/s``, ``3.7 s/image``); "" before the first unit."""
        r, one = self.rate(), self.unit.rstrip("s")
        if r is None:
            return ""
        if r >= 1:
            return f"{r:.2f}/s" if short else f"{r:.2f} {self.unit}/s"
        return f"{1 / r:.1f} s/{one}" if short else f"{1 / r:.1f} s per {one}"

    def line(self) -> str:
        """``[label] 64/140 images, 2.31 images/s, ETA 0:33, <note>``."""
        eta = self.eta()
        parts = [f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"]
        parts[0] += f" {self.unit}"
        rate = self.rate_text()
        if rate:
            parts.append(rate)
        if eta is not None and self.done < (self.total or 0):
            parts.append(f"ETA {_fmt_duration(eta)}")
        if self.note:
            parts.append(self.note)
        return f"[{self.label}] " + ", ".join(parts)

    # -- updates
    def advance(self, n: int = 1, total: Optional[int] = None, note: Optional[str] = None) -> None:
        self.update(self.done + n, total=total, note=note)

    def update(self, done: int, total: Optional[int] = None, note: Optional[str] = None) -> None:
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        self.done = done
        if self._live is not None:
            self._live.update(self._task, completed=done, total=self.total, note=self.note,
                              rate=self.rate_text(short=True))
            return
        now = time.monotonic()
        step = max(1, (self.total or 0) // 10)
        moved = done != self._last_line_done or note is not None
        finished = self.total is not None and done >= self.total and done != self._last_line_done
        if finished or done - self._last_line_done >= step or (moved and now - self._last_line_t >= self.every_s):
            self._last_line_t, self._last_line_done = now, done
            self.echo(self.line())

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Console:
    """plabel's lines for a person, written to ``out`` (default sys.stdout at construction).
    live: draw rich progress bars (default: ``out`` is a terminal)."""

    def __init__(self, out: Optional[IO[str]] = None, live: Optional[bool] = None):
        self.out = out if out is not None else sys.stdout
        self.live = bool(live if live is not None else getattr(self.out, "isatty", lambda: False)())
        self._rich = None

    @property
    def rich(self):
        if self._rich is None:
            from rich.console import Console as RichConsole  # local: rich only for live displays

            self._rich = RichConsole(file=self.out, force_terminal=True)
        return self._rich

    def echo(self, line: str = "") -> None:
        """One line on the console (above a live progress display, if one is shown)."""
        if self.live:
            self.rich.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        self.out.write(f"{line}\n")
        self.out.flush()

    def progress(self, label: str, total: Optional[int], unit: str, every_s: float = 10.0,
                 echo: Optional[Callable[[str], None]] = None) -> Progress:
        """A progress display for one step (plain lines go to ``echo``, default :meth:`echo`)."""
        return Progress(self, label, total, unit, every_s=every_s, echo=echo)

    def epoch_progress(self, label: str, epochs: int, echo: Optional[Callable[[str], None]] = None
                       ) -> tuple[Progress, Callable[[dict], None]]:
        """(progress, on_epoch) for a U-Net training of ``epochs`` epochs: on_epoch takes what
        plabel.jobs.train_job.train_unet reports after each epoch ({"epoch", "epochs", "loss",
        "val_dice"}) and shows it as ``k/n epochs, ..., loss L, val Dice D``."""
        bar = self.progress(label, epochs, "epochs", echo=echo)

        def on_epoch(e: dict) -> None:
            note = f"loss {e['loss']:.4f}" + (f", val Dice {e['val_dice']:.4f}" if e.get("val_dice") is not None else "")
            bar.update(int(e["epoch"]), total=int(e["epochs"]), note=note)

        return bar, on_epoch


class _Tee(io.TextIOBase):
    """A text stream that writes to a log file (and, when verbose, to the console too)."""

    def __init__(self, log: IO[str], console: Optional[IO[str]]):
        self.log, self.console = log, console

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        if self.console is not None:
            self.console.write(text)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        if self.console is not None:
            self.console.flush()

    def isatty(self) -> bool:
        return False


def _real_fd(stream) -> Optional[int]:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def capture_logs(log_file: str | os.PathLike, verbose: bool = False) -> Iterator[Console]:
    """Run the body with stdout / stderr going to ``log_file`` (appended); yields the Console that
    still reaches the person (the stdout of before). verbose: the log lines also reach the console.

    File descriptors 1 and 2 are redirected too (when they are real), so output that bypasses
    Python's sys.stdout (Ray's C++ core worker, processes started inside the body) lands in the
    file; they are restored on exit, also on an exception."""
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    out.flush()
    err.flush()
    fds = {fd: _real_fd(s) for fd, s in ((1, out), (2, err))}
    redirect = not verbose and fds[1] == 1 and fds[2] == 2
    console_stream = os.fdopen(os.dup(1), "w", buffering=1, closefd=True) if fds[1] == 1 else out
    console = Console(console_stream, live=getattr(out, "isatty", lambda: False)())
    log = open(path, "a", encoding="utf-8", buffering=1)
    saved = {}
    try:
        if redirect:
            for fd in (1, 2):
                saved[fd] = os.dup(fd)
                os.dup2(log.fileno(), fd)
        sys.stdout = _Tee(log, console_stream if verbose else None)
        sys.stderr = _Tee(log, (err if fds[2] != 2 else os.fdopen(os.dup(2), "w", buffering=1)) if verbose else None)
        yield console
    except BaseException:
        traceback.print_exc(file=log)  # the file keeps the traceback the console does not show
        raise
    finally:
        tee_err = sys.stderr
        sys.stdout, sys.stderr = out, err
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        if verbose and isinstance(tee_err, _Tee) and tee_err.console is not err and tee_err.console is not None:
            tee_err.console.close()
        log.close()
        if console_stream is not out:
            console_stream.flush()
            console_stream.close()
