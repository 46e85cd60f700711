"""Cross attention projector (CAP): student feature map -> tokens on the teacher's grid.

CAP of the ScaleKD paper (Sec. 3, Fig. 1a), with the math as the official implementation computes it:

    x   = ReLU(Norm(Conv3x3(s))) + pos                       (B, Cs, Hs, Ws), resolution preserved
    q0  = ReLU(Conv1x1(queries on the Hq x Wq grid))         (B, Nq, Ct)
    o   = MultiHeadCrossAttn(q0 -> keys/values x)            (B, Nq, Ct), logits * scale / sqrt(d)
    y   = LN(o);  out = y + W2 ReLU(W1 y)                     (B, Nq, Ct), MLP ratio 4, no residual
                                                              around the attention
Queries are a learned table (stage-3 CAPs) or passed in (stage-4 CAPs take the proxy-path output).
Resolution alignment happens only through the number of queries; nothing is interpolated.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import LayerNorm2d, Mlp, trunc_normal_


class CrossAttentionProjector(nn.Module):
    """Project a (B, Cs, Hs, Ws) student map to (B, Hq*Wq, Ct) teacher-like tokens.

    Args:
        in_chs: student channels Cs.
        out_chs: teacher channels Ct (also the query and attention width).
        in_grid: student grid (Hs, Ws); the position embedding has this shape.
        query_grid: teacher grid (Hq, Wq).
        num_heads: attention heads; Ct must divide by it.
        softmax_scale: extra factor on the attention logits (the official code uses 1 or 5).
        learned_query: own an nn.Embedding query table; otherwise queries must be passed in.
        norm: 'bn' (BatchNorm2d, default) or 'ln' (channel LayerNorm2d) in the stem.
        mlp_ratio: hidden width of the output MLP relative to Ct.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            in_grid: Tuple[int, int],
            query_grid: Tuple[int, int],
            num_heads: int = 8,
            softmax_scale: float = 1.0,
            learned_query: bool = True,
            norm: str = 'bn',
            mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if out_chs % num_heads:
            raise ValueError(f'CAP width {out_chs} is not divisible by {num_heads} heads')
        if norm not in ('bn', 'ln'):
            raise ValueError(f"CAP norm must be 'bn' or 'ln', got {norm!r}")
        self.in_grid = tuple(in_grid)
        self.query_grid = tuple(query_grid)
        self.num_heads = num_heads
        self.out_chs = out_chs
        self.scale = softmax_scale * (out_chs // num_heads) ** -0.5

        self.stem = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 3, stride=1, padding=1),
            nn.BatchNorm2d(in_chs) if norm == 'bn' else LayerNorm2d(in_chs),
            nn.ReLU(inplace=True),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, in_chs, *self.in_grid))
        trunc_normal_(self.pos_embed, std=.02)
        nq = self.query_grid[0] * self.query_grid[1]
        # PyTorch's default N(0, 1) init, as in the official code
        self.query = nn.Embedding(nq, out_chs) if learned_query else None
        self.query_proj = nn.Sequential(nn.Conv2d(out_chs, out_chs, 1), nn.ReLU(inplace=True))
        self.q = nn.Linear(out_chs, out_chs)
        self.k = nn.Linear(in_chs, out_chs)
        self.v = nn.Linear(in_chs, out_chs)
        self.proj = nn.Linear(out_chs, out_chs)
        self.norm = nn.LayerNorm(out_chs)
        self.mlp = Mlp(out_chs, int(out_chs * mlp_ratio), act_layer=nn.ReLU)

    def forward(self, x: torch.Tensor, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, Cs, Hs, Ws); queries: None (learned table) or an NCHW map (B, Ct, Hq, Wq)."""
        B, _, H, W = x.shape
        if (H, W) != self.in_grid:
            raise ValueError(f'CAP built for a {self.in_grid} student grid got {(H, W)}; '
                             f'train at the image size the distiller was built for')
        x = self.stem(x) + self.pos_embed
        kv = x.flatten(2).transpose(1, 2)  # (B, Hs*Ws, Cs)
        if queries is None:
            if self.query is None:
                raise ValueError('this CAP has no learned queries; pass the proxy-path queries')
            # the learned-query path does not depend on the batch: computed once, then broadcast to B
            Hq, Wq = self.query_grid
            queries = self.query.weight.t().reshape(1, self.out_chs, Hq, Wq)
            q = self.q(self.query_proj(queries).flatten(2).transpose(1, 2)).expand(B, -1, -1)  # (B, Nq, Ct)
        else:
            q = self.q(self.query_proj(queries).flatten(2).transpose(1, 2))  # (B, Nq, Ct)

        h = self.num_heads
        q = q.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Nq, d)
        k = self.k(kv).unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, Hs*Ws, d)
        v = self.v(kv).unflatten(-1, (h, -1)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, Nq, d)
        o = self.proj(o.transpose(1, 2).flatten(2))  # (B, Nq, Ct)
        y = self.norm(o)
        return y + self.mlp(y)

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, Nq, Ct) tokens -> (B, Ct, Hq, Wq) map, row-major."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.out_chs, *self.query_grid)
