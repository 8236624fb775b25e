"""Several SAM stage sets on the same images with one image-encoder pass (SamRefiner.encode once,
SamRefiner.refine_features per stage set): the results equal each refiner's own refine_batch.
Used by the quality benchmark to compare prompt variants at the cost of one encoder pass."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def refine_variants(refiners: Mapping[str, object], images: Sequence[np.ndarray],
                    prompts: Sequence) -> dict[str, list]:
    """{name: [RefinementResult per image]} for several plabel.method.sam.SamRefiner of ONE SamModel
    (e.g. different ``stages``), from a single image-encoder call over the images that have a
    valid class (the first refiner's encode: its encoder_batch and autocast); images without one
    are not encoded and get empty results, as in SamRefiner.refine_batch.

    images: uint8 (H, W, 3) RGB or (H, W) gray; prompts: plabel.method.prompts.RefinementPrompts each.
    """
    if not refiners:
        raise ValueError("refine_variants: no refiners")
    if len(images) != len(prompts):
        raise ValueError(f"refine_variants: {len(images)} images but {len(prompts)} prompt sets")
    first = next(iter(refiners.values()))
    for name, r in refiners.items():
        if r.sam is not first.sam:
            raise ValueError(f"refine_variants: refiner {name!r} has another SAM model; all must share one")
    todo = [i for i, p in enumerate(prompts) if np.asarray(p.valid).any()]
    features = first.encode([images[i] for i in todo]) if todo else None
    row = {i: k for k, i in enumerate(todo)}
    out = {}
    for name, r in refiners.items():
        results = []
        for i, (image, p) in enumerate(zip(images, prompts)):
            size = tuple(int(s) for s in np.asarray(image).shape[:2])
            feats = features[row[i]:row[i] + 1] if i in row else None
            results.append(r.refine_features(feats, size, p))
        out[name] = results
    return out
