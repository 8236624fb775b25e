"""Tables (markdown), timings and matplotlib figures of benchmarks/quality.py's results."""
from __future__ import annotations

import os
import platform
import sys
import warnings
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from plabel.method.unet import load_checkpoint

from .grid import (
    BACKEND_FREE,
    BACKENDS,
    DEFAULT_NS,
    GATED,
    INIT_TEXT,
    ISSUE_GRID,
    KIND_LABEL,
    KINDS,
    SMOKE,
    parse_student_key,
    run_config,
    student_key,
)

ORDER = {"teacher": 0, **{k: i + 1 for i, k in enumerate(KINDS)}, "full": 99}


def nanmean(a, axis=None):
    with warnings.catch_warnings():  # a class the gate dropped everywhere: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def summarise(bench, results: dict) -> dict:
    """Numbers of the tables: pseudo-label Dice, test Dice, gates."""
    classes, C = bench.classes, len(bench.classes)
    out = {"pseudo": [], "test": [], "gates": []}
    for cfg in results["configs"]:
        n, seed = cfg["n"], cfg["seed"]
        models = [("teacher", None, "scratch", cfg.get("teacher")), ("full", None, "scratch", results["full"].get(seed))]
        rows = models + [(*parse_student_key(k), m) for k, m in cfg["students"].items()]
        for model, backend, init, meta in rows:
            if meta is not None:
                d = np.asarray(meta["test_dice"], dtype=np.float64).reshape(-1, C)
                out["test"].append({"n": n, "seed": seed, "model": model, "backend": backend, "init": init,
                                    "per_class": d.mean(axis=0).tolist(), "mean": float(d.mean()),
                                    "std_images": float(d.mean(axis=1).std()), "n_test": len(d),
                                    "best_epoch": meta["best_epoch"], "wall_s": meta["wall_s"]})
        if cfg.get("unet_path") is None:
            continue

        def scored(kind, b):
            ids, rows, decisions = bench.pseudo(kind, cfg["unet_path"], b and b["sam_path"], b and b["policy"],
                                                b["variant"] if b else "sam")
            return (ids, decisions, *bench.pseudo_dice(ids, rows))

        for backend, b in [(None, None), *cfg["backends"].items()]:
            for kind in KINDS:
                if kind in ("none", "gated_distill", "mean_teacher") or (kind in BACKEND_FREE) != (backend is None) or (
                        b and (b["sam_path"] is None or (kind in GATED and b["policy"] is None)
                               or (kind == "pipeline" and "pipeline" not in b["variants"]))):
                    continue  # no pseudo labels / the masks of 'gated' / not computed
                ids, decisions, d, weight = scored(kind, b)
                compare = None
                if kind in GATED:  # the masks it keeps (images without the class left out)
                    kept = np.isin(decisions, ["sam", "unet"])
                    d = np.where(kept, d, np.nan)
                    others = {k: scored(k, b)[2] for k in ("cleaned", "sam", b["variant"])}
                    compare = {c: {"kept": int(kept[:, ci].sum()), "gated": float(nanmean(d[kept[:, ci], ci])),
                                   **{k: float(nanmean(v[kept[:, ci], ci])) for k, v in others.items()}}
                               for ci, c in enumerate(classes)}
                per_class = nanmean(d, axis=0)
                row = {"n": n, "seed": seed, "kind": kind, "backend": backend, "per_class": per_class.tolist(),
                       "mean": float(nanmean(per_class)) if np.isfinite(per_class).any() else float("nan"),
                       "kept_fraction": float((weight > 0).mean()), "n_images": len(ids), "compare": compare}
                if kind == "gated":
                    row["decisions"] = {c: {k: int((decisions[:, ci] == k).sum())
                                            for k in ("sam", "unet", "dropped", "empty")} for ci, c in enumerate(classes)}
                    out["gates"].append({"n": n, "seed": seed, "backend": backend, "variant": b["variant"],
                                         "gate": b["policy"]["gate"], "decisions": row["decisions"],
                                         "per_class": row["per_class"],
                                         "report": {c: {k: b["policy"]["report"][c][k] for k in
                                                        ("dice_unet", "dice_sam", "dice_gated", "kept")} for c in classes}})
                out["pseudo"].append(row)
    return out


def group(rows, keys):
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def f100(v, digits=2):
    return "-" if v is None or not np.isfinite(v) else f"{100 * v:.{digits}f}"


