"""plabel.report: the run report of `plabel report` and `plabel run`'s last stage, Ray-free.

One self-contained HTML page (every image an inline PNG, no network) that a person opens to decide
whether to trust a run, and report.json beside it with the same tables:

    collect   the run directory -> plain dicts (report.json): config, versions, stage times, image
              counts and error rows, teacher vs student Dice (and HD95), the gate per class with its
              calibration evidence and kept counts, score summaries, the review queue's choice
    figures   matplotlib (Agg) plots -> PNG bytes: Dice per class, score histograms
    overlays  images with masks, boxes and points drawn (numpy + cv2) -> PNG bytes
    html      the tables and images -> the page
    build     build_report(run_dir, out, review, seed): all of the above, written to disk
"""
from __future__ import annotations


def build_report(run_dir, out=None, review: int = 8, seed: int = 0) -> dict:
    """plabel.report.build.build_report (imported on use: matplotlib and torch load only then)."""
    from plabel.report.build import build_report as _build

    return _build(run_dir, out, review=review, seed=seed)
