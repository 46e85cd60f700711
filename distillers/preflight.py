"""Model pre-flight of train_kd.py: the student and the teacher take their input sizes, and a ScaleKD pair
yields the feature grids the projectors need, and timm's feature widths match the models; otherwise one FatalError naming the models and the shapes.

Runs once the models exist and before the task, the loaders or the run folder (``runtime.preflight`` checks
the flags and the data before that).
"""
from contextlib import contextmanager
from typing import Optional, Tuple

import torch
import torch.nn as nn

from distillers import build_task
from distillers.feature import pooled_width
from models.features import resolve_student_taps
from models.tails import TeacherTail
from runtime.errors import FatalError, short
from runtime.distributed import broadcast_module
from runtime.preflight import check_model_input, check_train_inputs  # noqa: F401  (train_kd.py)


def _shape(t) -> str:
    return 'x'.join(str(d) for d in t.shape[1:]) if isinstance(t, torch.Tensor) else type(t).__name__


def check_models(args, student: nn.Module, teacher: Optional[nn.Module], img_size: Tuple[int, int],
                 in_chans: int) -> None:
    """Student at ``img_size`` and teacher at ``--teacher-img-size`` (or the same size) run one dry forward."""
    h, w = img_size
    check_model_input(student, args.model, (in_chans, h, w), 'student',
                      f'Pass the --img-size it takes, or build it for {h} px with --model-kwargs img_size={h}')
    if teacher is not None:
        size = (args.teacher_img_size,) * 2 if args.teacher_img_size else (h, w)
        check_model_input(teacher, args.teacher, (in_chans, *size), 'teacher',
                          'Pass --teacher-img-size N, the size it was built and trained for (the student batch is '
                          'resized to it), or build it for this size with --teacher-kwargs img_size=N')


def check_feature_dims(args, student: nn.Module, teacher: Optional[nn.Module]) -> None:
    """timm's --kd-student-feature-dim / --kd-teacher-feature-dim (--distiller feature) must be the models' pooled
    widths (timm sizes the projection from them; a wrong one fails only inside the first step)."""
    if args.distiller != 'feature' or teacher is None:
        return
    for role, model, name in (('student', student, args.model), ('teacher', teacher, args.teacher)):
        given = getattr(args, f'kd_{role}_feature_dim', None)
        if given is None:
            continue
        width = pooled_width(model, role)
        if given != width:
            raise FatalError(f"--kd-{role}-feature-dim {given} does not match the {role} {name}, whose pooled "
                             f"pre-logits features are {width} wide; pass --kd-{role}-feature-dim {width} or drop the "
                             f"flag (the width is read from the model)")


def describe_scalekd_pair(args, student: nn.Module, teacher: nn.Module, img_size: Tuple[int, int]) -> str:
    """What the student's taps and the teacher's tail give at these sizes (each part that can be computed)."""
    parts = []
    h, w = img_size
    try:
        taps = resolve_student_taps(student, args.scalekd_student_s3, args.scalekd_student_s4)
        idx = [taps.s3] if taps.s4 == 'final' else sorted({taps.s3, taps.s4})
        was = student.training
        student.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                final, inter = student.forward_intermediates(torch.zeros(1, 3, h, w), indices=idx, output_fmt='NCHW')
        finally:
            student.train(was)
        shown = ', '.join(f'tap {i}: {_shape(t)}' for i, t in zip(idx, inter if isinstance(inter, list) else []))
        parts.append(f'student {args.model} at {h}x{w}: {shown or "no intermediate maps"}, final features '
                     f'{_shape(final)} (stage-4 needs CxHxW, or HxW patch tokens)')
    except Exception as e:
        parts.append(f'student {args.model}: its stage taps cannot be read ({short(e)})')
    size = (args.teacher_img_size,) * 2 if args.teacher_img_size else (h, w)
    try:
        tail = TeacherTail(teacher, size, num_blocks=args.scalekd_tail_blocks)
        parts.append(f'teacher {args.teacher} at {size[0]}x{size[1]}: last stage {tail.in_chs}x{tail.in_grid[0]}x'
                     f'{tail.in_grid[1]} -> {tail.out_chs}x{tail.out_grid[0]}x{tail.out_grid[1]}')
    except Exception as e:
        parts.append(f'teacher {args.teacher}: no last stage ({short(e)})')
    return '; '.join(parts)


@contextmanager
def task_build_errors(args, student: nn.Module, teacher: Optional[nn.Module], img_size: Tuple[int, int]):
    """An error while a distillation task is built (projectors, taps, tail) becomes one FatalError with the pair."""
    try:
        yield
    except FatalError:
        raise
    except Exception as e:
        if args.distiller != 'scalekd' or teacher is None:
            raise FatalError(f'--distiller {args.distiller} cannot be set up for student {args.model} and teacher '
                             f'{args.teacher} ({short(e)})') from None
        grids = any(s in str(e) for s in ('fold', 'ndim', 'feature shape', 'feature_info'))
        fix = ('ScaleKD folds the student\'s stage-3 and stage-4 features and the teacher\'s last stage onto 2-D '
               'grids: use a CNN, ViT/Mixer or Swin student (pooling-token models such as PiT or CrossViT have '
               'none), pick other taps with --scalekd-student-s3/-s4, or use --distiller kd') if grids else \
            ('Correct the setting the error names (--scalekd-heads-s3/-s4 must divide the projector width, '
             '--scalekd-student-s3/-s4 index the student\'s feature levels, --scalekd-tail-blocks is below the '
             'teacher\'s depth), or use --distiller kd')
        raise FatalError(
            f'--distiller scalekd cannot pair student {args.model} with teacher {args.teacher}: {short(e).rstrip(".")}. '
            f'{describe_scalekd_pair(args, student, teacher, img_size)}. {fix}') from None


def settle_models(args, student: nn.Module, teacher: Optional[nn.Module], img_size: Tuple[int, int], in_chans: int,
                  device=None) -> None:
    """A teacher without a checkpoint takes rank 0's weights on every rank (its random initialisation, or the hub
    weights, then agree); then each model must take its input size (``check_models``)."""
    if teacher is not None and args.distributed and not args.teacher_checkpoint:
        broadcast_module(teacher, device)
    check_models(args, student, teacher, img_size, in_chans)
    check_feature_dims(args, student, teacher)


def checked_build_task(args, size: Tuple[int, int], name: str, student: nn.Module, teacher: Optional[nn.Module], /,
                       **kwargs):
    """``build_task(name, student, teacher, **kwargs)`` (the student at ``size``); a pair it cannot set up stops
    with one message."""
    with task_build_errors(args, student, teacher, size):
        return build_task(name, student, teacher, **kwargs)