def model_label(model, backend, init="scratch"):
    if model in ("teacher", "full"):
        return {"teacher": "teacher (n labelled)", "full": "full supervision (150 labelled)"}[model]
    init, _, rnd = init.partition("#r")
    start = {"teacher": " from teacher", "guarded": " from teacher (guarded selection)"}.get(init, "")
    if model == "mean_teacher":
        return f"mean teacher{start} (EMA teacher, consistency on the unlabelled images)"
    return (f"student{start}: {KIND_LABEL[model]}" + (f" [{backend}]" if backend else "")
            + (f", self-training round {rnd} (its teacher: round {int(rnd) - 1}'s student)" if rnd else ""))


def gate_text(g: dict) -> str:
    if g["policy"] in ("unet", "drop"):
        return g["policy"]
    s = f"{g['policy']} iou>={g['min_sam_iou']:g} agr>={g['min_agreement']:g}"
    return s + (f" unet>={g['min_agreement_unet']:g}" if g["policy"] == "auto" else "")


def agg(rows):
    pc = np.array([r["per_class"] for r in rows], dtype=np.float64)
    means = np.array([r["mean"] for r in rows])
    return pc.mean(axis=0), means.mean(), (means.std() if len(rows) > 1 else None)


def markdown(bench, summary: dict, args, timing: dict) -> str:
    classes, data = bench.classes, run_config().data
    soup = "" if args.student_soup == 1 else (
        f"; each warm-started student is the average of the weights of {args.student_soup} students (training seed "
        f"offsets {args.student_seed_offset} .. {args.student_seed_offset + args.student_soup - 1}, plabel's "
        "student.soup)" + (" or, for guarded students whose average lost a class on the validation images, the member "
                           "with the best validation Dice (plabel's soup guard)" if "guarded" in args.student_init else ""))
    if args.student_seed_offset and args.student_soup == 1:
        soup = f"; training seed = split seed + {args.student_seed_offset}"
    lines = ["# Pseudo-label quality benchmark (JSRT)\n",
             f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine()}; torch threads {args.threads}.  ",
             f"Data: {bench.data.folder} (fingerprint {bench.data.fingerprint}); split per seed (plabel.data.ingest."
             f"make_splits): {data.test} test, {data.val} validation, n labelled, the rest of the pool unlabelled"
             + (" (SMOKE: 4 test, 4 val, 6 unlabelled images)" if args.smoke else "") + ".  ",
             f"U-Nets at {bench.S} px; epochs teacher {args.teacher_epochs}, students {args.student_epochs}, "
             f"full {args.full_epochs}; batch {args.batch_size}, lr {args.lr}; students start from "
             f"{' and from '.join(INIT_TEXT[i] for i in args.student_init)}{soup}. Gate: calibrated on the validation "
             f"images over the '{args.gate_stages}' stages. Dice x100.\n"]
    head = "| n | seeds | {} | " + " | ".join(classes) + " | mean |"
    rule = "|---|---|---|" + "---|" * (len(classes) + 1)
    lines += ["## Pseudo labels of the unlabelled images against their truth\n",
              "Mean Dice per class over the unlabelled images (both empty = 1); gated: over the masks it keeps "
              "(SAM's or the cleaned U-Net's; '-' = the class is dropped on every image), 'kept' = fraction of "
              "(image, class) pairs trained on (background where the teacher found nothing included). "
              "Several seeds: mean of seeds.\n", head.format("pseudo labels") + " kept |", rule + "---|"]
    for (n, kind, backend), rows in sorted(group(summary["pseudo"], ("n", "kind", "backend")).items(),
                                           key=lambda t: (t[0][0], str(t[0][2]), KINDS.index(t[0][1]))):
        pc, mean, _ = agg(rows)
        lines.append(f"| {n} | {len(rows)} | {KIND_LABEL[kind]}{f' [{backend}]' if backend else ''} | "
                     + " | ".join(f100(v) for v in pc)
                     + f" | {f100(mean)} | {100 * np.mean([r['kept_fraction'] for r in rows]):.0f}% |")
    lines += ["\n### Gated masks against the other kinds on the same (image, class) pairs\n",
              "For every gated row: per class, the number of (image, class) pairs the gate keeps a mask for "
              "(SAM's or the cleaned U-Net's) and the mean Dice on exactly those pairs of the gated mask, the "
              "cleaned U-Net mask, the paper's SAM stages and the backend's plabel stages.\n",
              "| n | seed | kind [backend] | class | kept pairs | gated | cleaned U-Net | SAM paper | SAM plabel stages |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['seed']} | {KIND_LABEL[r['kind']]} [{r['backend']}] | {c} | {v['kept']} | "
              f"{f100(v['gated'])} | {f100(v['cleaned'])} | {f100(v['sam'])} | {f100(v.get('pipeline', v['sam']))} |"
              for r in summary["pseudo"] if r.get("compare") for c, v in r["compare"].items() if v["kept"]]
    lines += ["\n## Test Dice\n",
              f"Mean Dice per class over the {SMOKE['test'] if args.smoke else data.test} test images; mean ± std: "
              "std over images (one seed) or over seeds' means (several). gap closed = (student - teacher) / "
              "(full - teacher), per seed, then averaged; worst class vs teacher: the lowest per-class difference "
              "student - teacher (Dice x100) over the classes and seeds, and with several seeds (after ' / ') the "
              "lowest over the classes of the difference averaged over the seeds.\n",
              head.format("model").replace("mean |", "mean ± std | gap closed | worst class vs teacher |"),
              rule + "---|---|"]
    test = summary["test"]
    by_seed = {(r["n"], r["seed"], r["model"], r["backend"]): r for r in test}
    for (n, init, model, backend), rows in sorted(group(test, ("n", "init", "model", "backend")).items(), key=lambda t: (
            t[0][0], ORDER[t[0][2]], t[0][1] != "scratch", str(t[0][3]))):
        pc, mean, std = agg(rows)
        gaps, diffs = [], []
        for r in rows if model not in ("teacher", "full") else []:
            t = by_seed.get((n, r["seed"], "teacher", None))
            fl = next((x for x in test if x["model"] == "full" and x["seed"] == r["seed"]), None)
            if t is not None:  # per class, against its own seed's teacher
                diffs.append(np.subtract(r["per_class"], t["per_class"]))
                if fl is not None and abs(fl["mean"] - t["mean"]) > 1e-9:
                    gaps.append((r["mean"] - t["mean"]) / (fl["mean"] - t["mean"]))
        low = (f"{100 * np.min(diffs):+.2f}" if diffs else "") + (
            f" / {100 * np.min(np.mean(diffs, axis=0)):+.2f}" if len(diffs) > 1 else "")
        lines.append(f"| {n} | {len(rows)} | {model_label(model, backend, init)} | " + " | ".join(f100(v) for v in pc)
                     + f" | {f100(mean)} ± {f100(rows[0]['std_images'] if std is None else std)} | "
                     + (f"{np.mean(gaps):+.2f}" if gaps else "") + f" | {low} |")
    lines += ["\n## Calibrated gates (validation images only) and their decisions on the unlabelled images\n",
              "| n | seed | backend (stages) | class | gate | val Dice unet / sam / gated | unlabelled: "
              "sam / unet / dropped / empty | Dice of kept |", "|---|---|---|---|---|---|---|---|"]
    for g in summary["gates"]:
        for ci, c in enumerate(classes):
            r, k = g["report"][c], g["decisions"][c]
            val = " / ".join("-" if r[x] is None else f"{r[x]:.3f}" for x in ("dice_unet", "dice_sam", "dice_gated"))
            lines.append(f"| {g['n']} | {g['seed']} | {g['backend']} ({g['variant']}) | {c} | "
                         f"{gate_text(g['gate']['per_class'].get(c, g['gate']['default']))} | {val} | "
                         f"{k['sam']} / {k['unet']} / {k['dropped']} / {k['empty']} | {f100(g['per_class'][ci], 1)} |")
    lines += ["\n## Step timings (this machine) and the whole grid's estimated CPU time\n",
              "| step | runs | wall s (sum) | rate |", "|---|---|---|---|"]
    lines += [f"| {step} | {t['runs']} | {t['wall_s']:.0f} | {t['rate']} |" for step, t in timing["steps"].items()]
    if timing.get("estimate"):
        lines.append("\nEstimate of the issue's full grid (6 configurations, default kinds and epochs) from these "
                     "rates (U-Net training: one rate per image-epoch over every U-Net above, so small --smoke "
                     "trainings overstate it):\n")
        lines += [f"- {k}: {v / 3600:.2f} h ({v / 60:.0f} min)" for k, v in timing["estimate"].items()]
    return "\n".join(lines) + "\n"


