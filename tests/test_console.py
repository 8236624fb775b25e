"""plabel.console: the progress lines and the capture of everything else into the log file."""
import io
import subprocess
import sys
import textwrap

from plabel import console as console_mod
from plabel.console import Console


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_progress_lines_every_tenth_or_every_interval(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console_mod.time, "monotonic", clock)
    out = io.StringIO()
    con = Console(out, live=False)
    with con.progress("label", 100, "images", every_s=30) as bar:
        for _ in range(25):  # 4 images every 2 s: 2 images/s
            clock.t += 2
            bar.advance(4)
        clock.t += 2
        bar.advance(0)  # 2 s later, nothing new: no second line for 100
    lines = out.getvalue().splitlines()
    # a line whenever 10 more images are done (at 12, 24, ... 96) and at the end (100)
    assert [int(ln.split()[1].split("/")[0]) for ln in lines] == [12, 24, 36, 48, 60, 72, 84, 96, 100]
    assert lines[0] == "[label] 12/100 images, 2.00 images/s, ETA 0:44"
    assert lines[-1] == "[label] 100/100 images, 2.00 images/s"


def test_slow_steps_show_seconds_per_unit_and_a_line_per_interval(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console_mod.time, "monotonic", clock)
    out = io.StringIO()
    bar = Console(out, live=False).progress("teacher", 80, "epochs", every_s=10)
    clock.t += 12.5
    bar.update(1, note="loss 0.5000")  # 1 epoch < 8 (10 %) but 12.5 s > 10 s: a line
    clock.t += 5
    bar.update(2)  # neither: no line
    assert out.getvalue().splitlines() == ["[teacher] 1/80 epochs, 12.5 s per epoch, ETA 16:28, loss 0.5000"]


SCRIPT = textwrap.dedent("""
    import os, sys
    from plabel.console import capture_logs
    with capture_logs(sys.argv[1], verbose=sys.argv[2] == "1") as con:
        con.echo("plabel line")
        print("python print")
        os.write(1, b"raw fd 1\\n")
        os.write(2, b"raw fd 2\\n")
        sys.stderr.write("python stderr\\n")
    print("after")
""")


def _run(tmp_path, verbose: bool):
    log = tmp_path / f"v{int(verbose)}" / "plabel.log"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"],
                       capture_output=True, text=True, check=True)
    return p.stdout, p.stderr, log.read_text()


def test_capture_sends_every_other_write_to_the_log(tmp_path):
    out, err, log = _run(tmp_path, verbose=False)
    assert out.splitlines() == ["plabel line", "after"] and err == ""
    assert sorted(log.splitlines()) == ["python print", "python stderr", "raw fd 1", "raw fd 2"]


def test_verbose_shows_them_on_the_console_too(tmp_path):
    out, err, log = _run(tmp_path, verbose=True)
    # verbose leaves the descriptors alone (raw writes reach the terminal, not the file) and tees Python's
    assert sorted(out.splitlines()) == ["after", "plabel line", "python print", "raw fd 1"]
    assert sorted(err.splitlines()) == ["python stderr", "raw fd 2"]
    assert sorted(log.splitlines()) == ["python print", "python stderr"]


def test_live_display_on_a_terminal_keeps_plabel_lines_above_the_bar():
    out = io.StringIO()
    con = Console(out, live=True)  # as on a terminal: rich draws the bar
    with con.progress("teacher", 5, "epochs") as bar:
        for i in range(5):
            bar.update(i + 1, note=f"loss {1 / (i + 1):.3f}")
            con.echo(f"line {i}")
    con.echo("after")
    text = out.getvalue()
    for i in range(5):
        assert f"line {i}\n" in text
    assert "5/5" in text and "loss 0.200" in text  # the bar's last frame
    assert text.endswith("after\n")
