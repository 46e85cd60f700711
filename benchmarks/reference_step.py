"""A reference ScaleKD step that follows the released algorithm literally (benchmarks only).

It differs from ``ScaleKDTask.forward`` only in *how* things are computed, never in *what*:

* the alternative (DC-removed) view is computed as the released code does it, with DCT-II
  matrices (un-normalised, ``norm=None`` convention) rebuilt on every call: DCT along W then along
  H, zero the (0, 0) coefficient, inverse DCT, instead of subtracting the per-channel mean;
* the teacher's last stage runs three separate times: once without gradients inside the teacher
  forward (for the target map T4) and then once per view with gradients (not batched);
* everything runs in fp32 (no autocast), as the released configs do.

It reuses the modules of an existing ``ScaleKDTask`` (student, projectors, teacher, tail), so on
the same inputs it computes the same losses and the same gradients; tests/test_benchmark.py checks
that, and benchmarks/step_breakdown.py times it against the optimised step.
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F

from timm.utils import unwrap_model

from models.features import forward_student, forward_teacher

VIEWS = ('a', 'b')


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Un-normalised DCT-II as an (n, n) matrix: X_k = 2 * sum_i x_i cos(pi * k * (2i + 1) / (2n))."""
    k = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(0)
    return (2.0 * torch.cos(math.pi * k * (2 * i + 1) / (2 * n))).to(dtype)


def idct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Exact inverse of ``dct_matrix`` (DCT-III / 2n): x_i = (X_0 + 2 sum_{k>0} X_k cos(...)) / (2n)."""
    k = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(0)
    i = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(1)
    basis = torch.cos(math.pi * k * (2 * i + 1) / (2 * n))
    weight = torch.full((1, n), 2.0, device=device, dtype=torch.float64)
    weight[0, 0] = 1.0
    return (basis * weight / (2 * n)).to(dtype)


def dct_remove_dc(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = iDCT2(M * DCT2(x)) with M zeroing only the (0, 0) coefficient, per channel of NCHW.

    The matrices are rebuilt here on every call, as the released code does.
    """
    H, W = x.shape[-2:]
    dh, dw = dct_matrix(H, x.device, x.dtype), dct_matrix(W, x.device, x.dtype)
    ih, iw = idct_matrix(H, x.device, x.dtype), idct_matrix(W, x.device, x.dtype)
    coeff = dh @ (x @ dw.t())  # along W, then along H
    mask = torch.ones(H, W, device=x.device, dtype=x.dtype)
    mask[0, 0] = 0
    coeff = coeff * mask
    return ih @ (coeff @ iw.t())


def reference_distance(p: torch.Tensor, t: torch.Tensor, alternative: bool = False) -> torch.Tensor:
    """sum_{b,c,h,w} (n(P) - n(T))^2 / B with n() L2 normalisation over channels; DCT view if asked."""
    if alternative:
        p, t = dct_remove_dc(p), dct_remove_dc(t)
    p = F.normalize(p, dim=1)
    t = F.normalize(t, dim=1)
    return F.mse_loss(p, t, reduction='sum') / p.shape[0]


def reference_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_b(-sum_k softmax(z_t / T) log softmax(z_s / T))."""
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    return (-(p_t * log_p_s).sum(dim=1)).mean() * temperature ** 2


def reference_forward(task, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One ScaleKD forward of ``task`` (a ScaleKDTask), computed the released way, in fp32.

    Returns the same keys as ``ScaleKDTask.forward`` ('output', every 'loss_*' term and 'loss').
    """
    module = unwrap_model(task.trainable_module)
    student, caps, taps = module.student, module.caps, module.taps
    tail = task.tail
    input = input.float()

    # teacher: one full no-grad forward, which runs the last stage once (T4, logits)
    with torch.no_grad():
        teacher_logits, t4 = forward_teacher(task.teacher.model, task.teacher_input(input), tail.out_grid)

    logits, s3, s4 = forward_student(student, input, taps)
    out = {'output': logits}
    out['loss_cls'] = task.criterion(logits, target)
    out['loss_kd'] = reference_kd(logits, teacher_logits, task.kd_temperature)
    for i, (v, suffix) in enumerate(zip(VIEWS, ('', '_alt'))):
        if f's3_{v}' not in caps:
            continue
        cap3 = caps[f's3_{v}']
        r3 = tail(cap3.to_map(cap3(s3)))  # one separate pass through the teacher's last stage per view
        if task.alpha['s3'][i]:
            out[f'loss_s3{suffix}'] = reference_distance(r3, t4, alternative=i == 1)
        if f's4_{v}' in caps:
            cap4 = caps[f's4_{v}']
            p4 = cap4.to_map(cap4(s4, queries=r3))
            if task.alpha['s4'][i]:
                out[f'loss_s4{suffix}'] = reference_distance(p4, t4, alternative=i == 1)
    loss = 0.
    for k, w in task.loss_weights.items():
        loss = loss + w * out[k]
    out['loss'] = loss
    return out
