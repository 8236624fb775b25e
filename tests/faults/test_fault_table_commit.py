"""The shard-by-shard table writer (plabel.data.table_commit) without Ray: parts, resume,
settings changes, duplicate and late rows, interrupted writes; on local disk and on S3."""
import json
import os

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from plabel.data import storage
from plabel.data.ingest import ingest, shard_paths
from plabel.data.synthetic import make_synthetic_dataset
from plabel.data.table_commit import (
    JOB_NAME,
    MARKER_NAME,
    IncompleteTableError,
    ShardTableWriter,
    expected_keys,
    part_names,
    read_pseudo_labels,
    table_files,
)
from plabel.schemas.tables import pseudo_label_schema, table_classes

CLASSES = ["a", "b"]
SCHEMA = pseudo_label_schema(CLASSES)
SETTINGS = {"classes": CLASSES, "unet_checkpoint_sha256": "ab"}


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "base")
    return request.getfixturevalue("s3_prefix")


def _shards(base, n=3):
    """Shard locations (the writer never opens them when the keys are given)."""
    return [storage.join(base, "shards", "unlabelled", f"unlabelled-{i:06d}.tar") for i in range(n)]


def _rows(shard, keys, status="ok"):
    d = {f.name: [None] * len(keys) for f in SCHEMA}
    d.update(id=[f"id-{k}" for k in keys], key=list(keys), shard=[storage.redact(shard)] * len(keys),
             status=[status] * len(keys), height=[4] * len(keys), width=[4] * len(keys))
    return pa.Table.from_pydict(d, schema=pa.schema(SCHEMA, metadata=None))  # as Ray may deliver it


def _writer(out, shards, keys, settings=SETTINGS):
    w = ShardTableWriter(out, shards, SCHEMA, settings)
    remaining = w.prepare()
    for s in remaining:  # keys known in advance, as a manifest gives them
        w.expected[storage.redact(s) if storage.is_remote(s) else os.path.abspath(s)] = frozenset(keys[s])
    return w, remaining


def _visible(out):
    """What a reader sees at the table location: FileNotFoundError / IncompleteTableError / ids."""
    try:
        fs, files = table_files(out)
    except (FileNotFoundError, IncompleteTableError) as e:
        return type(e).__name__

    return sorted(pads.dataset(files, filesystem=fs, format="parquet").to_table().column("id").to_pylist())


def test_shards_commit_as_they_complete_and_resume(base):
    out = storage.join(base, "table")
    shards = _shards(base)
    keys = {s: [f"{i}-{j}" for j in range(3)] for i, s in enumerate(shards)}
    w, remaining = _writer(out, shards, keys)
    assert remaining == shards and w.skipped == 0
    w.add(_rows(shards[0], keys[shards[0]][:2]))
    w.add(pa.concat_tables([_rows(shards[0], keys[shards[0]][2:]), _rows(shards[1], keys[shards[1]][:1])]))
    assert len(w.done) == 1 and w.in_flight == 1  # shard 0 complete and written, shard 1 buffered
    staged = storage.list_files(w.staging)
    assert [f.rsplit("/", 1)[-1] for f in staged] == [JOB_NAME, "part-unlabelled-000000.parquet"]
    assert _visible(out) == ("IncompleteTableError" if storage.is_remote(out) else "FileNotFoundError")
    del w  # the driver dies here: shard 1's buffered row is lost, shard 0's part stays

    w, remaining = _writer(out, shards, keys)
    assert remaining == shards[1:] and w.skipped == 1
    for s in remaining:
        w.add(_rows(s, keys[s]))
    counts = w.finish({"unet_checkpoint_sha256": "ab"})
    assert counts == {"rows": 9, "ok": 9, "empty": 0, "error": 0}
    assert _visible(out) == sorted(f"id-{k}" for s in shards for k in keys[s])
    marker = json.loads(storage.read_text(storage.join(out, MARKER_NAME)))
    assert marker["files"] == [f"part-unlabelled-{i:06d}.parquet" for i in range(3)]
    assert marker["rows"] == 9 and marker["unet_checkpoint_sha256"] == "ab"
    fs, files = table_files(out)

    assert table_classes(pq.read_schema(files[0], filesystem=fs)) == CLASSES  # schema metadata restored
    if not storage.is_remote(out):
        assert not os.path.exists(w.staging)  # renamed into place
    with pytest.raises(FileExistsError, match="exists already"):
        ShardTableWriter(out, shards, SCHEMA, SETTINGS).prepare()


def test_other_settings_discard_staged_parts(base):
    out = storage.join(base, "table")
    shards = _shards(base, 2)
    keys = {s: [f"{i}-0"] for i, s in enumerate(shards)}
    w, _ = _writer(out, shards, keys)
    w.add(_rows(shards[0], keys[shards[0]]))
    assert len(w.done) == 1
    w, remaining = _writer(out, shards, keys, settings={**SETTINGS, "unet_checkpoint_sha256": "cd"})
    assert remaining == shards and w.skipped == 0  # a new teacher: nothing reused
    assert [f.rsplit("/", 1)[-1] for f in storage.list_files(w.staging)] == [JOB_NAME]
    w, remaining = _writer(out, shards[:1], keys)  # another shard list is other settings too
    assert remaining == shards[:1] and w.skipped == 0


