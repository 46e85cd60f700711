"""DIST: relation distillation from a stronger teacher (Huang et al., NeurIPS 2022, "Knowledge Distillation from A
Stronger Teacher", Sec. 3).

With Y_s, Y_t = softmax(z / tau) of the student and the teacher, a (B, K) batch of class probabilities:

    inter = tau^2 * (1 - mean_i rho(Y_s[i, :], Y_t[i, :]))     one Pearson correlation per image, across classes
    intra = tau^2 * (1 - mean_k rho(Y_s[:, k], Y_t[:, k]))     one Pearson correlation per class, across the batch
    loss  = alpha * L_cls + beta * inter + gamma * intra

Exact matching (KL) is relaxed to matching relations: rho is invariant to a positive affine change of each row
(inter) or each column (intra) of the probabilities. The intra-class term is computed over the batch each process
sees, as the official code does (no gather across ranks); it needs two images or more per process.
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DistillTask
from .logit import KDTask

# the paper's ImageNet setting (alpha, beta, gamma, tau); the official ImageNet configs weigh a DIST(beta=1,
# gamma=1, tau=1) loss by kd_loss_weight 2 next to the student loss at weight 1
PAPER_IMAGENET = dict(alpha=1.0, beta=2.0, gamma=2.0, tau=1.0)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N, D), (N, D) -> (N,).

    The denominator is ``|a| |b| + eps``, as in the official code: a row with no variance has correlation 0, and
    a row whose norm product is near or below ``eps`` (a confident teacher's class column) is shrunk towards 0.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over images of the correlation of the student's and the teacher's class probabilities, (B, K)."""
    return 1.0 - pearson_rows(p_s, p_t).mean()


def intra_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of the correlation of the student's and the teacher's probabilities across the batch."""
    return inter_class_relation(p_s.t(), p_t.t())


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               tau: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unweighted (inter, intra) DIST terms of two (B, K) logit batches, each times tau^2, in fp32 or wider."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    p_s = F.softmax(student_logits.to(dtype) / tau, dim=1)
    p_t = F.softmax(teacher_logits.to(dtype) / tau, dim=1)
    return tau * tau * inter_class_relation(p_s, p_t), tau * tau * intra_class_relation(p_s, p_t)


class DISTTask(DistillTask):
    """loss = dist_alpha * student loss + dist_beta * inter + dist_gamma * intra (tau = ``kd_temperature``).

    Returns the weighted ``loss``, the student ``output`` and the unweighted ``loss_cls``, ``loss_inter`` and
    ``loss_intra``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, dist_alpha: float = PAPER_IMAGENET['alpha'],
                 dist_beta: float = PAPER_IMAGENET['beta'], dist_gamma: float = PAPER_IMAGENET['gamma'],
                 kd_temperature: float = PAPER_IMAGENET['tau'], **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.trainable_module = student
        self.kd_temperature = kd_temperature
        self.loss_weights = {'loss_cls': dist_alpha, 'loss_inter': dist_beta, 'loss_intra': dist_gamma}

    compile = KDTask.compile  # student and teacher logits only, as KD

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.no_grad(), self.teacher_timer(input):
            teacher_logits = self.teacher(self.teacher_input(input))
        logits = self.trainable_module(input)
        terms = {'loss_cls': self.criterion(logits, target)}
        terms['loss_inter'], terms['loss_intra'] = dist_terms(logits, teacher_logits, self.kd_temperature)
        loss = sum(self.loss_weights[k] * v for k, v in terms.items())
        return {'loss': loss, 'output': logits, **terms}

