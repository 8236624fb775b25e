"""plabel.data.storage on local disk and on S3 (a moto server, see conftest.py), and plabel's IO through it:
ingest, manifests, checkpoints, the pseudo-label table's commit protocol and, end to end, `plabel run`
with its shards and run directory in S3."""
import json
import os
import socket
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from plabel.cli.main import app
from plabel.data import storage
from plabel.data.ingest import IngestError, ingest, load_manifest, shard_paths
from plabel.data.synthetic import make_synthetic_dataset
from plabel.data.table_commit import (
    MARKER_NAME,
    IncompleteTableError,
    _clear_output,
    _commit_table,
    read_pseudo_labels,
    table_marker,
)
from plabel.jobs.runner import run_pipeline
from plabel.jobs.train_job import pseudo_labelled_dataset
from plabel.method.unet import UNet, UNetConfig, checkpoint_sha256, load_checkpoint, save_checkpoint
from plabel.schemas.config import RunConfig, build, load_run_config
from plabel.schemas.tables import pseudo_label_schema

S3_BUCKET = "plabel-test"  # conftest.S3_BUCKET, created by the s3_server fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    """A fresh empty location: a local folder, or an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "base")
    return request.getfixturevalue("s3_prefix")


# ----------------------------------------------------------------------------- names and resolving


def test_is_uri_scheme_and_redact():
    assert storage.is_uri("s3://b/k") and storage.is_uri("GS://b/k") and not storage.is_uri("/a/b")
    assert not storage.is_uri("runs/x") and not storage.is_uri("C:/x")
    assert storage.scheme("GS://b/k") == "gs" and storage.scheme("a/b") is None
    assert storage.is_remote("s3://b/k") and not storage.is_remote("file:///tmp/x") and not storage.is_remote("x")
    assert storage.redact("s3://AKIA:s3cr3t@bkt/a/b.json?secret_key=s3cr3t&region=x#f") == "s3://bkt/a/b.json"
    assert storage.redact("gs://bkt?endpoint_override=h:1") == "gs://bkt"
    assert storage.redact("/local/path?x") == "/local/path?x"  # local paths are names, not URIs


def test_join_and_dirname():
    assert storage.join("s3://b/run/", "x", "y.pt") == "s3://b/run/x/y.pt"
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("s3://b/run?region=eu-west-1", "a") == "s3://b/run/a?region=eu-west-1"
    assert storage.join("runs", "a", "b") == os.path.join("runs", "a", "b")
    assert storage.dirname("s3://b/run/t.pt?region=x") == "s3://b/run?region=x"
    assert storage.dirname("s3://b/t.pt") == "s3://b"
    assert storage.dirname("/a/b/c") == "/a/b"


