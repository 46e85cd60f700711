"""``train_kd.py --dry-run``: the parameter counts, the first batch's loss balance and the time (and peak CUDA memory)
of two full steps at the run's batch size, after every check before step 0, and what the whole schedule will cost
(``projected_cost``: wall time, GPU-hours, the teacher's share of a step); nothing is written."""
import logging
import math
import os
import time
from contextlib import suppress
from typing import Any, Dict, Optional, Tuple

import torch
from timm import utils

from .loaders import device_batch

_logger = logging.getLogger('train')


def dry_run(args, task, optimizer, loader, mixup_fn, amp_autocast, device, balance=None, steps=2):
    """``--dry-run``: trained / frozen parameter counts, the loss balance of the first batch, and the time (and peak
    CUDA memory) of ``steps`` full steps (forward, backward, optimizer update) at the run's batch size; writes nothing."""
    primary = utils.is_primary(args)
    n_student = sum(p.numel() for p in task.get_eval_model().parameters())
    n_trained = sum(p.numel() for p in task.get_trainable_module().parameters() if p.requires_grad)
    n_teacher = sum(p.numel() for p in task.teacher.parameters()) if getattr(task, 'teacher', None) is not None else 0
    input, target = device_batch(*next(iter(loader)), args, device, mixup_fn)
    if balance is not None and args.loss_balance_factor > 0:  # distillers.balance.log_loss_balance, no file
        balance(args, task, input, target, amp_autocast, None)
    task.train()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        if i == steps - 1 and hasattr(task, 'pop_teacher_ms'):
            task.pop_teacher_ms()  # the teacher's time of the last (warm) step only
        start = time.perf_counter()
        with amp_autocast():
            out = task(input, target)
        out['loss'].backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if primary:
        mem = f', peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB' \
            if device.type == 'cuda' else ''
        terms = '  '.join(f'{k} {v.item():.4g}' for k, v in out.items() if k.startswith('loss'))
        _logger.info(f'Dry run: student {n_student / 1e6:.2f} M params, {n_trained / 1e6:.2f} M trained (with the '
                     f'distiller\'s modules), teacher {n_teacher / 1e6:.2f} M frozen')
        _logger.info(f'Dry run: batch {input.shape[0]} x {tuple(input.shape[1:])} per process; step times '
                     f'{", ".join(f"{t:.3f}" for t in times)} s (the first includes warm-up{" and compilation" if args.torchcompile else ""}); '
                     f'{input.shape[0] * args.world_size / times[-1]:.1f} img/s{mem}; {len(loader)} steps per epoch')
        _logger.info(f'Dry run: losses at the last step: {terms}')
    teacher_ms = task.pop_teacher_ms() if hasattr(task, 'pop_teacher_ms') else None
    val_s = _val_step_s(task, input, amp_autocast, device)  # every rank times it (the same work on each)
    if teacher_ms is not None and not getattr(args, 'teacher_features_only', False):
        val_s += teacher_ms / 1000  # validation runs the teacher too (agreement, KL): its frozen eval forward
    if primary:
        epochs, val_passes = _schedule(args, optimizer, len(loader))
        batches, what = _val_batches(args)
        _, block = projected_cost(
            times[-1], teacher_ms / 1000 if teacher_ms is not None else None, len(loader), epochs, batches,
            val_s * (args.validation_batch_size or args.batch_size) / input.shape[0], args.world_size,
            val_passes=val_passes, device=device.type, val_what=what)
        _logger.info(block)
        _logger.info('Dry run finished: every check passed; nothing was written.')
    return 0


class _OneBatch:
    """A loader of one prepared batch (its length: the real loader's, for the steps-per-epoch line)."""

    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __iter__(self):
        return iter([self.batch])

    def __len__(self):
        return self.length