def progress_table(results: dict) -> str:
    """Which steps of the grid are done (y) or missing (-)."""
    def yes(x):
        return "y" if x is not None else "-"

    lines = ["\n## Progress of the grid\n", "| n | seed | teacher | unet | SAM / gate per backend | students done | full |",
             "|---|---|---|---|---|---|---|"]
    for c in results["configs"]:
        sam = ", ".join(f"{b}: {yes(v['sam_path'])} / {yes(v['policy'])}" for b, v in c["backends"].items())
        missing = [k for k, v in c["students"].items() if v is None]
        lines.append(f"| {c['n']} | {c['seed']} | {yes(c['teacher'])} | {yes(c['unet_path'])} | {sam} | "
                     f"{len(c['students']) - len(missing)}/{len(c['students'])}"
                     + (f" (missing {', '.join(missing)})" if missing else "")
                     + f" | {yes(results['full'].get(c['seed']))} |")
    return "\n".join(lines) + "\n"


def timing_summary(bench) -> dict:
    """Sums per step type and rates; an estimate of the issue's grid from the rates."""
    steps: dict = {}
    for t in bench.timings:
        s = steps.setdefault(t["step"], {"runs": 0, "wall_s": 0.0, "units": 0.0})
        s["runs"], s["wall_s"] = s["runs"] + 1, s["wall_s"] + t["wall_s"]
        s["units"] += t.get("image_epochs", t.get("images", 0))
    for name, s in steps.items():
        s["per_unit"] = s["wall_s"] / s["units"] if s["units"] else None
        unit = "image-epoch" if name in ("teacher", "student", "full") else "image"
        s["rate"] = f"{s['per_unit']:.3f} s per {unit}" if s["per_unit"] else ""
    train = [s for k, s in steps.items() if k in ("teacher", "student", "full") and s["units"]]
    if not train:
        return {"steps": steps, "estimate": {}}
    run, n_val = run_config(), run_config().data.val
    te, se = run.teacher.epochs, run.student.epochs
    r = sum(s["wall_s"] for s in train) / sum(s["units"] for s in train)
    k = bench.args.student_soup if "scratch" not in bench.args.student_init else 1  # trainings per student
    per_student = len(ISSUE_GRID) * 150 * se * k  # n labelled + (150 - n) pseudo-labelled images
    est = {f"one student kind over the grid (U-Net training; {k} per student: --student-soup)": r * per_student,
           "teachers + full models": r * (sum(n * te for n, _ in ISSUE_GRID) + 3 * 150 * te)}

    def sam_gate(b):  # s per unlabelled image, s per validation image
        sam, gate = steps.get(f"sam {b}"), steps.get(f"gate {b}")
        if not (sam and sam["per_unit"]):
            return None
        return sam["per_unit"], gate["per_unit"] if gate and gate["per_unit"] else sam["per_unit"]

    measured = {b: sam_gate(b) for b in BACKENDS if sam_gate(b)}
    for b, (s, g) in measured.items():
        est[f"{b}: SAM on the unlabelled + validation images"] = (s * sum(150 - n for n, _ in ISSUE_GRID)
                                                                  + g * n_val * len(ISSUE_GRID))
        est[f"{b}: 3 SAM-kind students (box, sam, gated)"] = 3 * r * per_student
    for n in DEFAULT_NS:  # one configuration (n, seed) with every backend measured here
        est[f"one configuration n = {n} (teacher, SAM + gate, 2 + 3 per backend students; without full)"] = (
            r * n * te + 2 * k * r * 150 * se
            + sum(s * (150 - n) + g * n_val + 3 * k * r * 150 * se for s, g in measured.values()))
    est["one full-supervision model (per seed)"] = r * 150 * te
    if measured:
        est["total (2 backend-free students, teachers, full, the backends measured here)"] = sum(
            v for key, v in est.items() if not key.startswith("one ")) + 2 * r * per_student
    return {"steps": steps, "estimate": est}