def test_resolve_local_and_file_uri(tmp_path):
    fs, path = storage.resolve("rel/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("rel/x")
    fs, path = storage.resolve(f"file://{tmp_path}/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/x"
    assert storage.local_path(f"file://{tmp_path}/x") == f"{tmp_path}/x"


def test_resolve_s3(s3_server):
    fs, path = storage.resolve(f"s3://{S3_BUCKET}/a/b.tar")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{S3_BUCKET}/a/b.tar"
    assert storage.resolve(f"s3://{S3_BUCKET}/a/")[1] == f"{S3_BUCKET}/a"


@pytest.mark.parametrize("uri", ["gs://anonymous@bkt/dir/f.parquet", "gcs://anonymous@bkt/dir/f.parquet"])
def test_resolve_gcs_without_network(uri):
    fs, path = storage.resolve(uri)
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bkt/dir/f.parquet"
    # pyarrow turns the user info 'anonymous' into anonymous credentials: nothing is looked up
    assert fs.__reduce__()[1][0]["anonymous"] is True


def test_resolve_gcs_default_credentials_is_lazy():
    fs, path = storage.resolve("gs://some-bucket/a/b")  # no request until a file is touched
    assert isinstance(fs, pafs.GcsFileSystem) and path == "some-bucket/a/b"


@pytest.mark.parametrize("bad", ["ftp://user:hunter2@host/x?token=hunter2", "hdfs://nn/x", "weird+s://b/x"])
def test_unknown_scheme_is_named_without_credentials(bad):
    with pytest.raises(storage.StorageError, match="unsupported storage scheme") as info:
        storage.resolve(bad)
    assert storage.redact(bad) in str(info.value)
    assert "hunter2" not in str(info.value)


def test_bad_uri_options_are_named_without_credentials():
    with pytest.raises(storage.StorageError, match="cannot open the storage") as info:
        storage.resolve("s3://AKIDX:hunter2@bkt/x?no_such_option=hunter2")
    assert "s3://bkt/x" in str(info.value) and "hunter2" not in str(info.value) and "AKIDX" not in str(info.value)
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.resolve("s3:///x")


def test_resolve_all_refuses_mixed_filesystems(s3_server):
    assert storage.resolve_all(["a", "b"]) == (None, ["a", "b"])
    fs, paths = storage.resolve_all([f"s3://{S3_BUCKET}/a", f"s3://{S3_BUCKET}/b"])
    assert isinstance(fs, pafs.S3FileSystem) and paths == [f"{S3_BUCKET}/a", f"{S3_BUCKET}/b"]
    with pytest.raises(storage.StorageError, match="one filesystem"):
        storage.resolve_all([f"s3://{S3_BUCKET}/a", "/local/b"])
    with pytest.raises(storage.StorageError, match="one filesystem") as info:
        storage.resolve_all(["s3://k:hunter2@x/a", "s3://y/b"])
    assert "hunter2" not in str(info.value)


# ----------------------------------------------------------------------------- file operations


def test_write_read_exists_list_delete(base):
    assert not storage.exists(base) and storage.list_files(base) == [] and storage.list_dir(base) == []
    storage.makedirs(base)
    storage.write_bytes(storage.join(base, "b", "x.parquet"), b"\x00\x01")
    storage.write_text(storage.join(base, "a.json"), '{"k": "ü"}')
    storage.write_text(storage.join(base, "b", "c", "y.parquet"), "y")
    assert storage.read_bytes(storage.join(base, "b", "x.parquet")) == b"\x00\x01"
    assert json.loads(storage.read_text(storage.join(base, "a.json"))) == {"k": "ü"}
    assert storage.exists(storage.join(base, "b")) and storage.is_dir(storage.join(base, "b"))
    assert storage.exists(storage.join(base, "a.json")) and not storage.is_dir(storage.join(base, "a.json"))
    assert not storage.exists(storage.join(base, "nope"))
    assert storage.list_files(base) == [storage.join(base, "a.json"), storage.join(base, "b", "c", "y.parquet"),
                                        storage.join(base, "b", "x.parquet")]
    assert storage.list_files(base, ".parquet") == [storage.join(base, "b", "c", "y.parquet"),
                                                    storage.join(base, "b", "x.parquet")]
    assert storage.list_dir(base) == [storage.join(base, "a.json"), storage.join(base, "b")]
    storage.write_text(storage.join(base, "a.json"), "new")  # overwrite
    assert storage.read_text(storage.join(base, "a.json")) == "new"
    storage.delete_dir(storage.join(base, "b"))
    assert storage.list_files(base) == [storage.join(base, "a.json")]
    storage.delete_dir(storage.join(base, "missing"))  # fine


def test_read_missing_names_location_without_credentials(base):
    missing = storage.join(base, "none.json")
    with pytest.raises(FileNotFoundError, match="none.json"):
        storage.read_bytes(missing)
    if storage.is_uri(base):
        secret = missing.replace("s3://", "s3://testing:testing@") + "?region=us-east-1"
        with pytest.raises(FileNotFoundError) as info:
            storage.read_text(secret)
        assert storage.redact(secret) in str(info.value) and "testing" not in str(info.value)


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "d" / "f.json"
    storage.write_text(str(target), "old")

    with pytest.raises(TypeError):
        storage.write_bytes(str(target), object())  # fails while writing the temp file
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]  # no temp file left


def test_copy_file_between_local_and_s3(tmp_path, s3_prefix):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3000))
    storage.copy_file(str(src), storage.join(s3_prefix, "w.bin"))  # upload
    storage.copy_file(storage.join(s3_prefix, "w.bin"), storage.join(s3_prefix, "copy", "w.bin"))  # in S3
    storage.copy_file(storage.join(s3_prefix, "copy", "w.bin"), str(tmp_path / "back" / "w.bin"))  # download
    assert (tmp_path / "back" / "w.bin").read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        storage.copy_file(storage.join(s3_prefix, "nope"), str(tmp_path / "x"))


