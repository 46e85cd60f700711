"""Train-loop bookkeeping: loss-term sums over ranks, step timing and ETA, the console line and TensorBoard."""
import logging
import os
import time
from collections import OrderedDict
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from timm.utils import AverageMeter

_logger = logging.getLogger('train')


class TermSums:
    """Per-sample sums of every loss term on this rank; means and raw sums reduced over all ranks.

    ``saved`` (a recovery checkpoint's ``epoch_sums``, already reduced over ranks) goes to rank 0,
    so the epoch's means count the batches trained before the stop exactly once.
    """

    def __init__(self, device, distributed: bool, saved: Optional[Dict[str, Any]] = None, primary: bool = True):
        self.device = device
        self.distributed = distributed
        self.sums = OrderedDict()  # loss term -> (sum over samples) on this rank
        self.count = 0
        if saved:
            self.sums = OrderedDict((k, v.to(device) if primary else torch.zeros_like(v, device=device))
                                    for k, v in saved['terms'].items())
            self.count = saved['count'] if primary else 0

    def add(self, terms: Dict[str, torch.Tensor], n: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.) + v.float() * n
        self.count += n

    def state(self) -> Dict[str, Any]:
        """Sums of each loss term and the sample count over all ranks (for a recovery checkpoint)."""
        keys = list(self.sums)
        t = torch.stack([self.sums[k].float() for k in keys] + [torch.tensor(float(self.count), device=self.device)])
        if self.distributed:
            dist.all_reduce(t)
        t = t.cpu()
        return {'terms': OrderedDict((k, t[i].clone()) for i, k in enumerate(keys)), 'count': int(t[-1].item())}

    def means(self) -> Dict[str, float]:
        """Mean of each loss term over the samples of all ranks (one host sync)."""
        if not self.sums:
            return OrderedDict()
        keys = list(self.sums)
        t = torch.stack([self.sums[k].float() for k in keys])
        t = torch.cat([t, t.new_tensor([float(self.count)])])
        if self.distributed:
            dist.all_reduce(t)
        t = t.cpu()
        return OrderedDict((k, (t[i] / max(t[-1], 1)).item()) for i, k in enumerate(keys))


class StepTimer:
    """Data wait, update time and images/s of the epoch; seconds per update over the run for the ETA."""

    def __init__(self, done_updates: int, total_updates: int, world_size: int = 1):
        self.done = done_updates
        self.total = total_updates
        self.world_size = world_size
        self.run = AverageMeter()  # seconds per update, whole run
        self.grad_norm = None  # the last update's gradient norm (a device tensor, read only at log time)
        self.start_epoch()

    def start_epoch(self) -> None:
        self.data, self.update, self.images_per_s = AverageMeter(), AverageMeter(), AverageMeter()
        self.samples = 0
        self.restart()

    def restart(self) -> None:
        """The clocks start now (at the epoch start, after a batch skipped on resume)."""
        self.data_start = self.update_start = time.time()

    def data_ready(self) -> None:
        self.data.update(time.time() - self.data_start)

    def next_batch(self) -> None:
        self.data_start = time.time()

    def update_done(self) -> None:
        now = time.time()
        self.update.update(now - self.update_start)
        self.done += 1
        self.run.update(now - self.update_start)
        self.images_per_s.update(self.samples * self.world_size / max(now - self.update_start, 1e-9))
        self.update_start = now
        self.samples = 0

    def eta(self, left_in_epoch: int):
        fmt = lambda s: time.strftime('%H:%M:%S', time.gmtime(max(0, s)))
        return fmt(left_in_epoch * self.run.avg), fmt((self.total - self.done) * self.run.avg)


def log_train_step(epoch: int, update_idx: int, updates_per_epoch: int, step: int, terms: Dict[str, float],
                   optimizer, timer: StepTimer, writer=None, teacher_ms: Optional[float] = None,
                   accum_steps: int = 1, primary: bool = True) -> None:
    """The console line (every loss term, time, img/s, lr, data wait, teacher ms, ETA) and its TensorBoard scalars."""
    if not primary:
        return
    lrl = [pg['lr'] for pg in optimizer.param_groups]
    lr = sum(lrl) / len(lrl)
    eta_epoch, eta_run = timer.eta(updates_per_epoch - update_idx - 1)
    terms_str = '  '.join(f'{k}: {v:.4f}' for k, v in terms.items())
    data, update, ips = timer.data, timer.update, timer.images_per_s
    grad_norm = float(timer.grad_norm) if timer.grad_norm is not None else None
    wait = 100 * data.avg / max(update.avg, 1e-9)
    # the rest of an update after data and teacher: student, projectors, losses, backward, step
    step_ms = 1000 * (update.avg - data.avg * accum_steps)
    split = f'Teacher: {teacher_ms:.1f} ms  Student+loss: {step_ms - teacher_ms * accum_steps:.1f} ms  ' \
        if teacher_ms is not None else ''
    _logger.info(
        f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
        f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  {terms_str}  '
        f'Time: {update.val:.3f}s, {ips.val:>7.2f}/s ({update.avg:.3f}s, '
        f'{ips.avg:>7.2f}/s)  LR: {lr:.3e}  Data: {data.avg:.3f} ({wait:.0f}% wait)  '
        f'{split}' + (f'Grad norm: {grad_norm:.3g}  ' if grad_norm is not None else '') +
        f'ETA epoch {eta_epoch} run {eta_run}')
    if writer is None:
        return
    if grad_norm is not None:
        writer.add_scalar('train/grad_norm', grad_norm, step)
    for k, v in terms.items():
        writer.add_scalar(f'train/{k}', v, step)
    writer.add_scalar('train/lr', lr, step)
    writer.add_scalar('train/img_per_s', ips.avg, step)
    writer.add_scalar('train/data_wait_pct', wait, step)
    if teacher_ms is not None:
        writer.add_scalar('train/teacher_ms', teacher_ms, step)
        writer.add_scalar('train/student_loss_ms', step_ms - teacher_ms * accum_steps, step)


def tensorboard_writer(output_dir: str, resume_path: str = '', start_epoch: int = 0, resume_batch: int = 0,
                       batches_per_epoch: int = 0, args=None):
    """TensorBoard's SummaryWriter on ``output_dir``/tb. After a resume it starts with ``purge_step`` at the first
    update trained again (``start_epoch`` epochs of ``batches_per_epoch`` plus ``resume_batch`` batches were
    trained), so TensorBoard hides what a stopped run wrote for those updates: one event per step and scalar.
    With ``--log-wandb`` the writer also sends every scalar to wandb (``runtime.tracking``)."""
    from torch.utils.tensorboard import SummaryWriter
    from .tracking import tracked
    purge_step = None
    if resume_path:
        accum = args.grad_accum_steps
        purge_step = start_epoch * ((batches_per_epoch + accum - 1) // accum) + resume_batch // accum + 1
    return tracked(SummaryWriter(log_dir=os.path.join(output_dir, 'tb'), purge_step=purge_step), output_dir, args)
