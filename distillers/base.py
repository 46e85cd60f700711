"""Shared teacher handling for the distillation tasks.

The teacher is wrapped in timm's ``DistillationTeacher`` (re-normalisation from its own
pretrained_cfg), frozen, kept out of DDP and out of the EMA, and held in eval mode whatever
``task.train()`` is called with, unless ``teacher_mode='train'`` asks for the official code's
behaviour (teacher drop-path active during distillation).
"""
import time
from contextlib import contextmanager
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.task import DistillationTeacher, TrainingTask, resolve_classification_loss
from timm.utils import unwrap_model

TEACHER_MODES = ('eval', 'train')


class DistillTask(TrainingTask):
    """Base for tasks with a frozen teacher; subclasses set ``trainable_module`` and ``forward``.

    Args:
        student: the timm student model (trained).
        teacher: a timm model or DistillationTeacher (frozen here).
        criterion / criterion_kwargs: the student's own loss (timm's create_classification_loss).
        mean / std: the student's resolved data-config normalisation (the teacher input is
            re-normalised from these, not from the student's pretrained_cfg).
        teacher_mode: 'eval' (default) or 'train' (official code: teacher drop-path active).
        teacher_img_size: resize the teacher's input to this (H, W) when it differs.
    """

    def __init__(
            self,
            student: nn.Module,
            teacher: nn.Module,
            criterion: Optional[nn.Module] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            teacher_mode: str = 'eval',
            teacher_img_size: Optional[Tuple[int, int]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f'teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}')
        if not isinstance(teacher, DistillationTeacher):
            teacher = DistillationTeacher(teacher, device=self.device)
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.teacher_mode = teacher_mode
        self.teacher_img_size = tuple(teacher_img_size) if teacher_img_size else None
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        cfg = unwrap_model(student).pretrained_cfg
        mean = mean if mean is not None else cfg.get('mean', (0.485, 0.456, 0.406))
        std = std if std is not None else cfg.get('std', (0.229, 0.224, 0.225))
        self.register_buffer('student_mean', torch.tensor(mean, device=self.device).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('student_std', torch.tensor(std, device=self.device).view(1, -1, 1, 1), persistent=False)
        # decided once here: comparing the buffers in every step would sync the host with the device
        self.renormalize = not (torch.allclose(self.student_mean.cpu(), teacher.mean_kd.cpu().float())
                                and torch.allclose(self.student_std.cpu(), teacher.std_kd.cpu().float()))

    @contextmanager
    def teacher_timer(self, x: torch.Tensor):
        """Time the teacher pass: CUDA events on GPU (read at log time, no sync here), a clock on CPU."""
        pending = self.__dict__.setdefault('_teacher_times', [])
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            pending.append((start, end))
        else:
            t = time.perf_counter()
            yield
            pending.append((time.perf_counter() - t) * 1000.0)

    def pop_teacher_ms(self) -> Optional[float]:
        """Mean teacher milliseconds per step since the last call (synchronises on GPU events)."""
        pending = self.__dict__.get('_teacher_times') or []
        self._teacher_times = []
        if not pending:
            return None
        ms = [p if isinstance(p, float) else (p[1].synchronize(), p[0].elapsed_time(p[1]))[1] for p in pending]
        return sum(ms) / len(ms)

    def train(self, mode: bool = True) -> 'DistillTask':
        super().train(mode)
        self.teacher.train(mode and self.teacher_mode == 'train')
        return self

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's (augmented, mixed) batch as the teacher expects it."""
        if self.renormalize:
            x = (x * self.student_std + self.student_mean - self.teacher.mean_kd) / self.teacher.std_kd
        if self.teacher_img_size is not None and tuple(x.shape[-2:]) != self.teacher_img_size:
            x = F.interpolate(x, size=self.teacher_img_size, mode='bicubic', align_corners=False)
        return x

    def hold_teacher(self, dtype: torch.dtype) -> 'DistillTask':
        """Hold the frozen teacher weights in ``dtype`` (bf16 autocast): cast once here instead of by autocast in
        every call. The re-normalisation buffers stay fp32; the teacher tail (TPP) shares these weights."""
        self.teacher.model.to(dtype=dtype)
        return self

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> 'DistillTask':
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.teacher.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self


class TeacherOnStudentInput(nn.Module):
    """The task's teacher as a model of the student's batch (re-normalised, resized): evaluates the teacher
    on the data the student sees (train_kd.py --teacher-min-top1, agreement at validation)."""

    def __init__(self, task: DistillTask):
        super().__init__()
        self.t = task.teacher
        self._task = [task]  # not a submodule
        self.train(task.teacher.training)  # a caller restoring this wrapper's mode restores the teacher's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.t(self._task[0].teacher_input(x))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft-target cross-entropy T^2 * mean_b(-sum_k p_t log p_s), p = softmax(z / T), in fp32.

    This is the official ScaleKD code's value (KL divergence plus the teacher's entropy; same gradient), ScaleKD's
    ``loss_kd``; ``--distiller kd`` uses timm's KL form, ``kl_kd_loss``.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    p_t = F.softmax(teacher_logits.float() / t, dim=-1)
    return -(p_t * log_p_s).sum(-1).mean() * (t * t)


def kl_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """timm's logit-distillation loss: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), batch mean, in fp32 or wider
    (fp64 stays fp64). It is ``kd_loss`` less T^2 times the teacher's entropy: the same gradient, a smaller value."""
    t = temperature
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * (t * t)
