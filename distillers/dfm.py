"""Dual-view feature mimicking (DFM): the two feature distances of ScaleKD (paper Sec. 3.2, Eq. 3-4).

Direct view:      D(P, T)     = 1/B * sum_{b,c,h,w} (n(P) - n(T))^2
Alternative view: D_alt(P, T) = D(phi(P), phi(T))
n() is L2 normalisation over channels at each position. phi() is what the official code does
with DCT matrices (DCT-II, zero the (0, 0) coefficient, inverse DCT); since the DC basis is
constant and the transform is exactly inverted, phi is per-channel spatial mean removal, which is
how it is computed here (no matrices, any H x W).

Safe normalisation in the alternative view. When a projection is spatially constant (a student
map with a single position, e.g. ResNet stage 4 at 32 px: the projector then attends over one key),
phi(P) is zero up to float rounding and n() divides rounding noise by ~0: F.normalize's gradient
there is of order 1/eps (1e12), which swamps every other term (measured: 2e7 vs 6 for the task loss)
and ruins the student. The official code has the same 0/0 (its DCT round trip leaves the same
rounding residue). The exact gradient through phi of a constant map is zero (mean removal does not
see a constant), so such positions are treated as what they are: n() returns 0 there (F.normalize's
own value for a zero vector) and passes no gradient. A position counts as zero when its
mean-removed norm is at most ``DEGENERATE_RTOL`` times the map's RMS position norm before the
removal; elsewhere the values and gradients are bit-identical to F.normalize.
"""
import torch
import torch.nn.functional as F

# fp32 rounding of a mean removal leaves ~1e-7 of the map's scale; 1e-5 keeps a 100x margin above it
# and is far below any real spatial variation of a feature map
DEGENERATE_RTOL = 1e-5


def remove_dc(x: torch.Tensor) -> torch.Tensor:
    """Drop the direct (zero-frequency) component of each channel of an NCHW map."""
    return x - x.mean(dim=(2, 3), keepdim=True)


def normalize_mean_removed(x: torch.Tensor, ref: torch.Tensor, rtol: float = DEGENERATE_RTOL) -> torch.Tensor:
    """Channel L2 normalisation of ``x = remove_dc(ref)``, with no 0/0 at rounding-level positions.

    Positions whose norm is at most ``rtol`` x the per-sample RMS position norm of ``ref`` give a
    zero vector and no gradient; the others equal ``F.normalize(x, dim=1)`` bit for bit.
    """
    norm = x.norm(2, dim=1, keepdim=True)
    with torch.no_grad():
        scale = ref.detach().pow(2).sum(dim=1, keepdim=True).mean(dim=(2, 3), keepdim=True).sqrt()
        degenerate = norm.detach() <= rtol * scale
    # the same two ops as F.normalize (norm.clamp_min(eps) then divide), so kept positions are unchanged;
    # torch.where sends no gradient into the masked branch, whose values are finite
    n = x / norm.clamp_min(1e-12)
    return torch.where(degenerate, torch.zeros((), dtype=n.dtype, device=n.device), n)


NORMS = ('safe', 'official')


def feature_distance(p: torch.Tensor, t: torch.Tensor, alternative: bool = False, norm: str = 'safe') -> torch.Tensor:
    """Sum of squared differences of channel-normalised maps, divided by the batch size (fp32).

    ``norm='official'`` uses F.normalize in the alternative view too, as the official code does (a
    spatially constant projection then sends a gradient of order 1/eps).
    """
    if p.shape != t.shape:
        raise ValueError(f'projected map {tuple(p.shape)} and teacher map {tuple(t.shape)} differ')
    if norm not in NORMS:
        raise ValueError(f'DFM norm must be one of {NORMS}, got {norm!r}')
    p, t = p.float(), t.float()
    if alternative and norm == 'official':
        pn, tn = F.normalize(remove_dc(p), dim=1), F.normalize(remove_dc(t), dim=1)
    elif alternative:
        pn, tn = normalize_mean_removed(remove_dc(p), p), normalize_mean_removed(remove_dc(t), t)
    else:
        pn, tn = F.normalize(p, dim=1), F.normalize(t, dim=1)
    return (pn - tn).pow(2).sum() / p.shape[0]