def test_local_copy(tmp_path, s3_prefix):
    assert storage.local_copy("some/local.pt") == "some/local.pt"
    uri = storage.join(s3_prefix, "m.pt")
    storage.write_bytes(uri, b"first")
    cache = tmp_path / "cache"
    first = storage.local_copy(uri, cache)
    assert open(first, "rb").read() == b"first" and first.startswith(str(cache))
    assert storage.local_copy(uri, cache) == first  # cached
    time.sleep(1.1)  # S3 modification times have 1 s resolution
    storage.write_bytes(uri, b"second!")
    second = storage.local_copy(uri, cache)
    assert second != first and open(second, "rb").read() == b"second!"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        storage.local_copy(storage.join(s3_prefix, "missing.pt"), cache)


def test_unet_checkpoint_from_s3(tmp_path, s3_prefix, monkeypatch):
    monkeypatch.setenv("PLABEL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = UNetConfig(num_classes=2, base_channels=4, depth=2)
    save_checkpoint(tmp_path / "m.pt", UNet.from_config(cfg), cfg, {"role": "teacher"})
    uri = storage.join(s3_prefix, "m.pt")
    storage.copy_file(str(tmp_path / "m.pt"), uri)
    model, got_cfg, extra = load_checkpoint(uri)
    assert got_cfg == cfg and extra == {"role": "teacher"}
    ref = load_checkpoint(tmp_path / "m.pt")[0]
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert checkpoint_sha256(uri) == checkpoint_sha256(tmp_path / "m.pt")


def test_gcs_round_trip_with_emulator(tmp_path):
    """A GCS round trip through pyarrow's GcsFileSystem against gcp-storage-emulator (when installed)."""
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="gbkt")
    server.start()
    try:
        base = f"gs://anonymous@gbkt/run?scheme=http&endpoint_override=127.0.0.1:{port}"
        storage.write_text(storage.join(base, "a", "results.json"), '{"ok": 1}')
        assert json.loads(storage.read_text(storage.join(base, "a", "results.json"))) == {"ok": 1}
        assert storage.exists(storage.join(base, "a")) and storage.list_files(base) == [
            storage.join(base, "a", "results.json")]
        local = storage.local_copy(storage.join(base, "a", "results.json"), tmp_path / "cache")
        assert open(local).read() == '{"ok": 1}'
    finally:
        server.stop()


# ----------------------------------------------------------------------------- ingest and manifests