def test_duplicate_and_late_rows(tmp_path):
    out = str(tmp_path / "table")
    shards = _shards(str(tmp_path), 2)
    keys = {shards[0]: ["k0", "k1"], shards[1]: ["m0"]}
    w, _ = _writer(out, shards, keys)
    w.add(_rows(shards[0], ["k0", "k0"]))  # a row delivered twice
    w.add(_rows(shards[0], ["k1"]))
    assert len(w.done) == 1 and w.duplicates_dropped == 1
    w.add(_rows(shards[0], ["k1", "extra"], status="error"))  # after the part: k1 dropped, extra kept
    w.add(_rows(shards[1], ["m0"]))
    w.expected.clear()
    counts = w.finish({})
    assert counts["rows"] == 4 and counts["error"] == 1 and w.duplicates_dropped == 2
    assert _visible(out) == ["id-extra", "id-k0", "id-k1", "id-m0"]


def test_unknown_keys_wait_for_the_end_and_empty_shards_get_a_part(tmp_path):
    out = str(tmp_path / "table")
    shards = _shards(str(tmp_path), 2)
    w = ShardTableWriter(out, shards, SCHEMA, SETTINGS)
    w.prepare()  # the shard files do not exist: keys unknown
    assert set(w.expected.values()) == {None}
    w.add(_rows(shards[0], ["x", "y"]))
    assert not w.done
    assert w.finish({})["rows"] == 2
    assert sorted(os.listdir(out)) == [MARKER_NAME, JOB_NAME, "part-unlabelled-000000.parquet",
                                       "part-unlabelled-000001.parquet"]


def test_interrupted_part_write_leaves_nothing_visible(tmp_path, monkeypatch):
    out = str(tmp_path / "table")
    shards = _shards(str(tmp_path), 2)
    keys = {shards[0]: ["a"], shards[1]: ["b"]}
    w, _ = _writer(out, shards, keys)
    real = os.replace

    def die(src, dst):  # the process dies between writing the temporary file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        w.add(_rows(shards[0], ["a"]))
    monkeypatch.setattr(os, "replace", real)
    assert not any(f.endswith(".parquet") for f in os.listdir(w.staging))  # the temp file was removed
    open(os.path.join(w.staging, ".part-unlabelled-000000.parquet.tmp-x"), "wb").write(b"half")  # SIGKILL leftover
    w, remaining = _writer(out, shards, keys)
    assert remaining == shards and sorted(os.listdir(w.staging)) == [JOB_NAME]


def test_part_names_and_expected_keys_from_manifest(tmp_path):
    names = part_names(["/a/x/s-000000.tar", "/b/x/s-000000.tar", "/a/x/t.tar"])
    assert names[os.path.abspath("/a/x/t.tar")] == "part-t.parquet"
    assert len({n for n in names.values()}) == 3 and all(n.startswith("part-s-000000-") for n in list(names.values())[:2])
    src = make_synthetic_dataset(tmp_path / "data", n_images=5, size=32, seed=0)
    manifest = ingest(src, tmp_path / "shards", counts={"labelled": 1}, shard_size=3)
    paths = shard_paths(tmp_path / "shards", "unlabelled")
    got = expected_keys(paths)
    assert list(got.values()) == [frozenset(s["keys"]) for s in manifest["splits"]["unlabelled"]["shards"]]
    os.unlink(tmp_path / "shards" / "manifest.json")
    assert expected_keys(paths) == got  # from the tars' member names


def test_samples_missing_from_a_shard_are_counted(tmp_path):
    out = str(tmp_path / "table")
    shards = _shards(str(tmp_path), 1)
    w, _ = _writer(out, shards, {shards[0]: ["a", "b", "c"]})
    w.add(_rows(shards[0], ["a", "c"]))  # the tar ended early: 'b' never comes
    assert not w.done
    assert w.finish({}) == {"rows": 3, "ok": 2, "empty": 0, "error": 1} and w.missing_samples == 1
    row = [r for r in read_pseudo_labels(out).to_pylist() if r["key"] == "b"][0]
    assert (row["id"], row["status"], row["shard"]) == ("b", "error", shards[0])
    assert row["message"].startswith(f"{shards[0]}:b: listed in the manifest but not in the shard")


def test_data_lost_between_samples_is_charged_to_the_missing_ones(tmp_path):
    """A tar cut after whole samples: the reader's row naming the byte offset is replaced by one
    error row per sample the manifest lists and the tar lost, each carrying the offset."""
    out = str(tmp_path / "table")
    shards = _shards(str(tmp_path), 1)
    w, _ = _writer(out, shards, {shards[0]: ["a", "b", "c", "d"]})
    lost = _rows(shards[0], ["@1536"], status="error")
    lost = lost.set_column(lost.schema.get_field_index("message"), "message",
                           pa.array([f"{shards[0]}:@1536: tar truncated at byte 1536: cut"]))
    w.add(pa.concat_tables([_rows(shards[0], ["a", "b"]), lost]))
    assert w.finish({}) == {"rows": 4, "ok": 2, "empty": 0, "error": 2} and w.missing_samples == 2
    rows = {r["key"]: r for r in read_pseudo_labels(out).to_pylist()}
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert rows["d"]["message"] == (f"{shards[0]}:d: listed in the manifest but not in the shard (the tar changed "
                                    "or was cut after ingest): tar truncated at byte 1536: cut")
