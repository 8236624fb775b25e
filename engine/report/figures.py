"""The report's plots as PNG bytes (matplotlib, Agg backend: no display needed).

    dice_boxplot      Dice per class, teacher vs student, one box per model and class (the test
                      images), mean marked; the paper's comparison figure
    hd95_boxplot      the same for HD95 (pixels), when the run has it
    score_histograms  per class (columns) and score (rows: SAM's IoU, U-Net / SAM agreement, U-Net
                      confidence) a histogram of the table's rows, stacked by the gate's decision,
                      with the gate's thresholds as vertical lines
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

#: colours of the two models and of the gate's decisions (colour-blind safe: Okabe-Ito)
MODEL_COLOURS = {"teacher": "#999999", "student": "#0072B2"}
KEPT_COLOURS = {"sam": "#009E73", "unet": "#E69F00", "dropped": "#D55E00", "empty": "#CCCCCC"}
SCORE_TITLES = {"sam_iou": "SAM predicted IoU", "agreement_dice": "agreement Dice (U-Net vs SAM)",
                "unet_prob": "U-Net mean probability"}
DPI = 96


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _boxplot(classes: Sequence[str], per_model: Mapping[str, np.ndarray], ylabel: str, title: str,
             ylim: tuple | None) -> bytes:
    """per_model: {model: float (N, C)} (NaN entries left out of their box)."""
    plt = _pyplot()
    C, M = len(classes), len(per_model)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.25 * (C + 1) + 1.5), 3.4))
    width = 0.8 / M
    for j, (model, a) in enumerate(per_model.items()):
        a = np.asarray(a, dtype=np.float64).reshape(-1, C)
        image_mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in a]) if len(a) else a[:, 0]
        columns = [a[:, i] for i in range(C)] + [image_mean]
        data = [c[np.isfinite(c)] for c in columns]
        pos = np.arange(C + 1) + (j - (M - 1) / 2) * width
        colour = MODEL_COLOURS.get(model, f"C{j}")
        keep = [i for i, d in enumerate(data) if d.size]
        if keep:
            bp = ax.boxplot([data[i] for i in keep], positions=pos[keep], widths=width * 0.85, patch_artist=True,
                            showfliers=True, flierprops={"markersize": 3, "markeredgecolor": colour},
                            medianprops={"color": "black", "linewidth": 1})
            for box in bp["boxes"]:
                box.set_facecolor(colour)
                box.set_alpha(0.75)
            ax.plot(pos[keep], [data[i].mean() for i in keep], "D", color="white", markeredgecolor="black",
                    markersize=4, zorder=3)
        ax.bar([np.nan], [np.nan], color=colour, label=model)  # legend entry
    ax.set_xticks(np.arange(C + 1))
    ax.set_xticklabels(list(classes) + ["mean"], rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, frameon=True)
    return _png(fig)


def dice_boxplot(classes: Sequence[str], teacher: np.ndarray, student: np.ndarray) -> bytes:
    """PNG: boxes of the per-image Dice (x100) per class and of the per-image mean; teacher, student:
    float (N, C) in 0..1 (white diamonds: means)."""
    n = len(np.asarray(teacher))
    return _boxplot(classes, {"teacher": 100 * np.asarray(teacher, float), "student": 100 * np.asarray(student, float)},
                    "Dice (x100)", f"Test Dice per class, {n} images (diamond: mean)", (0, 101))


def hd95_boxplot(classes: Sequence[str], teacher: np.ndarray, student: np.ndarray) -> bytes:
    """PNG: boxes of the per-image HD95 (pixels) per class; float (N, C), NaN where undefined."""
    n = len(np.asarray(teacher))
    return _boxplot(classes, {"teacher": teacher, "student": student}, "HD95 (px)",
                    f"Test HD95 per class, {n} images (lower is better)", None)


def score_histograms(classes: Sequence[str], values: Mapping[str, Mapping[str, tuple]],
                     gates: Mapping[str, Mapping] | None = None, bins: int = 20) -> bytes:
    """PNG: a grid, rows = score fields, columns = classes. values: {class: {field: (float (n,),
    kept str (n,))}} (plabel.report.collect.score_values); gates: {class: ClassGate dict} whose
    thresholds are drawn (min_sam_iou on the IoU row, min_agreement / min_agreement_unet on the
    agreement row)."""
    plt = _pyplot()
    fields = list(SCORE_TITLES)
    C = len(classes)
    fig, axes = plt.subplots(len(fields), C, figsize=(max(6.0, 2.3 * C), 1.9 * len(fields) + 0.6), squeeze=False,
                             sharex=True)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for col, c in enumerate(classes):
        gate = (gates or {}).get(c) or {}
        for row, f in enumerate(fields):
            ax = axes[row][col]
            v, kept = values.get(c, {}).get(f, (np.zeros(0), np.zeros(0, dtype=object)))
            stacks = [(k, np.clip(v[kept == k], 0.0, 1.0)) for k in KEPT_COLOURS if (kept == k).any()]
            if stacks:
                ax.hist([s[1] for s in stacks], bins=edges, stacked=True, color=[KEPT_COLOURS[s[0]] for s in stacks],
                        label=[s[0] for s in stacks])
            else:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            lines = {"sam_iou": ["min_sam_iou"], "agreement_dice": ["min_agreement", "min_agreement_unet"]}.get(f, [])
            if gate.get("policy") in ("sam", "auto"):
                for name in lines:
                    if name == "min_agreement_unet" and gate.get("policy") != "auto":
                        continue
                    if gate.get(name) is not None:
                        ax.axvline(float(gate[name]), color="black", linestyle="--" if name != "min_agreement_unet"
                                   else ":", linewidth=1)
            if row == 0:
                ax.set_title(f"{c}\n(gate: {gate.get('policy', '?')})", fontsize=9)
            if col == 0:
                ax.set_ylabel(SCORE_TITLES[f], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlim(0, 1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=col) for col in KEPT_COLOURS.values()]
    fig.legend(handles, [f"kept: {k}" for k in KEPT_COLOURS], loc="lower center", ncol=len(KEPT_COLOURS),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _png(fig)
