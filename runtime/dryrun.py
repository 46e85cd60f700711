"""``train_kd.py --dry-run``: the parameter counts, the first batch's loss balance and the time (and peak CUDA memory)
of two full steps at the run's batch size, after every check before step 0; nothing is written."""
import logging
import time
from contextlib import suppress

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
    for _ in range(steps):
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
    for _ in range(steps):
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
        _logger.info('Dry run finished: every check passed; nothing was written.')
    return 0
