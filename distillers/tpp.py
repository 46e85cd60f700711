"""Teacher parameter perception (TPP): the proxy path through the frozen teacher's last stage.

Stage-3 projections shaped like the teacher's stage-3 output run through the teacher's last
stage (``models.tails.TeacherTail``). Teacher weights are frozen, but the pass is *not* under
no_grad and nothing is detached: gradients flow through the teacher's activations back into the
stage-3 projectors and the student. The outputs are mimicked against the teacher's final map and
also become the input-dependent queries of the stage-4 projectors.

The official code runs the tail once per view; here all views go through it in one batched call
(exact for LayerNorm teachers, which have no batch statistics).
"""
from typing import List

import torch
import torch.nn as nn


def perceive(tail: nn.Module, projections: List[torch.Tensor]) -> List[torch.Tensor]:
    """Run NCHW maps of the teacher's stage-3 shape through the teacher tail; one output per input."""
    if len(projections) == 1:
        return [tail(projections[0])]
    out = tail(torch.cat(projections, dim=0))
    return list(out.chunk(len(projections), dim=0))
