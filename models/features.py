"""Stage features of timm models, read through ``forward_intermediates`` and ``feature_info``.

ScaleKD needs two feature maps from the student ("stage 3" and "stage 4") and the teacher's final
pre-pool map, all as NCHW tensors. Nothing here holds a table of shapes: channel counts, grids and
strides come from the model's own ``feature_info`` and from the tensors themselves.

Taps are indices into ``forward_intermediates`` (one per ``feature_info`` entry). A stage-4 tap of
``'final'`` means the model's ``forward_features`` output (after its final norm, where it has
one), which is also what the head pools.
"""
from dataclasses import dataclass
from typing import List, Tuple, Union

import torch
import torch.nn as nn

from timm.utils import unwrap_model

Tap = Union[int, str]


@dataclass
class StudentTaps:
    s3: int
    s4: Tap = 'final'


def is_isotropic(model: nn.Module) -> bool:
    """True for ViT/Mixer-like models whose blocks all share one stride."""
    reductions = {f['reduction'] for f in unwrap_model(model).feature_info}
    return len(reductions) == 1


def resolve_student_taps(model: nn.Module, s3: Tap = None, s4: Tap = None) -> StudentTaps:
    """Pick the stage-3 / stage-4 taps of a student.

    Hierarchical models: stage 3 is the last feature level at the second-coarsest stride (stride 16
    at 224 px) and stage 4 the final features. Isotropic models (ViT, Mixer): stage 3 is the block
    at three quarters of the depth (block 9 of 12, block 6 of 8) and stage 4 the final features.
    Either can be given explicitly (a block/level index, or 'final' for stage 4).
    """
    info = unwrap_model(model).feature_info
    n = len(info)
    if s3 is None:
        if is_isotropic(model):
            s3 = max(0, round(0.75 * n) - 1)
        else:
            strides = sorted({f['reduction'] for f in info})
            if len(strides) < 2:
                raise ValueError('cannot find a stage-3 level in a model with a single feature stride')
            s3 = max(i for i, f in enumerate(info) if f['reduction'] == strides[-2])
    s4 = 'final' if s4 is None else s4

    def _check(tap, name):
        if tap == 'final':
            return tap
        if not isinstance(tap, int) or not -n <= tap < n:
            raise ValueError(f"student {name} tap {tap!r} is out of range: the model has {n} feature levels "
                             f"(0..{n - 1}) or 'final'")
        return tap % n
    return StudentTaps(s3=_check(s3, 'stage-3'), s4=_check(s4, 'stage-4'))


def final_to_nchw(model: nn.Module, final: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Turn a model's ``forward_features`` output into an NCHW map on ``grid`` (H, W).

    NCHW (CNNs) passes through, NHWC (Swin, ``output_fmt``) is permuted, NLC tokens (ViT, Mixer,
    EVA) lose their prefix (class/register) tokens and are folded onto the patch grid.
    """
    m = unwrap_model(model)
    if final.ndim == 4:
        if getattr(m, 'output_fmt', 'NCHW') == 'NHWC':
            return final.permute(0, 3, 1, 2)
        return final
    if final.ndim == 3:
        npt = getattr(m, 'num_prefix_tokens', 0)
        tokens = final[:, npt:]
        B, L, C = tokens.shape
        H, W = grid
        if L != H * W:
            raise ValueError(f'{L} tokens do not fold onto a {H}x{W} grid')
        return tokens.transpose(1, 2).reshape(B, C, H, W)
    raise ValueError(f'unsupported feature shape {tuple(final.shape)}')


def forward_student(
        model: nn.Module,
        x: torch.Tensor,
        taps: StudentTaps,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One student pass: returns (logits, S3, S4), features NCHW.

    ``model`` may be DDP- or compile-wrapped only if it forwards these methods; the distillers
    call it on the bare student held inside their trainable module.
    """
    indices: List[int] = [taps.s3] if taps.s4 == 'final' else sorted({taps.s3, taps.s4})
    final, inter = model.forward_intermediates(x, indices=indices, output_fmt='NCHW')
    by_index = dict(zip(indices, inter))
    s3 = by_index[taps.s3]
    if taps.s4 == 'final':
        grid = s3.shape[-2:] if final.ndim == 3 else None
        s4 = final_to_nchw(model, final, grid)
    else:
        s4 = by_index[taps.s4]
    logits = model.forward_head(final)
    return logits, s3, s4


def forward_teacher(model: nn.Module, x: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher pass: returns (logits, T4) with T4 the final pre-pool map as NCHW."""
    final = model.forward_features(x)
    logits = model.forward_head(final)
    return logits, final_to_nchw(model, final, grid)
