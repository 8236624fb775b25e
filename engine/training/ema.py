"""The mean teacher's weights (Tarvainen & Valpola, 2017): an exponential moving average of the
student's, the semi-supervised baseline the paper compares plabel's method with.

    mean_teacher   a frozen copy of a U-Net to average into
    ema_update     after every optimisation step: teacher <- decay * teacher + (1 - decay) * student

plabel.training.loop.fit(ema=decay) runs it: the teacher's soft outputs on a differently
intensity-jittered copy of each batch are the consistency targets of the entries without labels
(plabel.method.losses.distillation_loss), exactly where a plabel student is distilled from its
fixed teacher.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def mean_teacher(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off: the mean teacher at step 0."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher's parameters <- decay * teacher + (1 - decay) * student, in place; buffers
    (BatchNorm running statistics, counters) are copied from the student. Both modules must have
    the same architecture (same parameter and buffer names, in order); decay in [0, 1]."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update: decay must be in [0, 1], got {decay}")
    tp, sp = dict(teacher.named_parameters()), dict(student.named_parameters())
    if tp.keys() != sp.keys():
        raise ValueError("ema_update: teacher and student have different parameters")
    for name, t in tp.items():
        t.mul_(decay).add_(sp[name].detach().to(t.dtype), alpha=1.0 - decay)
    sb = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(sb[name])
