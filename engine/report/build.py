"""`plabel report`: a run directory -> report.html (self-contained) and report.json beside it.

    build_report   read the run (collect), draw the plots (figures), load the few images shown
                   from the run's shards and draw them (overlays), render (html), write both files

The images need the models for a handful of images only, in-process on CPU (no Ray): the review
queue's teacher masks are recomputed with teacher.pt exactly as the label job made them
(plabel.method.labelling.teacher_probs + clean_and_prompt with the run's label.cleaning), and the
test examples are predicted by teacher.pt and student.pt as `plabel evaluate` scores them
(probabilities > 0.5). HD95 comes from results.json when the evaluate stage kept it, else it is
computed here over the test split when plabel.method.metrics has hd95_per_class.
"""
from __future__ import annotations

import base64
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from plabel.data import storage
from plabel.report import collect as C
from plabel.report import figures, html, overlays

#: long side of an image panel in pixels (small images are enlarged to MIN, large ones shrunk to MAX)
PANEL_MIN, PANEL_MAX = 192, 256


def panel_side(shape: Sequence[int]) -> int:
    return int(min(max(max(shape[:2]), PANEL_MIN), PANEL_MAX))


# ------------------------------------------------------------------------------------------ shards


def _shard_location(files: C.RunFiles, shard: str | None, split: str) -> str | None:
    """Where a table row's shard is now: its recorded path, else the file of that name in the run's
    shards (a run directory that was moved)."""
    if shard and storage.exists(shard):
        return shard
    if shard and files.shards_dir:
        moved = storage.join(files.shards_dir, split, os.path.basename(storage.redact(shard)))
        if storage.exists(moved):
            return moved
    return None


def read_samples(wanted: dict) -> dict[tuple[str, str], dict]:
    """{shard location: keys (anything with ``in``)} -> {(location, key): sample dict}, each shard read
    once (streamed); samples the reader marked unusable are left out."""
    from plabel.data.shard_reader import read_shard_file

    out = {}
    for location, keys in wanted.items():
        if storage.is_remote(location):
            fs, path = storage.resolve(location)
            samples = read_shard_file(path, storage.redact(location), filesystem=fs)
        else:
            samples = read_shard_file(storage.local_path(location))
        for s in samples:
            if s["__key__"] in keys and "__error__" not in s:
                out[(location, s["__key__"])] = s
    return out


def _test_shards(files: C.RunFiles) -> list[str]:
    from plabel.data.ingest import shard_paths

    if not files.manifest or int((files.manifest["splits"].get("test") or {}).get("n_samples", 0)) == 0:
        return []
    return shard_paths(files.shards_dir, "test")


# ---------------------------------------------------------------------------------------- models


def _load(files: C.RunFiles, name: str, problems: dict):
    from plabel.method.unet import load_checkpoint

    path = files.at(name)
    if not storage.exists(path):
        problems[name] = f"{name} not in this run"
        return None
    try:
        model, _, extra = load_checkpoint(path)
    except (ValueError, OSError) as e:
        problems[name] = str(e)
        return None
    return model, int(extra.get("image_size", 256))


def _probs(net, grays: list, batch: int = 8) -> list:
    """teacher_probs of ``net`` = (model, image size) over gray uint8 (H, W) images, ``batch`` at a
    time: float32 (C, H, W) per image."""
    from plabel.method.labelling import teacher_probs

    out = []
    for i in range(0, len(grays), batch):
        out += teacher_probs(net[0], grays[i:i + batch], net[1])
    return out


def _cleaning(files: C.RunFiles):
    from plabel.method.cleaning import CleaningConfig

    section = ((files.config or {}).get("label") or {}).get("cleaning") or {}
    return CleaningConfig(**section)


# ------------------------------------------------------------------------------------ review queue