def machine() -> str:
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


# ----------------------------------------------------------------------------- figures (matplotlib)

CLASS_COLORS = ["#e6503c", "#3c78e6", "#f0c828", "#3cc85a", "#c850dc"]


def plot_dice_vs_n(summary: dict, path: Path, title: str) -> bool:
    """Mean test Dice against n (log scale), one line per model (teacher and full dashed), error
    bars = std over seeds."""

    series: dict = {}
    for (n, model, backend, init), rows in group(summary["test"], ("n", "model", "backend", "init")).items():
        means = [r["mean"] for r in rows]
        series.setdefault((model, backend, init), []).append((n, float(np.mean(means)), float(np.std(means))))
    if not series:
        return False
    # self-training rounds: round 1 and the last round only (the rounds between crowd the figure; the tables have them)
    def start_and_round(init: str) -> tuple[str, int]:  # 'teacher#r3' -> ('teacher', 3); 'teacher' -> ('teacher', 1)
        start, _, rnd = init.partition("#r")
        return start, int(rnd or 1)

    last: dict = {}
    for model, backend, init in series:
        start, rnd = start_and_round(init)
        last[(model, backend, start)] = max(last.get((model, backend, start), 1), rnd)
    series = {(model, backend, init): pts for (model, backend, init), pts in series.items()
              if start_and_round(init)[1] in (1, last[(model, backend, start_and_round(init)[0])])}
    fig, ax = plt.subplots(figsize=(14, 6.2))
    for (model, backend, init), pts in sorted(series.items(), key=lambda t: (ORDER[t[0][0]], t[0][2] != "scratch",
                                                                                str(t[0][1]))):
        n, m, s = np.array(sorted(pts)).T
        bound = model in ("teacher", "full")
        ax.errorbar(n, m, yerr=s, ls="--" if bound else "-", marker="o", capsize=4, lw=2,
                    color={"teacher": "black", "full": "0.35"}.get(model),
                    label=model_label(model, backend, init).replace("student: ", "").replace("student ", ""))
    ns = sorted({n for pts in series.values() for n, _, _ in pts})
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.grid(axis="y", color="0.9")
    ax.set(xlabel="labelled training images n (log scale)", ylabel="mean test Dice", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def overlay_figure(bench, teacher: dict, student: dict, title: str, path: Path) -> None:
    """Rows: best, median, worst test image by the student's mean Dice; columns: image, truth,
    teacher, student (each class filled at alpha 0.35 and outlined)."""

    ids, sd = student["test_ids"], np.asarray(student["test_dice"]).mean(axis=1)
    td = dict(zip(teacher["test_ids"], np.asarray(teacher["test_dice"]).mean(axis=1)))
    order = np.argsort(sd, kind="stable")
    picks = [("best", order[-1]), ("median", order[len(order) // 2]), ("worst", order[0])]
    models = [load_checkpoint(m["checkpoint"])[0] for m in (teacher, student)]
    fig, axes = plt.subplots(len(picks), 4, figsize=(13, 10), squeeze=False)
    for r, (label, k) in enumerate(picks):
        i = ids[k]
        masks = [None, bench.data.truths[i], *(bench.predict(m, [i])[0] > 0.5 for m in models)]
        for j, (ax, m) in enumerate(zip(axes[r], masks)):
            ax.imshow(bench.data.grays[i], cmap="gray", vmin=0, vmax=255)
            for c, cm in enumerate(m if m is not None else []):
                color = CLASS_COLORS[c % len(CLASS_COLORS)]
                ax.imshow(np.ma.masked_where(~cm, cm.astype(np.uint8)), cmap=ListedColormap([color]), alpha=0.35)
                if cm.any():
                    ax.contour(cm.astype(np.float32), levels=[0.5], colors=[color], linewidths=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(["image", "truth", "teacher", "student"][j])
        axes[r, 0].set_ylabel(f"{label}\n{i}\nteacher {td.get(i, float('nan')):.3f}\nstudent {sd[k]:.3f}",
                              rotation=0, ha="right", va="center")
    fig.legend(handles=[Patch(color=CLASS_COLORS[c % len(CLASS_COLORS)], label=name)
                        for c, name in enumerate(bench.classes)], loc="lower center", ncol=len(bench.classes))
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def figures(bench, results: dict, summary: dict, kinds, backends) -> list[str]:
    matplotlib.use("Agg")
    out = []
    if plot_dice_vs_n(summary, bench.out / "dice_vs_n.png", "JSRT: mean test Dice against labelled images"):
        out.append(str(bench.out / "dice_vs_n.png"))
    cfgs = [c for c in results["configs"] if c.get("teacher")]
    if not cfgs:
        return out
    cfg = next((c for c in cfgs if c["n"] == 10), cfgs[0])
    for backend in backends:
        found = next(((k, i) for k in ("gated", "gated_sam", "sam", "pipeline", "box") for i in ("teacher", "scratch")
                      if k in kinds and cfg["students"].get(student_key(k, backend, i))), None)
        if found is None:
            continue
        kind, init = found
        path = bench.out / (f"overlays-n{cfg['n']}-s{cfg['seed']}-{kind}-{backend}"
                            f"{'' if init == 'scratch' else '-' + init}.png")
        overlay_figure(bench, cfg["teacher"], cfg["students"][student_key(kind, backend, init)],
                       f"n={cfg['n']} seed {cfg['seed']}: teacher vs {model_label(kind, backend, init)}; "
                       "best / median / worst test image by student Dice", path)
        out.append(str(path))
    return out
