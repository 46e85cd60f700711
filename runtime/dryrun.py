"""``train_kd.py --dry-run``: the parameter counts, the first batch's loss balance and the time (and peak CUDA memory)
of two full steps at the run's batch size, after every check before step 0; nothing is written."""
import logging
import time

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
