"""Baselines: no distillation (timm's ClassificationTask) and vanilla logit KD."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from .base import DistillTask, kl_kd_loss


class KDTask(DistillTask):
    """loss = task_weight * student loss + kd_weight * T^2 * KL(teacher || student), timm's
    ``LogitDistillationTask`` loss; task_weight defaults to 1 - kd_weight. (ScaleKD's ``loss_kd`` is the official
    code's soft-target cross-entropy, ``kd_loss``: the same gradient, a value larger by the teacher's entropy.)

    Returns the weighted ``loss``, the student ``output`` and the unweighted ``loss_cls`` and
    ``loss_kd``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, kd_weight: float = 0.5,
                 kd_temperature: float = 1.0, task_weight: Optional[float] = None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.trainable_module = student
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.loss_weights = {'loss_cls': 1.0 - kd_weight if task_weight is None else task_weight, 'loss_kd': kd_weight}

    def compile(self, backend: str = 'inductor', mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.eval_model = self.trainable_module
        self.teacher.compile(backend=backend, mode=mode, compile_model=True, **compile_kwargs)
        return self.trainable_module

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.no_grad(), self.teacher_timer(input):
            teacher_logits = self.teacher(self.teacher_input(input))
        logits = self.trainable_module(input)
        loss_cls = self.criterion(logits, target)
        loss_kd = kl_kd_loss(logits, teacher_logits, self.kd_temperature)
        loss = self.loss_weights['loss_cls'] * loss_cls + self.loss_weights['loss_kd'] * loss_kd
        return {'loss': loss, 'output': logits, 'loss_cls': loss_cls, 'loss_kd': loss_kd}