def review_images(files: C.RunFiles, report: dict, teacher, problems: dict) -> dict[str, bytes]:
    """{table id: PNG} of the review queue: image | teacher's cleaned masks with SAM's prompts (box,
    points) | the kept pseudo label (dropped classes left out)."""
    from plabel.data.samples import decode_gray
    from plabel.method.labelling import clean_and_prompt
    from plabel.schemas.tables import decode_class_masks

    review = report.get("review") or {}
    entries = {e["id"]: e for part in ("lowest_agreement", "random") for e in review.get(part) or []}
    if not entries:
        return {}
    classes = report["classes"]
    rows = {r["id"]: r for r in files.table.filter(_id_in(files.table, list(entries))).to_pylist()}
    where, wanted = {}, defaultdict(set)
    for rid, row in rows.items():
        loc = _shard_location(files, row["shard"], "unlabelled")
        if loc is None:
            problems[f"review {rid}"] = f"shard {row['shard']} not found"
            continue
        where[rid] = (loc, row["key"])
        wanted[loc].add(row["key"])
    samples = read_samples(wanted)
    colours = overlays.class_colours(len(classes))
    cleaning = _cleaning(files)
    ids, grays = [], []
    for rid in sorted(where):
        sample = samples.get(where[rid])
        if sample is None:
            problems[f"review {rid}"] = f"sample {where[rid][1]} not found in {where[rid][0]}"
            continue
        ids.append(rid)
        grays.append(decode_gray(sample))
    probs = _probs(teacher, grays) if teacher is not None else [None] * len(grays)
    out = {}
    for rid, gray, prob in zip(ids, grays, probs):
        row = rows[rid]
        kept, _ = decode_class_masks(row, classes)
        if kept.shape[1:] != gray.shape:
            problems[f"review {rid}"] = f"table mask {kept.shape[1:]} vs image {gray.shape}"
            continue
        side = panel_side(gray.shape)
        g, k, f = overlays.scale_to(gray, kept, side)
        plain = np.repeat(g[..., None], 3, axis=2)
        teach = plain
        if prob is not None:
            cleaned = clean_and_prompt(prob, cleaning)[0]
            teach = overlays.overlay(g, overlays.scale_to(gray, cleaned, side)[1], colours, alpha=0.25)
        teach = overlays.draw_prompts(teach, [row[f"{c}.box"] for c in classes], [row[f"{c}.points"] for c in classes],
                                      [row[f"{c}.point_labels"] for c in classes], colours, f)
        out[rid] = overlays.png(overlays.strip([plain, teach, overlays.overlay(g, k, colours, alpha=0.4)]))
    return out


def _id_in(table, ids: list[str]):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(table.column("id"), value_set=pa.array(ids, pa.string()))


# ------------------------------------------------------------------------------------- test split


def test_images(files: C.RunFiles, report: dict, teacher, student, problems: dict,
                all_images: bool) -> tuple[dict[str, bytes], dict | None]:
    """({key: PNG} of the test examples: image | ground truth | teacher | student, and HD95 per
    image {model: {key: [per class]}} over the whole test split when ``all_images`` (else None)."""
    from plabel.data.samples import decode_gray, sample_masks

    examples = report.get("test_examples") or []
    if not examples or teacher is None or student is None:
        return {}, None
    shards = _test_shards(files)
    if not shards:
        problems["test examples"] = "the run's shards have no test split"
        return {}, None
    classes = report["classes"]
    keys = {e["key"] for e in examples}
    samples = read_samples({s: _AllKeys() if all_images else keys for s in shards})
    by_key = {k: s for (_, k), s in samples.items()}
    colours = overlays.class_colours(len(classes))
    out, hd = {}, None
    metrics = _hd95_metric() if all_images else None
    if metrics is not None:
        hd = {"teacher": {}, "student": {}}
    todo = sorted(k for k in by_key if k in keys or metrics is not None)
    grays = [decode_gray(by_key[k]) for k in todo]
    truths = [sample_masks(by_key[k], g.shape, len(classes)) for k, g in zip(todo, grays)]
    preds = {m: [p > 0.5 for p in _probs(net, grays)] for m, net in (("teacher", teacher), ("student", student))}
    for i, key in enumerate(todo):
        gray, truth = grays[i], truths[i]
        if metrics is not None:
            for m in preds:
                hd[m][key] = [float(v) for v in metrics(preds[m][i], truth)]
        if key in keys:
            side = panel_side(gray.shape)
            g, t, _ = overlays.scale_to(gray, truth, side)
            panels = [np.repeat(g[..., None], 3, axis=2), overlays.overlay(g, t, colours, alpha=0.4)]
            panels += [overlays.overlay(g, overlays.scale_to(gray, preds[m][i], side)[1], colours, alpha=0.4)
                       for m in ("teacher", "student")]
            out[key] = overlays.png(overlays.strip(panels))
    for k in keys - set(out):
        problems[f"test example {k}"] = "not found in the test shards"
    return out, hd


class _AllKeys:
    """A key set that holds every key."""

    def __contains__(self, key) -> bool:
        return True


def _hd95_metric():
    """plabel.method.metrics.hd95_per_class when it exists (bool (C, H, W) x2 -> float (C,)), else None."""
    from plabel.method import metrics

    return getattr(metrics, "hd95_per_class", None)


def _nan_matrix(per_image: dict, keys: list) -> np.ndarray:
    """{key: [value or None]} -> float64 (len(keys), C), None as NaN."""
    return np.array([[np.nan if v is None else v for v in per_image[k]] for k in keys], np.float64)


def hd95_summary(report: dict, hd: dict | None) -> dict | None:
    """The report's HD95 table: the evaluate stage's (results.json) when it has one, else the one
    computed here; {"source", "models": {model: {mean, std, per_class {c: {mean, std, n_nan}}}},
    "per_image": {model: {key: [..]}}} or None."""
    classes, dice = report["classes"], report.get("dice") or {}
    models = dice.get("models") or {}
    if all(isinstance(models.get(m, {}).get("hd95"), dict) for m in ("teacher", "student")) and models:
        src = {m: models[m]["hd95"] for m in ("teacher", "student")}
        return {"source": "results.json (evaluate stage)", "unit": "px",
                "models": {m: _hd_model(s, classes) for m, s in src.items()},
                "per_image": {m: s.get("per_image") or {} for m, s in src.items()}}  # collect.dice_section
    if not hd:
        return None
    from plabel.method.metrics import summarize_hd95

    out = {"source": "computed by the report on the test split (teacher.pt, student.pt, probabilities > 0.5)",
           "unit": "px", "models": {}, "per_image": hd}
    for m, per_image in hd.items():
        keys = sorted(per_image)
        s = summarize_hd95(np.array([per_image[k] for k in keys], np.float64).reshape(len(keys), len(classes)),
                           classes)
        out["models"][m] = _hd_model(s, classes)
    return out


