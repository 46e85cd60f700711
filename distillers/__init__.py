"""Distillation tasks, built by name: ``build_task('scalekd', student, teacher, **kwargs)``."""
from typing import Optional

import torch.nn as nn

from timm.task import ClassificationTask

from .base import DistillTask, kd_loss
from .dist import DISTTask
from .distill_token import TokenTask
from .feature import FeatureTask
from .logit import KDTask
from .scalekd import ScaleKDTask
from .teacher import TeacherLoadError, create_teacher

# name -> task class; a new distiller is one line here
DISTILLERS = {
    'none': ClassificationTask,
    'kd': KDTask,
    'dist': DISTTask,
    'feature': FeatureTask,
    'token': TokenTask,
    'scalekd': ScaleKDTask,
}

def build_task(name: str, student: nn.Module, teacher: Optional[nn.Module] = None, **kwargs):
    """Create the training task ``name`` around ``student`` (and ``teacher`` for KD tasks)."""
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller '{name}'; choose one of {sorted(DISTILLERS)}")
    cls = DISTILLERS[name]
    if not issubclass(cls, DistillTask):
        kwargs = {k: v for k, v in kwargs.items() if k in ('criterion', 'criterion_kwargs', 'device', 'dtype',
                                                            'verbose')}
        return cls(student, **kwargs)
    if teacher is None:
        raise ValueError(f"distiller '{name}' needs a teacher: pass --teacher NAME")
    return cls(student, teacher, **kwargs)


__all__ = ['DISTILLERS', 'build_task', 'DistillTask', 'KDTask', 'DISTTask', 'FeatureTask', 'TokenTask', 'ScaleKDTask',
           'kd_loss', 'create_teacher', 'TeacherLoadError']
