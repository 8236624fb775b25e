"""`import plabel`: the public API, the one import namespace, and a light import."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import plabel
from plabel.method.cleaning import CleaningConfig
from plabel.method.gate import GateConfig
from plabel.method.labelling import ImageMeta, clean_and_prompt, pseudo_label_rows
from plabel.method.unet import load_checkpoint
from plabel.schemas.tables import decode_class_masks, pseudo_label_schema


def _python(code: str, cwd) -> str:
    """Run ``code`` in a fresh interpreter outside the repository (so the source folders are not on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_import_plabel_is_light_and_the_only_top_level_name(tmp_path):
    out = json.loads(_python(
        "import importlib.util, json, sys\n"
        "import plabel, plabel.cli.main, plabel.schemas.config\n"
        "print(json.dumps({'heavy': sorted(m for m in ('torch', 'ray') if m in sys.modules),\n"
        "  'top': {n: importlib.util.find_spec(n) is not None for n in ('engine', 'cli', 'schemas')},\n"
        "  'file': plabel.__file__}))", tmp_path))
    assert out["heavy"] == []  # `plabel --help` and `import plabel` pull in neither torch nor Ray
    assert out["top"] == {"engine": False, "cli": False, "schemas": False}
    assert out["file"].endswith("engine/__init__.py")


def test_every_public_name_resolves():
    for name in plabel.__all__:
        assert getattr(plabel, name) is not None, name

    assert plabel.load_checkpoint is load_checkpoint and plabel.pseudo_label_masks is decode_class_masks


def test_read_a_table_through_the_public_api(tmp_path):
    """A table of two hand-made images (no SAM: the gate keeps the cleaned U-Net masks) read back
    through plabel.read_pseudo_labels / table_classes / pseudo_label_masks."""
    classes = ["square", "bar"]
    probs = np.zeros((2, 2, 8, 10), np.float32)
    probs[0, 0, 2:5, 3:7] = 0.9  # image 0: a 3 x 4 square, no bar
    probs[1, 1, :, 4] = 0.8  # image 1: a one-pixel-wide bar, no square
    prepared = [clean_and_prompt(p, CleaningConfig()) for p in probs]
    metas = [ImageMeta(f"img{i}", "s.tar", f"k{i}", 8, 10) for i in range(2)]
    rows = pseudo_label_rows(None, [np.zeros((8, 10), np.uint8)] * 2, [p[0] for p in prepared],
                             [p[1] for p in prepared], [p[2] for p in prepared], metas, classes, GateConfig(), {})
    (tmp_path / "table").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=pseudo_label_schema(classes)), tmp_path / "table" / "part.parquet")

    table = plabel.read_pseudo_labels(str(tmp_path / "table"))
    assert plabel.table_classes(table) == classes and plabel.table_classes(table.schema) == classes
    got = {r["id"]: plabel.pseudo_label_masks(r, classes) for r in table.to_pylist()}
    masks0, weight0 = got["img0"]
    assert masks0.dtype == bool and masks0.shape == (2, 8, 10) and weight0.tolist() == [1.0, 1.0]
    assert masks0[0].sum() == 12 and masks0[0, 2:5, 3:7].all() and not masks0[1].any()
    masks1, _ = got["img1"]
    assert masks1[1].sum() == 8 and masks1[1, :, 4].all() and not masks1[0].any()
