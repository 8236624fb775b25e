"""plabel.jobs.runner: the stage runner on hand-made stages (no Ray, no models).

Stage A writes a.txt from the config value ``x``; stage B reads a.txt and writes b.txt; stage C never
applies. What runs, what is skipped and what results.json records are checked against by-hand lists."""
import json
from pathlib import Path
from types import SimpleNamespace

from plabel.jobs.runner import RunContext, Stage, digest, run_stages


def _stages(calls: list):
    def run_a(ctx):
        calls.append("a")
        (ctx_path(ctx, "a.txt")).write_text(f"a={ctx.cfg.x}")
        return {"value": ctx.cfg.x}

    def run_b(ctx):
        calls.append("b")
        ctx_path(ctx, "b.txt").write_text(ctx_path(ctx, "a.txt").read_text() + "+b")
        return {}

    return [
        Stage("a", reads=("x",), writes=("a.txt",), key=lambda ctx: {"x": ctx.cfg.x}, run=run_a, ray=False,
              summary=lambda out: f"value {out['value']}"),
        Stage("b", reads=("a.txt",), writes=("b.txt",), key=lambda ctx: {"a": ctx.sha("a.txt")}, run=run_b),
        Stage("c", reads=(), writes=("c.txt",), key=lambda ctx: {}, run=lambda ctx: calls.append("c"),
              applies=lambda ctx: "not in this run (no c)"),
    ]


def ctx_path(ctx, name):
    return Path(ctx.at(name))


def _run(tmp_path, x, calls, connects, results=None):
    lines = []
    ctx = RunContext(SimpleNamespace(x=x), str(tmp_path), lines.append, results or {"stages": {}})
    run_stages(_stages(calls), ctx, connect=lambda: connects.append(1))
    return ctx, lines


def test_stages_run_once_and_are_recorded(tmp_path):
    calls, connects = [], []
    ctx, lines = _run(tmp_path, 1, calls, connects)
    assert calls == ["a", "b"] and connects == [1]  # Ray connected once, before b (a needs none)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == ctx.results and set(saved["stages"]) == {"a", "b"}  # c left out: no entry
    assert saved["stages"]["a"]["key"] == digest({"x": 1}) and saved["stages"]["a"]["value"] == 1
    assert all(saved["stages"][s]["done"] is True and saved["stages"][s]["wall_s"] >= 0 for s in "ab")
    assert "[c] not in this run (no c)" in lines
    assert any(line.startswith("[a] finished in ") and line.endswith(": value 1") for line in lines)

    calls.clear()
    ctx, lines = _run(tmp_path, 1, calls, connects, saved)
    assert calls == [] and connects == [1]  # nothing ran, Ray never needed
    assert "[a] done in an earlier run, skipped" in lines and "[b] done in an earlier run, skipped" in lines


def test_a_changed_setting_reruns_the_stage_and_what_reads_its_output(tmp_path):
    calls, connects = [], []
    ctx, _ = _run(tmp_path, 1, calls, connects)
    calls.clear()
    ctx, lines = _run(tmp_path, 2, calls, connects, ctx.results)
    assert calls == ["a", "b"]  # b's input a.txt changed with a's setting
    assert "[a] the earlier result is out of date (its inputs or settings changed): running again" in lines
    assert (tmp_path / "b.txt").read_text() == "a=2+b"
    assert ctx.results["stages"]["a"]["value"] == 2


def test_a_lost_output_reruns_only_its_stage(tmp_path):
    calls, connects = [], []
    ctx, _ = _run(tmp_path, 1, calls, connects)
    (tmp_path / "b.txt").unlink()
    calls.clear()
    ctx, lines = _run(tmp_path, 1, calls, connects, ctx.results)
    assert calls == ["b"]
    assert "[b] the earlier result is out of date (b.txt missing): running again" in lines


def test_an_entry_of_an_older_run_without_a_key_counts_as_done(tmp_path):
    """results.json written before stage keys existed: a done stage with its outputs stays done."""
    calls, connects = [], []
    (tmp_path / "a.txt").write_text("a=1")
    (tmp_path / "b.txt").write_text("a=1+b")
    old = {"stages": {"a": {"done": True, "wall_s": 1.0}, "b": {"done": True, "wall_s": 1.0}}}
    _, lines = _run(tmp_path, 1, calls, connects, old)
    assert calls == [] and connects == []
