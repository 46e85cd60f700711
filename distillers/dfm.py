"""Dual-view feature mimicking (DFM): the two feature distances of ScaleKD.

Direct view:      D(P, T)     = 1/B * sum_{b,c,h,w} (n(P) - n(T))^2
Alternative view: D_alt(P, T) = D(phi(P), phi(T))
n() is L2 normalisation over channels at each position. phi() is what the official code does
with DCT matrices (DCT-II, zero the (0, 0) coefficient, inverse DCT); since the DC basis is
constant and the transform is exactly inverted, phi is per-channel spatial mean removal, which is
how it is computed here (no matrices, any H x W).
"""
import torch
import torch.nn.functional as F


def remove_dc(x: torch.Tensor) -> torch.Tensor:
    """Drop the direct (zero-frequency) component of each channel of an NCHW map."""
    return x - x.mean(dim=(2, 3), keepdim=True)


def feature_distance(p: torch.Tensor, t: torch.Tensor, alternative: bool = False) -> torch.Tensor:
    """Sum of squared differences of channel-normalised maps, divided by the batch size (fp32)."""
    if p.shape != t.shape:
        raise ValueError(f'projected map {tuple(p.shape)} and teacher map {tuple(t.shape)} differ')
    p, t = p.float(), t.float()
    if alternative:
        p, t = remove_dc(p), remove_dc(t)
    return (F.normalize(p, dim=1) - F.normalize(t, dim=1)).pow(2).sum() / p.shape[0]
