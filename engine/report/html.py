"""report.json's tables and the inline images -> one self-contained HTML page (no network: CSS
and the one script are inline, every image a ``data:image/png;base64`` URI).

    render(report, images, colours) -> str
        report:  plabel.report.collect.collect(...) (plus "hd95")
        images:  {"dice_plot" | "hd95_plot" | "histograms" | "review:<id>" | "test:<key>": data URI}
        colours: one CSS colour per class (the overlays' colours), for the legend

Dice is shown x100 with 2 decimals, as `plabel run`'s dice_table.txt. A section the run lacks says
"not in this run" with the reason. On load, the script sets ``<body data-images-loaded="k/n">``:
k of the page's n images decoded (complete, naturalWidth > 0); tests read it with a headless browser.
"""
from __future__ import annotations

import datetime as _dt
from html import escape
from typing import Mapping, Sequence

import yaml

from plabel.report.figures import KEPT_COLOURS

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f0f0f0}td.l,th.l{text-align:left}
.muted{color:#777}.missing{color:#8a6d3b;background:#fcf8e3;border:1px solid #faebcc;padding:6px 10px;display:inline-block}
.warn{color:#a94442;background:#f2dede;border:1px solid #ebccd1;padding:6px 10px;margin:4px 0}
.good{color:#3c763d}.bad{color:#a94442}
.summary{background:#fff;border:1px solid #ddd;padding:10px 14px;margin:10px 0}
.chip{display:inline-block;padding:0 6px;margin:1px;border-radius:8px;font-size:12px;color:#111}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
figure{margin:8px 0 14px}figcaption{font-size:12px;color:#555}
img{max-width:100%;image-rendering:auto}
.card{display:inline-block;vertical-align:top;margin:0 14px 14px 0;background:#fff;border:1px solid #ddd;padding:6px}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;font-size:12px}
nav a{margin-right:12px}
.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
});
"""


def pct(v) -> str:
    """Dice 0..1 -> '78.71' (x100); '-' for None."""
    return "-" if v is None else f"{100.0 * v:.2f}"


def num(v, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(header: Sequence[str], rows: Sequence[Sequence], left: int = 1, cls: str = "") -> str:
    """An HTML table; cells are already-escaped HTML; the first ``left`` columns left-aligned."""
    h = "".join(f'<th class="l">{c}</th>' if i < left else f"<th>{c}</th>" for i, c in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _missing(report: dict, key: str, default: str = "not in this run") -> str:
    return f'<p class="missing">{escape(report["missing"].get(key, default))}</p>'


def _img(images: Mapping[str, str], key: str, alt: str, caption: str = "") -> str:
    if key not in images:
        return ""
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{images[key]}" alt="{escape(alt)}">{cap}</figure>'


def _chip(kept: str | None) -> str:
    colour = KEPT_COLOURS.get(kept or "", "#eee")
    return f'<span class="chip" style="background:{colour}">{escape(kept or "-")}</span>'


def _legend(classes: Sequence[str], colours: Sequence[str]) -> str:
    return "".join(f'<span class="sw" style="background:{col}"></span>{escape(c)}' for c, col in zip(classes, colours))


# ------------------------------------------------------------------------------------------ sections


def _summary(report: dict) -> str:
    """The lines a person reads first."""
    lines = []
    dice = report.get("dice")
    if dice:
        t, s = dice["models"]["teacher"], dice["models"]["student"]
        d = dice["mean_delta"]
        sign = "good" if (d or 0) >= 0 else "bad"
        lines.append(f"Mean test Dice (x100, {escape(str(t['n_images']))} images): teacher {pct(t['mean'])} &rarr; "
                     f"student {pct(s['mean'])} (<span class=\"{sign}\">{'+' if (d or 0) >= 0 else ''}"
                     f"{num(None if d is None else 100 * d, '{:.2f}')}</span>)")
        lower = [c for c, v in dice["delta"].items() if v is not None and v < 0]
        lines.append("Classes where the student is below the teacher: "
                     + (", ".join(f"{escape(c)} ({100 * dice['delta'][c]:+.2f})" for c in lower) if lower else "none"))
        lines += [f"Note: {escape(n)}" for n in dice.get("student_notes") or []]
    else:
        lines.append("No test Dice: " + escape(report["missing"].get("dice", "not in this run")))
    gate = report.get("gate")
    if gate:
        by = {}
        for c, g in gate["per_class"].items():
            by.setdefault(g["gate"].get("policy", "?"), []).append(c)
        lines.append("Gate (" + escape(gate["source"]) + "): " + "; ".join(
            f"{escape(p)}: {', '.join(escape(c) for c in cs)}" for p, cs in by.items()))
    lab = report["run"].get("label")
    if lab:
        lines.append(f"Pseudo labels: {lab.get('rows')} images (ok {lab.get('ok')}, empty {lab.get('empty')}, "
                     f"error {lab.get('error')})")
    warn = ""
    if lab and lab.get("error"):
        warn += f'<div class="warn">{lab["error"]} image(s) could not be labelled: see "Images" below.</div>'
    for what, why in (report.get("problems") or {}).items():
        warn += f'<div class="warn">{escape(what)}: {escape(str(why))}</div>'
    return '<div class="summary">' + "<br>".join(lines) + "</div>" + warn


def _run(report: dict) -> str:
    run = report["run"]
    stages = [[escape(s["name"]), num(s["wall_s"], "{:.1f}"), "yes" if s["done"] else "no"] for s in run["stages"]]
    stages.append(["<b>total</b>", f"<b>{num(run['total_wall_s'], '{:.1f}')}</b>", ""])
    col1 = "<h3>Stages</h3>" + _table(["stage", "wall time (s)", "done"], stages)
    col2 = '<h3 id="images">Images</h3>'
    if run["splits"]:
        col2 += _table(["split", "images"], [[escape(k), v] for k, v in run["splits"].items()])
    lab = run.get("label")
    if lab:
        col2 += "<div>Label stage:</div>" + _table(["rows", "ok", "empty", "error"], [
            [lab.get("rows"), lab.get("ok"), lab.get("empty"), lab.get("error")]], left=0)
    else:
        col2 += _missing(report, "table")
    env = run.get("environment") or {}
    if env:
        rows = [["python", escape(str(env.get("python")))], ["platform", escape(str(env.get("platform")))]]
        rows += [[escape(k), escape(str(v))] for k, v in (env.get("packages") or {}).items()]
        col3 = "<h3>Versions</h3>" + _table(["package", "version"], rows, left=2)
    else:
        col3 = "<h3>Versions</h3>" + _missing(report, "environment", "not in this run: no environment.json")
    parts = ['<h2 id="run">The run</h2>', f'<div class="row"><div>{col1}</div><div>{col2}</div><div>{col3}</div></div>']
    if run["errors"]:
        parts.append("<h3>Error rows</h3>" + _table(
            ["id", "message"], [[escape(str(e["id"])), escape(str(e["message"]))] for e in run["errors"]], left=2))
    elif lab:
        parts.append('<p class="muted">No error rows in the pseudo-label table.</p>')
    if run.get("config"):
        parts.append("<details><summary>Config (config.yaml)</summary><pre>"
                     + escape(yaml.safe_dump(run["config"], sort_keys=False)) + "</pre></details>")
    else:
        parts.append(_missing(report, "config", "not in this run: no config.yaml"))
    return "".join(parts)


def _dice(report: dict, images: Mapping[str, str]) -> str:
    parts = ['<h2 id="dice">Teacher vs student (test split)</h2>']
    dice = report.get("dice")
    if not dice:
        return parts[0] + _missing(report, "dice")
    classes = report["classes"]
    rows = []
    for m in ("teacher", "student"):
        s = dice["models"][m]
        rows.append([m] + [f"{pct(s['per_class'][c]['mean'])} &plusmn; {pct(s['per_class'][c]['std'])}"
                           for c in classes] + [f"<b>{pct(s['mean'])} &plusmn; {pct(s['std'])}</b>", s["n_images"]])
    rows.append(["student &minus; teacher"] + [_signed(dice["delta"][c]) for c in classes]
                + [_signed(dice["mean_delta"]), ""])
    parts.append("<p>Dice x100, mean &plusmn; std over the test images (the per-image mean over classes for the "
                 "last column), as <code>dice_table.txt</code>.</p>")
    parts.append(_table(["model", *map(escape, classes), "mean &plusmn; std", "n"], rows))
    parts.append(_img(images, "dice_plot", "Dice per class, teacher vs student",
                      "Boxes: quartiles over the test images; whiskers 1.5 IQR; diamonds: means."))
    hd = report.get("hd95")
    parts.append("<h3>HD95</h3>")
    if hd:
        rows = []
        for m in ("teacher", "student"):
            s = hd["models"][m]
            rows.append([m] + [f"{num(s['per_class'][c]['mean'], '{:.2f}')} &plusmn; "
                               f"{num(s['per_class'][c]['std'], '{:.2f}')}"
                               + (f' <span class="muted">({s["per_class"][c]["n_nan"]} undefined)</span>'
                                  if s["per_class"][c].get("n_nan") else "") for c in classes]
                        + [f"<b>{num(s['mean'], '{:.2f}')} &plusmn; {num(s['std'], '{:.2f}')}</b>"])
        parts.append(f"<p>95th-percentile Hausdorff distance in {escape(hd['unit'])} (lower is better), "
                     f"{escape(hd['source'])}. Undefined where exactly one of prediction and truth is empty.</p>")
        parts.append(_table(["model", *map(escape, classes), "mean &plusmn; std"], rows))
        parts.append(_img(images, "hd95_plot", "HD95 per class, teacher vs student"))
    else:
        parts.append(_missing(report, "hd95"))
    return "".join(parts)


def _signed(v) -> str:
    if v is None:
        return "-"
    cls = "good" if v >= 0 else "bad"
    return f'<span class="{cls}">{100 * v:+.2f}</span>'


def _gate_text(g: Mapping) -> str:
    if not g:
        return "-"
    p = g.get("policy")
    if p in ("unet", "drop"):
        return escape(str(p))
    text = f"{escape(str(p))}: IoU &ge; {num(g.get('min_sam_iou'), '{:g}')}, agreement &ge; {num(g.get('min_agreement'), '{:g}')}"
    if p == "auto":
        text += f"; else U-Net if agreement &ge; {num(g.get('min_agreement_unet'), '{:g}')}"
    return text


def _gate(report: dict) -> str:
    parts = ['<h2 id="gate">The quality gate</h2>']
    gate = report.get("gate")
    if not gate:
        return parts[0] + _missing(report, "table")
    classes = report["classes"]
    v = gate.get("validation") or {}
    parts.append(f"<p>The gate the label stage used, from <code>{escape(gate['source'])}</code>"
                 + (f"; calibrated on {v.get('n_images')} {escape(str(v.get('split', 'validation')))} images" if v else "")
                 + ". Kept counts: the pseudo-label table's <code>&lt;class&gt;.kept</code> over its ok / empty rows.</p>")
    rows = []
    for c in classes:
        g = gate["per_class"][c]
        note = "configured (overrides the calibration)" if g["overridden"] else (
            "calibrated" if g["calibrated"] else escape(str(g.get("reason") or "configured")))
        k = g.get("kept") or {}
        rows.append([escape(c), _gate_text(g["gate"]), note] + [k.get(x, "-") for x in ("sam", "unet", "dropped", "empty")])
    parts.append(_table(["class", "gate used", "", *(_chip(x) for x in ("sam", "unet", "dropped", "empty"))], rows,
                        left=3))
    parts.append("<h3>Calibration evidence (validation images)</h3>")
    if report["missing"].get("calibration"):
        parts.append(_missing(report, "calibration"))
        return "".join(parts)
    rows = []
    for c in classes:
        g = gate["per_class"][c]
        e = g.get("evidence") or {}
        kv = e.get("kept") or {}
        cv = e.get("cross_validation") or {}
        rows.append([escape(c), _gate_text(g.get("calibrated_gate") or {}), e.get("n_present", "-"),
                     num(e.get("dice_unet")), num(e.get("dice_sam")), num(e.get("dice_gated")), num(e.get("drop_value")),
                     num(e.get("objective")), num(e.get("objective_base")),
                     "/".join(str(kv.get(x, "-")) for x in ("sam", "unet", "dropped", "empty")),
                     (f"search {num(cv.get('search'))}, simple {num(cv.get('simple'))}" if cv else "-")])
    parts.append(_table(["class", "calibrated choice", "found on", "Dice U-Net", "Dice SAM", "Dice gated",
                         "break-even", "objective", "objective (configured gate)", "kept sam/unet/dropped/empty",
                         "leave-one-out"], rows, left=2))
    parts.append('<p class="muted">Dice U-Net / SAM: mean over the validation images of the cleaned teacher masks '
                 "and SAM's masks against the ground truth; Dice gated: of the masks the chosen gate keeps; "
                 "objective: the calibration's score (plabel.method.calibration), higher is better.</p>")
    return "".join(parts)


def _scores(report: dict, images: Mapping[str, str]) -> str:
    parts = ['<h2 id="scores">Pseudo-label scores</h2>']
    if not report.get("scores"):
        return parts[0] + _missing(report, "table")
    parts.append(_img(images, "histograms", "score histograms per class",
                      "Per class: SAM's predicted IoU, the Dice between the cleaned U-Net mask and SAM's mask, and "
                      "the U-Net's mean probability inside its cleaned mask, stacked by the gate's decision; dashed: "
                      "the gate's SAM thresholds, dotted: auto's U-Net agreement threshold."))
    rows = []
    for c, fields in report["scores"].items():
        for f, s in fields.items():
            rows.append([escape(c), escape(f), s["n"], num(s["mean"]), num(s["p10"]), num(s["median"]), num(s["p90"])])
    parts.append("<details><summary>The numbers</summary>"
                 + _table(["class", "score", "n", "mean", "p10", "median", "p90"], rows, left=2) + "</details>")
    return "".join(parts)


def _review(report: dict, images: Mapping[str, str], legend: str) -> str:
    parts = ['<h2 id="review">Review queue</h2>']
    rv = report.get("review")
    if not rv:
        return parts[0] + _missing(report, "table")
    classes = report["classes"]
    parts.append(f"<p>Each row: the image | the teacher's cleaned masks (outlined) with SAM's prompts (box; disc: "
                 f"positive point, cross: negative) | the kept pseudo label (dropped classes not drawn). {legend}</p>")
    which = ("of a kept class (sam / unet)" if rv.get("ranked_by") == "kept classes"
             else "of any class (the gate kept no class in this table)")
    for part, title in (("lowest_agreement", f"The {rv['k']} lowest U-Net / SAM agreement Dice {which}"),
                        ("random", f"{rv['k']} at random (seed {rv['seed']})")):
        parts.append(f"<h3>{escape(title)}</h3>")
        entries = rv.get(part) or []
        if not entries:
            parts.append('<p class="muted">none</p>')
        for e in entries:
            chips = " ".join(f"{escape(c)} {_chip(e['kept'].get(c))}" for c in classes)
            low = (f"lowest agreement {num(e['min_agreement'])} ({escape(str(e['min_class']))})"
                   if e["min_agreement"] is not None else "no agreement score")
            img = images.get(f"review:{e['id']}")
            body = f'<img src="{img}" alt="{escape(str(e["id"]))}">' if img else \
                '<p class="missing">image not available</p>'
            parts.append(f'<div class="card"><b>{escape(str(e["id"]))}</b> <span class="muted">{low}</span><br>'
                         f"{chips}<br>{body}</div>")
    return "".join(parts)


def _test(report: dict, images: Mapping[str, str], legend: str) -> str:
    parts = ['<h2 id="test">Test images: best, median, worst</h2>']
    ex = report.get("test_examples")
    if not ex:
        return parts[0] + _missing(report, "dice")
    classes = report["classes"]
    parts.append("<p>Ranked by the mean Dice over classes, averaged over teacher and student. Each row: the image | "
                 f"ground truth | teacher | student. {legend}</p>")
    for e in ex:
        img = images.get(f"test:{e['key']}")
        rows = [[m] + [pct(v) for v in e[m]] for m in ("teacher", "student")]
        body = f'<img src="{img}" alt="{escape(e["key"])}">' if img else '<p class="missing">image not available</p>'
        parts.append(f'<div class="card"><b>{escape(e["rank"])}: {escape(e["key"])}</b> '
                     f'<span class="muted">mean Dice {pct(e["score"])}</span><br>{body}'
                     + _table(["Dice x100", *map(escape, classes)], rows) + "</div>")
    return "".join(parts)


def render(report: dict, images: Mapping[str, str], colours: Sequence[str]) -> str:
    """The whole page (see the module docstring)."""
    run = report["run"]
    legend = "Classes: " + _legend(report["classes"], colours)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    version = ((run.get("environment") or {}).get("packages") or {}).get("plabel")
    head = (f"<h1>plabel run report: {escape(str(run['name']))}</h1>"
            f'<p class="muted">{escape(str(run["run_dir"]))} &middot; written {stamp}'
            + (f" &middot; plabel {escape(str(version))}" if version else "") + "</p>"
            '<nav><a href="#run">run</a><a href="#dice">teacher vs student</a><a href="#gate">gate</a>'
            '<a href="#scores">scores</a><a href="#review">review queue</a><a href="#test">test images</a></nav>')
    body = "".join([head, _summary(report), _run(report), _dice(report, images), _gate(report),
                    _scores(report, images), _review(report, images, legend), _test(report, images, legend)])
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>plabel report: {escape(str(run['name']))}</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style><script>{SCRIPT}</script></head>"
            f"<body><main>{body}</main></body></html>\n")
