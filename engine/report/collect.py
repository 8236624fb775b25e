"""A run directory read into plain dicts: the tables of the report (report.json), Ray-free.

    read_run    the run's files (results.json, config.yaml, environment.json, the manifest,
                gate_policy.json, the pseudo-label table) -> RunFiles; a folder without
                results.json is an InputError naming it; every other file may be missing
    collect     RunFiles -> the report's tables as one JSON-able dict (numbers as floats, Dice in
                0..1, NaN as None); what the run lacks is None and ``missing[section]`` says why
    score_values  per class and score column: the values (float64 (n,)) and the kept decision of
                each row (str (n,)), for the histograms

Nothing here reads images or models: plabel.report.build does, for the few images shown.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from plabel.data import storage
from plabel.errors import InputError

REPORT_FORMAT = "plabel-report"
REPORT_VERSION = 1
#: the pseudo-label table's per-class score columns shown as histograms (plabel.schemas.tables)
SCORE_FIELDS = ("sam_iou", "agreement_dice", "unet_prob")
KEPT = ("sam", "unet", "dropped", "empty")
NOT_IN_RUN = "not in this run"
#: `plabel run`'s stage order (plabel.jobs.stages.run_stages_for; results.json stores them sorted by name)
STAGE_ORDER = ("ingest", "teacher", "calibrate", "label", "student", "evaluate", "report")
ROUND_STAGES = ("calibrate", "label", "student")  # an earlier self-training round's run as <name>-<round>


def stage_sort_key(name: str) -> tuple:
    """Where a results.json stage goes in run order: an earlier round's calibrate-r / label-r / student-r
    before the last round's calibrate / label / student; unknown names last."""
    base, _, r = name.rpartition("-")
    if base in ROUND_STAGES and r.isdigit():
        return STAGE_ORDER.index("calibrate"), int(r), ROUND_STAGES.index(base), name
    if name in ROUND_STAGES:
        return STAGE_ORDER.index("calibrate"), float("inf"), ROUND_STAGES.index(name), name
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER)), 0, 0, name


@dataclass
class RunFiles:
    """What a run directory holds; None where the file is absent (``problems``: why a file that is
    there could not be read)."""

    path: str
    results: dict
    config: dict | None = None
    environment: dict | None = None
    manifest: dict | None = None
    shards_dir: str | None = None
    policy: dict | None = None
    table: object | None = None  # pyarrow.Table of the pseudo labels
    problems: dict | None = None

    @property
    def stages(self) -> dict:
        return self.results.get("stages") or {}

    @property
    def classes(self) -> list[str]:
        """The class order: the manifest's, else the table's, else the evaluate stage's."""
        if self.manifest and self.manifest.get("classes"):
            return list(self.manifest["classes"])
        if self.table is not None:
            from plabel.schemas.tables import table_classes

            return table_classes(self.table.schema)
        ev = self.stages.get("evaluate") or {}
        return list((ev.get("teacher") or {}).get("per_class") or [])

    def at(self, *parts: str) -> str:
        return storage.join(self.path, *parts)


def _json_file(location: str, problems: dict, what: str):
    if not storage.exists(location):
        return None
    try:
        return json.loads(storage.read_text(location))
    except (ValueError, OSError) as e:
        problems[what] = f"{storage.redact(location)}: {e}"
        return None


def read_run(run_dir) -> RunFiles:
    """Read a run directory of `plabel run` (a local path). Raises InputError naming it when it is
    not one (no results.json) or is in object storage."""
    run = str(run_dir)
    if storage.is_remote(run):
        raise InputError(f"{storage.redact(run)}: the report reads a local run directory; copy the run "
                         "here first (e.g. with `aws s3 sync` / `gsutil rsync`)")
    run = storage.local_path(run)
    if not Path(run).is_dir():
        raise InputError(f"{run}: no such run directory")
    if not Path(run, "results.json").is_file():
        raise InputError(f"{run}: not a plabel run directory (no results.json; `plabel run` writes it)")
    problems: dict = {}
    results = _json_file(str(Path(run, "results.json")), problems, "results")
    if not isinstance(results, dict):
        raise InputError(f"{run}/results.json: not a results file of `plabel run` "
                         f"({problems.get('results', 'not a JSON object')})")
    files = RunFiles(path=run, results=results, problems=problems)
    if Path(run, "config.yaml").is_file():
        try:
            files.config = yaml.safe_load(Path(run, "config.yaml").read_text())
        except yaml.YAMLError as e:
            problems["config"] = f"{run}/config.yaml: {e}"
    files.environment = _json_file(files.at("environment.json"), problems, "environment")
    files.policy = _json_file(files.at("gate_policy.json"), problems, "gate")
    _read_manifest(files, problems)
    table_dir = files.at("pseudo_labels")
    if storage.exists(table_dir):
        from plabel.data.table_commit import read_pseudo_labels

        try:
            files.table = read_pseudo_labels(table_dir)
        except (ValueError, OSError) as e:  # IncompleteTableError is an InputError (a ValueError)
            problems["table"] = str(e)
    return files


