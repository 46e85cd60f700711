"""Pooled-feature distillation: timm's ``FeatureDistillationTask`` in this project's teacher handling.

    loss = task_loss_weight * L_cls + distill_loss_weight * MSE(proj(f_s), f_t)

f_s, f_t are the student's and the teacher's pooled pre-logits features (``forward_head(pre_logits=True)``);
``proj`` is a Linear from the student's width to the teacher's, created only when they differ. The trainable
module, the checkpoint layout (student in ``state_dict``, the projection in ``task_state``, so export.py writes
the bare student) and the weight resolution are timm's; what this class adds is ``DistillTask``'s teacher
(re-normalised from the student's data config, resized to ``--teacher-img-size``, ``--teacher-mode``, timed).
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.task import FeatureDistillationTask
from timm.task.distillation import FeatureDistillationTrainableModule
from timm.utils import unwrap_model

from runtime.errors import FatalError
from .base import DistillTask


def timm_loss_weights(distill_loss_weight: Optional[float], task_loss_weight: Optional[float]):
    """(task, distill) weights as timm's distillation tasks resolve them: both given: as given; only the distill
    weight: task 1; only the task weight: distill = 1 - task; neither: 1 and 1."""
    if distill_loss_weight is not None:
        return (1.0 if task_loss_weight is None else task_loss_weight), distill_loss_weight
    if task_loss_weight is not None:
        return task_loss_weight, 1.0 - task_loss_weight
    return 1.0, 1.0


def pooled_width(model: nn.Module, role: str) -> int:
    """Width of ``model``'s pooled pre-logits features (timm's rule), or one FatalError saying why it is unknown."""
    m = unwrap_model(model)
    missing = [f for f in ('forward_features', 'forward_head') if not callable(getattr(m, f, None))]
    if missing:
        raise FatalError(f"--distiller feature: the {role} ({type(m).__name__}) has no {' / '.join(missing)}, so its "
                         f"pooled pre-logits features cannot be read; use a timm model with forward_features and "
                         f"forward_head(pre_logits=True), or --distiller kd")
    try:
        return FeatureDistillationTask._detect_feature_dim(m)
    except ValueError:
        raise FatalError(f"--distiller feature: the width of the {role}'s pooled features is unknown "
                         f"({type(m).__name__} has neither head_hidden_size nor num_features); use a timm model "
                         f"that sets num_features, or --distiller kd (logits only)") from None


class FeatureTask(DistillTask):
    """timm's pooled-feature distillation. Returns ``loss``, ``output`` and the unweighted ``loss_cls`` and
    ``loss_feat``.

    Args:
        distill_loss_weight / task_loss_weight: timm's weights (see ``timm_loss_weights``; default 1 and 1).
        **kwargs: DistillTask arguments (criterion, mean/std, teacher_mode, teacher_img_size, ...).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, distill_loss_weight: Optional[float] = None,
                 task_loss_weight: Optional[float] = None, **kwargs):
        super().__init__(student, teacher, **kwargs)
        s_dim, t_dim = pooled_width(student, 'student'), pooled_width(self.teacher.model, 'teacher')
        device = next(student.parameters()).device
        projection = nn.Linear(s_dim, t_dim, device=device) if s_dim != t_dim else None
        self.trainable_module = FeatureDistillationTrainableModule(student, projection)
        self.feature_dims = (s_dim, t_dim)
        w_cls, w_feat = timm_loss_weights(distill_loss_weight, task_loss_weight)
        self.loss_weights = {'loss_cls': w_cls, 'loss_feat': w_feat}

    # checkpoint layout, clipping and compilation: timm's (the projection in task_state; the student is the model)
    get_task_state = FeatureDistillationTask.get_task_state
    load_task_state = FeatureDistillationTask.load_task_state
    get_clip_parameters = FeatureDistillationTask.get_clip_parameters
    compile = FeatureDistillationTask.compile

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The student (validated, checkpointed as ``state_dict``, exported); the projection is not part of it."""
        if module is None and hasattr(self, 'eval_model_ema' if ema else 'eval_model'):
            return getattr(self, 'eval_model_ema' if ema else 'eval_model')
        module = module if module is not None else self.get_trainable_module(ema=ema)
        return None if module is None else unwrap_model(module).student

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits, features = self.trainable_module(input)
        with torch.no_grad(), self.teacher_timer(input):
            teacher_features = self.teacher(self.teacher_input(input), return_features=True)
        terms = {'loss_cls': self.criterion(logits, target),
                 'loss_feat': F.mse_loss(features.float(), teacher_features.float())}
        loss = sum(self.loss_weights[k] * v for k, v in terms.items())
        return {'loss': loss, 'output': logits, **terms}
