"""DeiT's distillation token (Touvron et al., ICML 2021, "Training data-efficient image transformers & distillation
through attention"): timm's ``TokenDistillationTask`` in this project's teacher handling.

The student is a ViT with a distillation token and head (timm's ``VisionTransformerDistilled``, e.g.
``deit_base_distilled_patch16_224``). In training it returns (class-head logits, distillation-head logits):

    loss = task_loss_weight * L_cls(class head, y) + distill_loss_weight * L_token(distillation head, teacher)
    L_token = soft: T^2 * KL(softmax(z_t / T) || softmax(z_d / T)) (batch mean);  hard: CE(z_d, argmax z_t)

The loss is timm's (weights resolved as in timm, see ``distillers.feature.timm_loss_weights``). In eval mode the
model returns the mean of its two heads, so validation, checkpoints and export.py see a plain timm model: the
exported file loads strictly into ``timm.create_model(<the distilled model name>)``.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.utils import unwrap_model

from runtime.errors import FatalError
from .base import DistillTask, kl_kd_loss
from .feature import timm_loss_weights
from .logit import KDTask

DISTILL_TYPES = ('soft', 'hard')


def token_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, distill_type: str = 'soft',
               temperature: float = 1.0) -> torch.Tensor:
    """The distillation head's loss, as timm's TokenDistillationTask computes it (in fp32 or wider here)."""
    if distill_type == 'hard':
        return F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
    return kl_kd_loss(dist_logits, teacher_logits, temperature)


def check_token_student(student: nn.Module) -> None:
    """A student without a distillation token stops with one message (before anything is trained)."""
    m = unwrap_model(student)
    if not callable(getattr(m, 'set_distilled_training', None)):
        raise FatalError(f"--distiller token needs a student with a distillation token and head (timm's "
                         f"VisionTransformerDistilled); {type(m).__name__} has none. Pass a distilled DeiT as --model "
                         f"(e.g. deit_tiny_distilled_patch16_224, deit_small_distilled_patch16_224, "
                         f"deit_base_distilled_patch16_224), build a DeiT with one (--model deit_base_patch16_224 "
                         f"--model-kwargs distilled=True), or use --distiller kd for this student")


class TokenTask(DistillTask):
    """DeiT token distillation. Returns ``loss``, ``output`` (class head) and the unweighted ``loss_cls`` and
    ``loss_token``.

    Args:
        distill_type: 'soft' (KL at ``kd_temperature``) or 'hard' (CE with the teacher's top-1).
        distill_loss_weight / task_loss_weight: timm's weights (default 1 and 1).
        **kwargs: DistillTask arguments (criterion, mean/std, teacher_mode, teacher_img_size, ...).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, distill_type: str = 'soft',
                 kd_temperature: float = 1.0, distill_loss_weight: Optional[float] = None,
                 task_loss_weight: Optional[float] = None, **kwargs):
        check_token_student(student)
        if distill_type not in DISTILL_TYPES:
            raise ValueError(f'distill_type must be one of {DISTILL_TYPES}, got {distill_type!r}')
        super().__init__(student, teacher, **kwargs)
        unwrap_model(student).set_distilled_training(True)
        self.trainable_module = student
        self.distill_type = distill_type
        self.kd_temperature = kd_temperature
        w_cls, w_token = timm_loss_weights(distill_loss_weight, task_loss_weight)
        self.loss_weights = {'loss_cls': w_cls, 'loss_token': w_token}

    compile = KDTask.compile  # student and teacher logits only, as KD

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.no_grad(), self.teacher_timer(input):
            teacher_logits = self.teacher(self.teacher_input(input))
        logits, dist_logits = self.trainable_module(input)
        terms = {'loss_cls': self.criterion(logits, target),
                 'loss_token': token_loss(dist_logits, teacher_logits, self.distill_type, self.kd_temperature)}
        loss = sum(self.loss_weights[k] * v for k, v in terms.items())
        return {'loss': loss, 'output': logits, **terms}