def _read_manifest(files: RunFiles, problems: dict) -> None:
    """The run's shards: <run>/shards, else the config's data.shards (a run on ingested data)."""
    from plabel.data.ingest import load_manifest

    candidates = [files.at("shards")]
    shards = ((files.config or {}).get("data") or {}).get("shards")
    if shards:
        candidates.append(str(shards))
    for where in candidates:
        try:
            if storage.exists(storage.join(where, "manifest.json")):
                files.manifest, files.shards_dir = load_manifest(where), where
                return
        except (ValueError, OSError) as e:
            problems["manifest"] = str(e)


# --------------------------------------------------------------------------------------- helpers


def _num(v):
    """A float for JSON: None for None / NaN / inf."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _mean_std(values) -> dict:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return {"mean": _num(a.mean()) if a.size else None, "std": _num(a.std()) if a.size else None, "n": int(a.size)}


# ------------------------------------------------------------------------------------------ the run


def run_section(files: RunFiles) -> dict:
    """Config, versions, stage wall times, image counts and the table's error rows."""
    names = sorted(files.stages, key=stage_sort_key)
    stages = [{"name": k, "wall_s": _num(files.stages[k].get("wall_s")), "done": bool(files.stages[k].get("done"))}
              for k in names]
    splits = {}
    if files.manifest:
        splits = {k: int(v.get("n_samples", 0)) for k, v in files.manifest.get("splits", {}).items()}
    elif (files.stages.get("ingest") or {}).get("counts"):
        splits = dict(files.stages["ingest"]["counts"])
    label = files.stages.get("label")
    counts = {k: label.get(k) for k in ("rows", "ok", "empty", "error")} if label else None
    errors = []
    if files.table is not None:
        t = files.table.select(["id", "shard", "key", "status", "message"]).to_pylist()
        errors = [{"id": r["id"], "shard": r["shard"], "key": r["key"], "message": r["message"]}
                  for r in t if r["status"] == "error"]
        if counts is None:
            status = [r["status"] for r in t]
            counts = {"rows": len(status), **{s: status.count(s) for s in ("ok", "empty", "error")}}
    env = files.environment or {}
    return {"run_dir": files.path, "name": (files.config or {}).get("name") or Path(files.path).name,
            "config": files.config, "environment": env or None, "stages": stages,
            "total_wall_s": _num(sum(s["wall_s"] or 0.0 for s in stages)),
            "splits": splits, "label": counts, "errors": errors}


# ---------------------------------------------------------------------------------------- the Dice


def dice_section(files: RunFiles, classes: list[str]) -> dict | None:
    """Teacher vs student Dice per class (mean ± std over the test images, 0..1) from results.json,
    the per-image matrices (N, C) as lists keyed by image, and HD95 where the evaluate stage kept it."""
    ev = files.stages.get("evaluate")
    if not ev or not all(isinstance(ev.get(m), dict) for m in ("teacher", "student")):
        return None
    models = {}
    for m in ("teacher", "student"):
        s = ev[m]
        per_image = s.get("per_image") or {}
        models[m] = {
            "mean": _num(s.get("mean_dice")), "std": _num(s.get("std_dice")), "n_images": s.get("n_images"),
            "per_class": {c: {"mean": _num((s.get("per_class") or {}).get(c)),
                              "std": _num((s.get("per_class_std") or {}).get(c))} for c in classes},
            "per_image": {k: [_num(v) for v in vals] for k, vals in per_image.items()},
        }
        if isinstance(s.get("hd95"), dict):  # the evaluate stage scores HD95 too (summarize_hd95, pixels)
            models[m]["hd95"] = {**s["hd95"], "per_image": {k: [_num(v) for v in vals] for k, vals in
                                                            (s.get("per_image_hd95") or {}).items()}}
    delta = {c: (None if None in (models["student"]["per_class"][c]["mean"], models["teacher"]["per_class"][c]["mean"])
                 else models["student"]["per_class"][c]["mean"] - models["teacher"]["per_class"][c]["mean"])
             for c in classes}
    mean_delta = None
    if models["student"]["mean"] is not None and models["teacher"]["mean"] is not None:
        mean_delta = models["student"]["mean"] - models["teacher"]["mean"]
    return {"split": "test", "models": models, "delta": delta, "mean_delta": mean_delta,
            "student_notes": student_notes(files.stages.get("student") or {})}


