"""Weight "soups": the element-wise average of U-Nets fine-tuned from one starting point (the
students of student.soup, warm-started from one teacher). plabel run averages its soup members'
checkpoints with :func:`average_checkpoints`; benchmarks average state dicts with :func:`average_weights`.
"""
from __future__ import annotations

import torch

from plabel.method.unet import load_checkpoint, save_checkpoint


def average_weights(states) -> dict:
    """The element-wise mean of state dicts with the same keys and shapes: a weight "soup".

    states: a sequence of >= 1 state dicts (name -> tensor). Floating tensors (weights,
    batch-norm running statistics) are averaged in float64 and cast back to their dtype; integer
    buffers (batch-norm's num_batches_tracked) get the floor of their mean. Meaningful for models
    fine-tuned from one starting point (students warm-started from one teacher); ValueError
    naming the state dict and key that differ.
    """
    states = list(states)
    if not states:
        raise ValueError("average_weights: no state dicts")
    keys = list(states[0])
    for i, sd in enumerate(states[1:], 1):
        if list(sd) != keys:
            extra = sorted(set(sd) ^ set(keys))
            raise ValueError(f"average_weights: state dict {i} has other keys than state dict 0 "
                             f"(differing: {extra[:5] or 'the order'})")
        for k in keys:
            if tuple(sd[k].shape) != tuple(states[0][k].shape):
                raise ValueError(f"average_weights: {k} has shape {tuple(sd[k].shape)} in state dict {i}, "
                                 f"{tuple(states[0][k].shape)} in state dict 0")
    out = {}
    for k in keys:
        ref = states[0][k]
        mean = torch.stack([sd[k].detach().cpu().to(torch.float64) for sd in states]).mean(0)
        out[k] = mean.to(ref.dtype) if ref.is_floating_point() else mean.floor().to(ref.dtype)
    return out


def average_checkpoints(paths, out_path, extra: dict | None = None) -> dict:
    """Write the weight average (:func:`average_weights`) of U-Net checkpoints to ``out_path``.

    paths: >= 1 checkpoints of plabel.method.unet.save_checkpoint with the same UNetConfig (ValueError
    naming the one that differs); paths and out_path may be URIs (plabel.data.storage). The result
    keeps the first checkpoint's metadata, updated with ``extra`` and {"averaged_from": number of
    checkpoints}. Returns the written metadata.
    """

    paths = list(paths)
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints")
    models, meta0, cfg0 = [], None, None
    for p in paths:
        model, cfg, meta = load_checkpoint(p)
        if cfg0 is None:
            cfg0, meta0 = cfg, meta
        elif cfg != cfg0:
            raise ValueError(f"average_checkpoints: {p} is a U-Net {cfg.to_dict()}, {paths[0]} a U-Net "
                             f"{cfg0.to_dict()}; only checkpoints of one architecture can be averaged")
        models.append(model)
    soup = models[0]
    soup.load_state_dict(average_weights([m.state_dict() for m in models]))
    meta = {**meta0, **(extra or {}), "averaged_from": len(paths)}
    save_checkpoint(out_path, soup, cfg0, meta)
    return meta