def dry_run_students(args, runs, loader, mixup_fn, amp_autocast, device, memo=None, balance=None, steps=2):
    """``--dry-run`` of the run's students. One student: ``dry_run``. Several: each student's own dry run on one
    batch, its teacher running in every step as in its solo run (its own step time), then ``steps`` whole joint steps
    (the teacher once, then every student's forward, backward and update) timed together: the img/s a joint run
    sees. Writes nothing."""
    if len(runs) == 1:
        r = runs[0]
        return dry_run(r.args, r.task, r.optimizer, loader, mixup_fn, amp_autocast, device, balance=balance,
                       steps=steps)
    primary = utils.is_primary(args)
    batch = _OneBatch(device_batch(*next(iter(loader)), args, device, mixup_fn), len(loader))
    for r in runs:
        if primary:
            _logger.info(f'Student {r.name} (alone, its teacher in every step):')
        dry_run(r.args, r.task, r.optimizer, batch, None, amp_autocast, device, balance=balance, steps=steps)
    input, target = batch.batch
    runs_before = memo.runs if memo is not None else 0
    times = []
    for i in range(steps):
        if i == steps - 1:  # the teacher's time of the last (warm) joint step only
            for r in runs:
                r.task.pop_teacher_ms() if hasattr(r.task, 'pop_teacher_ms') else None
        start = time.perf_counter()
        with memo.batch() if memo is not None else suppress():
            for r in runs:
                with amp_autocast():
                    out = r.task(input, target)
                out['loss'].backward()
                r.optimizer.step()
                r.optimizer.zero_grad()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    if primary:
        ran = f'; the teacher ran {memo.runs - runs_before} times in {steps} joint steps' if memo is not None else ''
        _logger.info(f'Joint dry run: {len(runs)} students, one joint step (the teacher once, then every student) '
                     f'{", ".join(f"{t:.3f}" for t in times)} s (the first includes warm-up); '
                     f'{input.shape[0] * args.world_size / times[-1]:.1f} img/s per student{ran}')
    teacher_ms = [r.task.pop_teacher_ms() for r in runs if hasattr(r.task, 'pop_teacher_ms')]
    teacher_s = sum(t for t in teacher_ms if t is not None) / 1000 if any(t is not None for t in teacher_ms) else None
    val_s = sum(_val_step_s(r.task, input, amp_autocast, device) for r in runs) + (teacher_s or 0.)
    if primary:  # the whole joint schedule: every student's step and validation, the teacher once per batch
        epochs, val_passes = _schedule(args, runs[0].optimizer, len(loader))
        batches, what = _val_batches(args)
        _, block = projected_cost(
            times[-1], teacher_s, len(loader), epochs, batches,
            val_s * (args.validation_batch_size or args.batch_size) / input.shape[0], args.world_size,
            val_passes=val_passes, device=device.type, val_what=what)
        _logger.info('Joint run: ' + block)
        _logger.info('Dry run finished: every check passed; nothing was written.')
    return 0