def student_notes(st: dict) -> list[str]:
    """Plain lines on what the student stage kept (guarded selection, soup guard)."""
    notes = []
    if st.get("guard"):
        notes.append("guarded selection kept the teacher's weights: every student epoch lost a class on the "
                     "validation images")
    members = st.get("soup") or []
    guarded = [m for m in members if m.get("guard")]
    if members and guarded:
        notes.append(f"{len(guarded)} of {len(members)} soup members kept the teacher's weights (guarded selection)")
    sg = st.get("soup_guard") or {}
    if sg.get("kept", "soup") != "soup":
        notes.append(f"the soup's average lost {', '.join(sg.get('lost_classes') or [])} on the validation images: "
                     f"student.pt is {sg['kept']}")
    return notes


def select_test_examples(dice: dict | None) -> list[dict]:
    """Best, median and worst test image by the mean Dice over classes of teacher and student
    (the average of the two models' per-image means); [] without per-image Dice."""
    if not dice:
        return []
    t, s = dice["models"]["teacher"]["per_image"], dice["models"]["student"]["per_image"]
    keys = sorted(set(t) & set(s))
    if not keys:
        return []

    def mean(v):
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else float("nan")

    scored = sorted(((0.5 * (mean(t[k]) + mean(s[k])), k) for k in keys), key=lambda x: (-x[0], x[1]))
    picks = [("best", 0), ("median", len(scored) // 2), ("worst", len(scored) - 1)]
    seen, out = set(), []
    for rank, i in picks:
        score, key = scored[i]
        if key in seen:
            continue
        seen.add(key)
        out.append({"rank": rank, "key": key, "score": _num(score), "teacher": [_num(v) for v in t[key]],
                    "student": [_num(v) for v in s[key]]})
    return out


# ---------------------------------------------------------------------------------------- the gate


def gate_section(files: RunFiles, classes: list[str]) -> dict | None:
    """Per class: the gate the label stage used (gate_policy.json's, else the config's), the
    calibration's own choice and evidence on the validation images, and the kept counts of the table."""
    kept = kept_counts(files.table, classes) if files.table is not None else None
    policy = files.policy
    if policy is not None:
        gate, calibrated = policy.get("gate") or {}, policy.get("calibrated") or {}
        report, overridden = policy.get("report") or {}, set(policy.get("overridden") or [])
        per_class = {}
        for c in classes:
            used = (gate.get("per_class") or {}).get(c) or gate.get("default") or {}
            r = report.get(c) or {}
            per_class[c] = {
                "gate": used, "calibrated_gate": (calibrated.get("per_class") or {}).get(c),
                "overridden": c in overridden, "calibrated": r.get("calibrated"), "reason": r.get("reason"),
                "evidence": {k: r.get(k) for k in ("n_images", "n_present", "dice_unet", "dice_sam", "dice_gated",
                                                   "drop_value", "objective", "objective_base", "kept",
                                                   "cross_validation")} if r else None,
                "kept": kept.get(c) if kept else None,
            }
        return {"source": "gate_policy.json", "validation": policy.get("validation") or {},
                "settings": policy.get("settings") or {}, "per_class": per_class}
    section = ((files.config or {}).get("label") or {}).get("gate")
    if section is None and kept is None:
        return None
    section = section or {}
    default = {k: section.get(k) for k in ("policy", "min_sam_iou", "min_agreement", "min_agreement_unet")}
    per_class = {c: {"gate": {**default, **((section.get("per_class") or {}).get(c) or {})},
                     "calibrated_gate": None, "overridden": c in (section.get("per_class") or {}),
                     "calibrated": False, "reason": "no calibration in this run: the configured gate",
                     "evidence": None, "kept": kept.get(c) if kept else None} for c in classes}
    return {"source": "config.yaml (label.gate)", "validation": {}, "settings": {}, "per_class": per_class}


def kept_counts(table, classes: list[str]) -> dict:
    """{class: {sam, unet, dropped, empty}} over the table's ok / empty rows (error rows keep nothing)."""
    status = table.column("status").to_pylist()
    out = {}
    for c in classes:
        kept = [k for k, s in zip(table.column(f"{c}.kept").to_pylist(), status) if s != "error"]
        out[c] = {k: kept.count(k) for k in KEPT}
    return out


def score_values(table, classes: list[str]) -> dict:
    """{class: {field: (values float64 (n,), kept str (n,))}} over the rows where the field is set."""
    out = {}
    for c in classes:
        kept = table.column(f"{c}.kept").to_pylist()
        out[c] = {}
        for f in SCORE_FIELDS:
            vals = table.column(f"{c}.{f}").to_pylist()
            pairs = [(float(v), k) for v, k in zip(vals, kept) if v is not None and math.isfinite(v)]
            out[c][f] = (np.array([p[0] for p in pairs], np.float64), np.array([p[1] for p in pairs], dtype=object))
    return out


def scores_section(table, classes: list[str]) -> dict:
    """Per class and score column: n, mean, quantiles (the numbers behind the histograms)."""
    out = {}
    for c, fields in score_values(table, classes).items():
        out[c] = {}
        for f, (v, _) in fields.items():
            q = np.quantile(v, [0.0, 0.1, 0.5, 0.9, 1.0]) if v.size else [None] * 5
            out[c][f] = {"n": int(v.size), "mean": _num(v.mean()) if v.size else None,
                         **{k: _num(x) for k, x in zip(("min", "p10", "median", "p90", "max"), q)}}
    return out


# ------------------------------------------------------------------------------------ review queue


def review_rows(table, classes: list[str], k: int, seed: int) -> dict:
    """The review queue: the ``k`` rows (ok / empty) whose kept pseudo labels agree least with SAM:
    ranked by the lowest agreement Dice over the classes the gate kept (sam / unet: what the
    student trains on), or over every class when the gate kept nothing in the whole table
    (``ranked_by`` says which); then ``k`` rows drawn with ``random.Random(seed)`` from the rest.
    Each entry: id, shard, key, status, min_agreement, min_class (its class), agreement {class:
    Dice}, kept {class: decision}."""
    cols = ["id", "shard", "key", "status"] + [f"{c}.{f}" for c in classes for f in ("agreement_dice", "kept")]
    rows = [r for r in table.select(cols).to_pylist() if r["status"] != "error"]
    rows.sort(key=lambda r: r["id"])  # the table's order is the commit's; the report's must not depend on it
    any_kept = any(r[f"{c}.kept"] in ("sam", "unet") for r in rows for c in classes)

    def entry(r) -> dict:
        agree = {c: r[f"{c}.agreement_dice"] for c in classes
                 if r[f"{c}.agreement_dice"] is not None and math.isfinite(r[f"{c}.agreement_dice"])}
        ranked = {c: v for c, v in agree.items() if r[f"{c}.kept"] in ("sam", "unet")} if any_kept else agree
        low = min(ranked, key=ranked.get) if ranked else None
        return {"id": r["id"], "shard": r["shard"], "key": r["key"], "status": r["status"],
                "min_agreement": _num(ranked[low]) if low else None, "min_class": low,
                "agreement": {c: _num(v) for c, v in agree.items()},
                "kept": {c: r[f"{c}.kept"] for c in classes}}

    entries = [entry(r) for r in rows]
    scored = sorted((e for e in entries if e["min_agreement"] is not None), key=lambda e: (e["min_agreement"], e["id"]))
    lowest = scored[:max(k, 0)]
    chosen = {e["id"] for e in lowest}
    rest = [e for e in entries if e["id"] not in chosen]
    sample = random.Random(seed).sample(rest, min(max(k, 0), len(rest)))
    return {"k": k, "seed": seed, "ranked_by": "kept classes" if any_kept else "all classes",
            "lowest_agreement": lowest, "random": sorted(sample, key=lambda e: e["id"])}


# ------------------------------------------------------------------------------------------- all


def collect(files: RunFiles, review: int = 8, seed: int = 0) -> dict:
    """The report's tables (report.json): see the module docstring. Sections the run lacks are None
    and named in ``missing`` with the reason."""
    classes = files.classes
    missing: dict[str, str] = {}
    dice = dice_section(files, classes)
    if dice is None:
        missing["dice"] = (f"{NOT_IN_RUN}: no evaluate stage in results.json (a run without a test split, or one "
                           "that stopped before it)")
    gate = gate_section(files, classes)
    if files.policy is None:
        missing["calibration"] = f"{NOT_IN_RUN}: no gate_policy.json (no calibrate stage: no validation split, " \
                                 "or label.gate.calibrate false)"
    if files.table is None:
        why = (files.problems or {}).get("table") or "no pseudo_labels/ table"
        missing["table"] = f"{NOT_IN_RUN}: {why}"
    out = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "classes": classes,
        "run": run_section(files),
        "dice": dice,
        "gate": gate,
        "scores": scores_section(files.table, classes) if files.table is not None else None,
        "review": review_rows(files.table, classes, review, seed) if files.table is not None else None,
        "test_examples": select_test_examples(dice),
        "missing": missing,
        "problems": files.problems or {},
    }
    if dice is None:
        out["test_examples"] = None
    return out


def dumps(report: dict) -> str:
    """report.json's text (NaN written as null)."""
    return json.dumps(_clean(report), indent=2, sort_keys=False)


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj
