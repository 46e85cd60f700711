"""Run a teacher "from stage k": the last stage of a frozen teacher as a differentiable function.

ScaleKD's teacher parameter perception feeds projected student features into the teacher's last
stage. Two families are supported, by structure rather than by name:

* hierarchical transformers with ``layers`` + ``norm`` and NHWC stages (Swin): the tail is
  ``layers[-1]`` (its patch merging and blocks) then ``norm``;
* plain token transformers with ``blocks`` + ``norm`` (ViT, DeiT, EVA/BEiT without rotary
  embeddings): the tail is the last ``num_blocks`` blocks, run on patch tokens only (no class
  token), then ``norm`` (an Identity for models that pool with an fc-norm).

The tail shares the teacher's modules, so it follows the teacher's train/eval mode, and never
owns parameters of its own.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from timm.utils import unwrap_model


class TeacherTail(nn.Module):
    """Callable view of a teacher's last stage; input and output are NCHW maps."""

    def __init__(self, teacher: nn.Module, img_size: Tuple[int, int], num_blocks: Optional[int] = None):
        super().__init__()
        m = unwrap_model(teacher)
        info = m.feature_info
        # kept in a list so the tail does not register the teacher as its own submodule
        self._teacher = [m]
        if hasattr(m, 'layers') and getattr(m, 'output_fmt', None) == 'NHWC':
            self.kind = 'swin'
            self.start = len(info) - 1
            self.num_blocks = 1
        elif hasattr(m, 'blocks') and hasattr(m, 'norm'):
            if getattr(m, 'rope', None) is not None:
                raise ValueError(f'{type(m).__name__} uses rotary position embeddings; a teacher tail without '
                                 f'class token is only defined for absolute-position ViT/EVA teachers')
            self.kind = 'vit'
            depth = len(m.blocks)
            self.num_blocks = num_blocks or max(1, depth // 12)
            if not 0 < self.num_blocks < depth:
                raise ValueError(f'teacher tail of {self.num_blocks} blocks is out of range for a {depth}-block teacher')
            self.start = depth - self.num_blocks
        else:
            raise ValueError(
                f'no teacher tail is defined for {type(m).__name__}: supported are Swin-style (layers + norm, NHWC) '
                f'and ViT/EVA-style (blocks + norm) teachers')
        # shapes from feature_info: stage input = output of the level before the tail
        prev = info[self.start - 1]
        last = info[-1]
        self.in_chs = prev['num_chs']
        self.in_grid = (img_size[0] // prev['reduction'], img_size[1] // prev['reduction'])
        self.out_chs = last['num_chs']
        self.out_grid = (img_size[0] // last['reduction'], img_size[1] // last['reduction'])

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.teacher
        if self.kind == 'swin':
            x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC, (B, 14, 14, C3) for Swin at 224
            x = m.layers[-1](x)  # patch merging + last-stage blocks -> (B, 7, 7, C4)
            x = m.norm(x)
            return x.permute(0, 3, 1, 2)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C) patch tokens, no class token
        for blk in m.blocks[self.start:]:
            x = blk(x)
        x = m.norm(x)
        return x.transpose(1, 2).reshape(B, -1, H, W)

    def extra_repr(self) -> str:
        return (f'kind={self.kind}, blocks={self.num_blocks}, in={self.in_chs}x{self.in_grid}, '
                f'out={self.out_chs}x{self.out_grid}')