def test_config_keeps_uris(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: s3://b/runs\ndata: {shards: gs://b/shards}\n")
    cfg = load_run_config(tmp_path / "c.yaml")
    assert cfg.run_dir == "s3://b/runs" and cfg.data.shards == "gs://b/shards"


def test_ingest_to_s3_and_read_manifest(tmp_path, s3_prefix):
    src = make_synthetic_dataset(tmp_path / "data", n_images=8, size=32, seed=0)
    out = storage.join(s3_prefix, "shards")
    local = ingest(src, tmp_path / "local", counts={"labelled": 2, "test": 2}, shard_size=3)
    manifest = ingest(src, out, counts={"labelled": 2, "test": 2}, shard_size=3)
    assert manifest == local  # same bytes, same manifest
    assert load_manifest(out) == load_manifest(storage.join(out, "manifest.json")) == manifest
    paths = shard_paths(out, "unlabelled")
    assert paths == [storage.join(out, s["path"]) for s in manifest["splits"]["unlabelled"]["shards"]]
    for p, s in zip(paths, manifest["splits"]["unlabelled"]["shards"]):
        assert storage.read_bytes(p) == (tmp_path / "local" / s["path"]).read_bytes()
    assert not any(".plabel-ingest-" in f for f in storage.list_files(s3_prefix))
    assert ingest(src, out, counts={"labelled": 2, "test": 2}, shard_size=3) == manifest  # same request: fine
    with pytest.raises(IngestError, match="different ingest"):
        ingest(src, out, counts={"labelled": 3}, shard_size=3)
    # shards without a manifest (an interrupted upload) are replaced, anything else is refused
    half = storage.join(s3_prefix, "half")
    storage.write_bytes(storage.join(half, "unlabelled", "unlabelled-000007.tar"), b"partial")
    assert ingest(src, half, counts={"labelled": 2, "test": 2}, shard_size=3) == manifest
    assert [f[len(half):] for f in storage.list_files(half)] == [f[len(out):] for f in storage.list_files(out)]
    storage.write_text(storage.join(s3_prefix, "other", "x.txt"), "x")
    with pytest.raises(IngestError, match="not empty"):
        ingest(src, storage.join(s3_prefix, "other"), shard_size=3)
    with pytest.raises(IngestError, match="manifest not found"):
        load_manifest(storage.join(s3_prefix, "nothing"))
    with pytest.raises(IngestError, match="must be local"):
        ingest(out, tmp_path / "x")


# ----------------------------------------------------------------------------- the table's commit protocol


def _fake_table(location: str, n: int) -> None:
    """A table folder as Ray's write_parquet leaves it: Parquet parts, no marker."""

    schema = pseudo_label_schema(["a"])
    for part in range(2):
        rows = {f.name: [None] * n for f in schema}
        rows.update(id=[f"{part}-{i}" for i in range(n)], status=["ok"] * n)
        table = pa.Table.from_pydict(rows, schema=schema)
        fs, path = storage.resolve(storage.join(location, f"part-{part}.parquet"))
        storage.makedirs(storage.dirname(storage.join(location, f"part-{part}.parquet")))
        pq.write_table(table, path, filesystem=fs)


def test_table_commit_protocol(base):
    out, tmp = storage.join(base, "pseudo_labels"), storage.join(base, ".pseudo_labels.tmp-1234")
    storage.makedirs(base)
    _fake_table(tmp, 3)
    _commit_table(tmp, out, {"rows": 6, "ok": 6, "empty": 0, "error": 0, "unet_checkpoint_sha256": "ab"})
    assert not storage.exists(tmp)
    marker = table_marker(out)
    assert marker["rows"] == 6 and marker["files"] == ["part-0.parquet", "part-1.parquet"]
    assert sorted(read_pseudo_labels(out).column("id").to_pylist()) == sorted(f"{p}-{i}" for p in (0, 1) for i in range(3))
    with pytest.raises(FileExistsError, match="exists already"):
        _clear_output(out if storage.is_uri(out) else storage.local_path(out))

    if not storage.is_uri(base):
        return
    # object store: files without the marker are an interrupted commit
    half = storage.join(base, "half")
    _fake_table(half, 2)
    with pytest.raises(IncompleteTableError, match=MARKER_NAME) as info:
        read_pseudo_labels(half)
    assert storage.redact(half) in str(info.value)
    stale = storage.join(base, ".half.tmp-dead")
    _fake_table(stale, 1)
    _clear_output(half)  # what the next label job does before writing: clear the leftovers
    assert not storage.exists(half) and not storage.exists(stale)
    storage.write_text(storage.join(base, "foreign", "notes.txt"), "keep me")
    with pytest.raises(FileExistsError, match="not a plabel table"):
        _clear_output(storage.join(base, "foreign"))
    with pytest.raises(ValueError, match="not the bucket"):
        _clear_output(f"s3://{S3_BUCKET}")


# ----------------------------------------------------------------------------- end to end on S3


def test_run_pipeline_on_s3(tmp_path, s3_prefix, ray_local):
    """`plabel ingest` to S3, then `plabel run` with data.shards and run_dir in S3."""

    t0 = time.time()
    # tiny_run's image and U-Net sizes (test_pipeline.py), fewer images and epochs: SAM on CPU
    # dominates the run time, and the test only checks that every file goes to and comes from S3
    src = make_synthetic_dataset(tmp_path / "data", n_images=12, size=64, seed=1)
    shards = storage.join(s3_prefix, "shards")
    res = CliRunner().invoke(app, ["ingest", str(src), shards, "--labelled", "4", "--val", "1", "--test", "2",
                                   "--shard-size", "3"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"{shards}/manifest.json" in res.output
    train = {"image_size": 64, "base_channels": 8, "depth": 3, "batch_size": 3}
    # one student, one round: this test is about storage; soups and rounds are tested in test_pipeline.py
    cfg = build(RunConfig, {
        "name": "tiny", "run_dir": storage.join(s3_prefix, "runs"), "data": {"shards": shards},
        "teacher": {**train, "epochs": 1, "lr": 0.005}, "student": {**train, "epochs": 1, "soup": 1, "rounds": 1},
        # random_tiny SAM: the files are what is tested here; LiteMedSAM's masks are test_pipeline's
        "label": {"cleaning": {"threshold": 0.3}, "sam": {"backend": "random_tiny", "batch_size": 4},
                  "unet_batch_size": 4},
    })
    lines = []
    results = run_pipeline(cfg, echo=lambda m: (lines.append(m), print(f"{time.time() - t0:6.1f} {m}", flush=True)))
    run = storage.join(s3_prefix, "runs", "tiny")
    assert set(results["stages"]) == {"teacher", "calibrate", "label", "student", "evaluate"}
    assert results["run_dir"] == run
    for name in ("config.yaml", "environment.json", "results.json", "dice_table.txt", "teacher.pt", "student.pt",
                 "gate_policy.json"):
        assert storage.exists(storage.join(run, name)), name
    assert json.loads(storage.read_text(storage.join(run, "results.json")))["stages"]["label"]["rows"] == 5
    assert storage.list_files(storage.join(run, "ray_train"))  # Ray Train checkpoints in the bucket
    assert not any(".tmp-" in f for f in storage.list_files(run))  # no staging left behind

    # the pseudo-label table: one row per unlabelled image, committed with its marker
    table_dir = storage.join(run, "pseudo_labels")
    marker = json.loads(storage.read_text(storage.join(table_dir, MARKER_NAME)))
    assert marker["rows"] == 5 and marker["ok"] + marker["empty"] == 5 and marker["error"] == 0
    table = read_pseudo_labels(table_dir)
    manifest = load_manifest(shards)
    assert sorted(table.column("id").to_pylist()) == sorted(manifest["splits"]["unlabelled"]["ids"])
    assert set(table.column("status").to_pylist()) <= {"ok", "empty"}
    assert all(s.startswith(f"{shards}/unlabelled/") for s in table.column("shard").to_pylist())

    # re-running resumes: every stage is skipped
    lines.clear()
    run_pipeline(cfg, echo=lines.append)
    assert sum("skipped" in line for line in lines) == 5, lines

    # results.json lost the label stage (a crash after the commit): the committed table of this teacher is reused
    results_uri = storage.join(run, "results.json")
    saved = json.loads(storage.read_text(results_uri))
    del saved["stages"]["label"]
    storage.write_text(results_uri, json.dumps(saved))
    lines.clear()
    run_pipeline(cfg, echo=lines.append)
    assert any("reused" in line for line in lines), lines
    assert json.loads(storage.read_text(results_uri))["stages"]["label"]["rows"] == 5

    # a table without its marker is refused, naming the marker
    fs, path = storage.resolve(storage.join(table_dir, MARKER_NAME))
    fs.delete_file(path)
    with pytest.raises(IncompleteTableError, match=MARKER_NAME):
        read_pseudo_labels(table_dir)
    with pytest.raises(IncompleteTableError, match=MARKER_NAME):
        pseudo_labelled_dataset(table_dir, [], manifest["classes"], 64, "fixed")
    print(f"S3 end-to-end test: {time.time() - t0:.1f} s")