def _schedule(args, optimizer, batches_per_epoch: int) -> Tuple[int, int]:
    """(epochs timm's scheduler runs, epochs validated): the numbers train_kd.py's loop uses."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    groups = [dict(g) for g in optimizer.param_groups]
    updates = (batches_per_epoch + args.grad_accum_steps - 1) // args.grad_accum_steps
    _, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates)
    for g, saved in zip(optimizer.param_groups, groups):  # the scheduler sets the warm-up lr: undo
        g.clear()
        g.update(saved)
    interval = max(1, getattr(args, 'val_interval', 1) or 1)
    return epochs, sum(1 for e in range(epochs) if (e + 1) % interval == 0 or e + 1 == epochs)


def _val_batches(args) -> Tuple[Optional[int], str]:
    """Validation batches per process and per pass: from the validation folder's image count (an ImageFolder), or
    --val-num-samples; 0 without a validation split, None when neither says (another dataset without it)."""
    per_step = (args.validation_batch_size or args.batch_size) * args.world_size
    if not args.val_split:
        return 0, 'no validation split'
    if args.val_num_samples:
        return math.ceil(args.val_num_samples / per_step), f'{args.val_num_samples} images (--val-num-samples)'
    if args.dataset or not args.val_split:
        return None, ''
    from timm.data.readers.img_extensions import get_img_extensions
    from .splits import resolve_split, scan_split
    folder = resolve_split(args.data_dir, args.val_split)
    if not folder:
        return None, ''
    n = sum(scan_split(folder, get_img_extensions(as_set=True))[0].values())
    return math.ceil(n / per_step), f'{n} images in {os.path.basename(folder)}/'


@torch.no_grad()
def _val_step_s(task, input, amp_autocast, device) -> float:
    """Seconds of one validation step on ``input``: the student and its EMA (when kept) in eval mode; the teacher's
    forward is added by the caller from the training step (the same frozen eval forward)."""
    models = [task.get_eval_model()] + ([task.get_eval_model(ema=True)] if task.has_ema() else [])
    was = [m.training for m in models]
    for m in models:
        m.eval()
    times = []
    for _ in range(2):  # the second: warm
        start = time.perf_counter()
        with amp_autocast():
            for m in models:
                m(input)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    for m, w in zip(models, was):
        m.train(w)
    return times[-1]


def _hours(s: float) -> str:
    return f'{s / 3600:.2f} h ({int(s // 3600)} h {int(s % 3600 // 60):02d} min)' if s >= 60 else f'{s:.1f} s'


def projected_cost(step_s: float, teacher_s: Optional[float], steps_per_epoch: int, epochs: int,
                   val_batches: Optional[int], val_step_s: Optional[float], world_size: int,
                   val_passes: Optional[int] = None, device: str = 'cuda', val_what: str = '',
                   ) -> Tuple[Dict[str, Any], str]:
    """What the whole schedule costs, from one step's time: ``steps_per_epoch`` (batches per process) x ``epochs``
    x ``step_s`` of training, plus ``val_passes`` (default: every epoch) x ``val_batches`` x ``val_step_s`` of
    validation (the teacher's forward included in ``val_step_s``; left out when ``val_batches`` is None), run on
    ``world_size`` processes in parallel: wall time, device-hours (wall x world size) and ``teacher_s`` / ``step_s``.
    Returns (the numbers, the log block)."""
    val_passes = epochs if val_passes is None else val_passes
    train_s = step_s * steps_per_epoch * epochs
    val_s = val_step_s * val_batches * val_passes if val_batches is not None and val_step_s is not None else None
    wall_s = train_s + (val_s or 0.0)
    share = teacher_s / step_s if teacher_s is not None and step_s > 0 else None
    unit = 'GPU' if device == 'cuda' else f'{device.upper()}-process'
    numbers = dict(step_s=step_s, teacher_s=teacher_s, teacher_share=share, steps_per_epoch=steps_per_epoch,
                   epochs=epochs, train_s=train_s, val_batches=val_batches, val_step_s=val_step_s,
                   val_passes=val_passes, val_s=val_s, wall_s=wall_s, world_size=world_size,
                   device_hours=wall_s * world_size / 3600)
    lines = [f'Projected cost of the whole schedule (from epoch 0, {world_size} process'
             f'{"es" if world_size > 1 else ""}, {device}, at the timed step; data loading not included):',
             f'  train: {epochs} epochs x {steps_per_epoch} steps x {step_s:.3f} s = {_hours(train_s)}']
    if val_s is not None:
        lines.append(f'  validation: {val_passes} passes x {val_batches} batches x {val_step_s:.3f} s = '
                     f'{_hours(val_s)}' + (f' ({val_what})' if val_what else ''))
    else:
        lines.append('  validation: not included (the number of validation images is unknown: pass '
                     '--val-num-samples)')
    lines.append(f'  wall time {_hours(wall_s)}; {wall_s * world_size / 3600:.2f} {unit}-hours '
                 f'(x {world_size})')
    if share is not None:
        lines.append(f'  teacher: {1000 * teacher_s:.1f} ms of the {1000 * step_s:.1f} ms step ({100 * share:.1f}%)')
    return numbers, '\n'.join(lines)
