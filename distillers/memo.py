"""One teacher forward per batch for the students of a joint run (``train_kd.py --model A,B,C``).

Each student's task calls its teacher exactly as in a solo run; inside one joint step the first call computes the
teacher's ``forward_features`` and every later one gets them. What follows the features (the head, pooling, ScaleKD's
maps and its pass through the teacher's last stage) stays in each task.
"""
import inspect
from contextlib import contextmanager

import torch


class TeacherMemo:
    """The teacher's ``forward_features`` computed once per batch for all students.

    Installed on the shared teacher model. Inside ``batch()`` (one joint step) the first call runs the teacher and
    every later call with the same input shape and options gets its features: within a step every student's task
    feeds the teacher the one batch, re-normalised and resized alike (the students share one data config and one
    teacher, refused otherwise when built), so no value comparison, and no host sync, is needed. Outside
    ``batch()`` (validation) every call runs the teacher. Everything after the features (the head, pooling,
    ScaleKD's map to NCHW) stays in each task, so each task computes what it computed alone.
    """

    def __init__(self, model: torch.nn.Module):
        self.forward_features = model.forward_features  # the model's own, bound
        self.signature = inspect.signature(self.forward_features)
        self.active, self.key, self.value = False, None, None
        self.runs = self.hits = 0
        model.forward_features = self  # an instance attribute shadows the method for model.forward and the tasks

    @contextmanager
    def batch(self):
        """One joint step: the teacher's features of its batch are computed once."""
        self.active = True
        try:
            yield self
        finally:
            self.active, self.key, self.value = False, None, None

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        # the other arguments with their defaults filled in: forward(x) passes attn_mask=None, a task passes none
        bound = self.signature.bind(x, *args, **kwargs)
        bound.apply_defaults()
        key = (tuple(x.shape), x.dtype, x.device, list(bound.arguments.items())[1:])
        if self.active and key == self.key and not any(isinstance(v, torch.Tensor) for _, v in key[3]):
            self.hits += 1
            return self.value
        self.runs += 1
        value = self.forward_features(x, *args, **kwargs)
        if self.active:
            self.key, self.value = key, value
        return value

    # a task's compiled teacher graph calls the memo eagerly (its state lives outside any graph); the features it
    # computes are compiled once, by ``compile``
    __call__ = torch.compiler.disable(__call__)

    def compile(self, backend: str = 'inductor', mode=None) -> None:
        """``--torchcompile`` of a joint run: the shared teacher's features compiled once (each student's task keeps
        its own compiled trainable module; see ``DistillTask.compile(teacher=False)``)."""
        self.forward_features = torch.compile(self.forward_features, backend=backend, mode=mode)