def _hd_model(s: dict, classes) -> dict:
    return {"mean": C._num(s.get("mean_hd95")), "std": C._num(s.get("std_hd95")), "n_images": s.get("n_images"),
            "per_class": {c: {"mean": C._num((s.get("per_class") or {}).get(c)),
                              "std": C._num((s.get("per_class_std") or {}).get(c)),
                              "n_nan": (s.get("n_nan") or {}).get(c)} for c in classes}}


# ------------------------------------------------------------------------------------------- build


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def build_report(run_dir, out=None, review: int = 8, seed: int = 0) -> dict:
    """Write ``out`` (default <run_dir>/report.html) and report.json beside it (same name, .json).

    run_dir: a local run directory of `plabel run` (InputError naming it otherwise).
    review: pseudo labels per review queue (lowest agreement, random); seed: the random sample's.
    Returns {"html": path, "json": path, "bytes": size of the HTML, "images": <img> count, "seconds"}.
    """
    t0 = time.time()
    files = C.read_run(run_dir)
    report = C.collect(files, review=review, seed=seed)
    problems = report["problems"]
    classes = report["classes"]
    images: dict[str, str] = {}

    dice = report.get("dice")
    if dice:
        keys = sorted(set(dice["models"]["teacher"]["per_image"]) & set(dice["models"]["student"]["per_image"]))
        if keys:
            t = np.array([dice["models"]["teacher"]["per_image"][k] for k in keys], dtype=np.float64)
            s = np.array([dice["models"]["student"]["per_image"][k] for k in keys], dtype=np.float64)
            images["dice_plot"] = data_uri(figures.dice_boxplot(classes, t, s))
    if files.table is not None and len(classes):
        gates = {c: v["gate"] for c, v in ((report.get("gate") or {}).get("per_class") or {}).items()}
        images["histograms"] = data_uri(figures.score_histograms(
            classes, C.score_values(files.table, classes), gates))

    teacher = _load(files, "teacher.pt", problems) if (report.get("review") or dice) else None
    if report.get("review"):
        try:
            for rid, png in review_images(files, report, teacher, problems).items():
                images[f"review:{rid}"] = data_uri(png)
        except (ValueError, OSError, KeyError) as e:  # unreadable shards or images: the rest of the report stands
            problems["review queue"] = f"images not drawn: {type(e).__name__}: {e}"
    hd, student = None, None
    if dice:
        student = _load(files, "student.pt", problems)
        has_hd = all(isinstance(dice["models"][m].get("hd95"), dict) for m in ("teacher", "student"))
        try:
            pngs, hd = test_images(files, report, teacher, student, problems, all_images=not has_hd)
        except (ValueError, OSError, KeyError) as e:
            pngs, problems["test examples"] = {}, f"images not drawn: {type(e).__name__}: {e}"
        for key, png in pngs.items():
            images[f"test:{key}"] = data_uri(png)
    report["hd95"] = hd95_summary(report, hd)
    if report["hd95"] and report["hd95"]["per_image"]:
        hd_pi = report["hd95"]["per_image"]
        keys = sorted(set(hd_pi.get("teacher", {})) & set(hd_pi.get("student", {})))
        if keys:
            images["hd95_plot"] = data_uri(figures.hd95_boxplot(classes, _nan_matrix(hd_pi["teacher"], keys),
                                                                _nan_matrix(hd_pi["student"], keys)))
    elif dice:
        why = ("plabel.method.metrics has no hd95_per_class" if _hd95_metric() is None
               else "teacher.pt and student.pt are needed to compute it" if teacher is None or student is None
               else "the test images could not be read")
        report["missing"]["hd95"] = f"{C.NOT_IN_RUN}: results.json has no HD95 and {why}"

    out = Path(out) if out is not None else Path(files.path) / "report.html"
    json_path = out.with_suffix(".json")
    report["build"] = {"seconds": None, "images": len(images)}
    text = html.render(report, images, colours=[overlays.hex_colour(c) for c in overlays.class_colours(len(classes))])
    out.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(str(out), text)
    report["build"]["seconds"] = round(time.time() - t0, 2)
    report["build"]["html"] = out.name
    report["build"]["bytes"] = len(text.encode("utf-8"))
    storage.write_text(str(json_path), C.dumps(report))
    return {"html": str(out), "json": str(json_path), "bytes": report["build"]["bytes"], "images": len(images),
            "seconds": round(time.time() - t0, 2)}
