"""One teacher pass, several students: ``train_kd.py --model A,B,C [--distiller x,y,z]``.

The ablation (ScaleKD vs KD vs DIST vs none on one pair) and the size ladder (one teacher, several students) train
every student against the same teacher on the same augmented batches. Run one after another, each run recomputes the
teacher's forward. Here the students train side by side from one loader, and the teacher's forward runs once per
batch (``TeacherMemo``): each student's task calls its teacher exactly as in a solo run, and gets the features the
first call computed. Each ScaleKD student still runs its own projectors and its own pass through the teacher's last
stage (TPP), which are trained parts of its step.

Each student is its own run, laid out as a solo run in ``<output>/<experiment>/<model>-<distiller>`` (``-2``, ... when
a pair repeats): its own args.yaml, optimizer, schedule, EMA, clipping, non-finite policy (a student whose loss stops
it is stopped alone; the others go on), validation, best checkpoint, summary.csv, curves.png and tb/. ``validate.py``
and ``export.py`` take a sub-folder's checkpoints as a solo run's. With the same seed, each student's losses and weights
equal those of its solo run (students without random layers; see README for drop-path and dropout).

train_kd.py calls ``main_joint`` when ``--model`` names more than one student; the single-student path does not come here.
"""
import argparse
import inspect
import logging
import os
from collections import OrderedDict
from contextlib import contextmanager, suppress
from datetime import datetime
from functools import partial
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import yaml

from timm import utils
from timm.data import resolve_data_config
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint

import train_kd
from distillers.balance import log_loss_balance
from distillers.flags import resolve_teacher_img_size, student_list
from distillers.teacher import TeacherLoadError, check_teacher_head, identity_yaml
from distillers.preflight import check_train_inputs
from runtime.checkpoint import check_output_dir
from runtime.data import check_bad_images
from runtime.device import fused_optimizer_kwargs
from runtime.dryrun import dry_run
from runtime.errors import EXIT_FATAL, EXIT_PREEMPTED, FatalError, log_startup_error
from runtime.loaders import create_datasets, create_eval_loader, create_mixup, create_train_loader, device_batch, \
    start_data_epoch
from runtime.metrics import StepTimer, TermSums, log_train_step, tensorboard_writer
from runtime.nonfinite import NonFiniteGuard, norm_and_clip
from runtime.resume import EpochPosition, check_same_resume, checkpoint_position, is_valid_checkpoint, run_config, \
    truncate_summary
from runtime.rng import get_rng_state, set_rng_state
from runtime.runlock import hold_run_lock, release_run_lock
from runtime.saver import RunSaver
from runtime.signals import install_signal_handlers, stop_requested
from validate import check_teacher, validate_task

_logger = logging.getLogger('train')

# settings every student shares: one loader, one teacher, one schedule length
SHARED_DATA = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')


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


class StudentRun:
    """One student of a joint run: its args, task, optimizer, schedule, saver, writer, guard, epoch sums and RNG
    stream; ``error`` once it has stopped (the others go on)."""

    def __init__(self, args, text, output_dir):
        self.args, self.text, self.output_dir = args, text, output_dir
        self.name = os.path.basename(output_dir)
        self.task = self.optimizer = self.scheduler = self.saver = self.writer = self.guard = self.sums = None
        self.resume_path, self.extras, self.error = '', None, None
        self.best_metric = self.best_epoch = None
        self.grad_norm = self.loss_scaler = self.config = None
        self.stream = None  # its own torch RNG stream (StudentStream), set at each epoch's start

    @property
    def live(self) -> bool:
        return self.error is None


def sub_folders(students: List[Tuple[str, str]]) -> List[str]:
    """``<model>-<distiller>`` per student; a pair that repeats gets ``-2``, ``-3``, ..."""
    seen: Dict[str, int] = {}
    out = []
    for model, distiller in students:
        base = f'{safe_model_name(model)}-{distiller}'
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f'{base}-{seen[base]}')
    return out


def student_args(args, model: str, distiller: str, experiment: str) -> Tuple[argparse.Namespace, str]:
    """A solo run's args for one student, and its args.yaml text (before the checks resolve anything, as train_kd)."""
    a = argparse.Namespace(**vars(args))
    a.model, a.distiller, a.experiment = model, distiller, experiment
    # a distillation flag applies to the students whose distiller uses it (an ablation passes --kd-weight for kd)
    if distiller not in ('kd', 'scalekd'):
        a.kd_weight = None
    if distiller in ('none', 'dist'):
        a.distill_loss_weight = a.task_loss_weight = None
    if distiller == 'none':  # the no-teacher baseline: a solo run of it names no teacher
        a.teacher, a.teacher_checkpoint, a.kd_model_name, a.kd_distill_type = '', '', None, None
        a.kd_temperature, a.teacher_features_only = None, False
    return a, yaml.safe_dump(vars(a), default_flow_style=False)


def main_joint(args, args_text) -> int:
    """train_kd.py's main() for several students: check every student, then train them together."""
    parser = train_kd.build_parser()
    students = student_list(args, parser.error)
    if args.torchcompile:
        parser.error('--torchcompile is not supported with several students yet; train them without it, or one by one')
    if args.resume not in ('', 'auto'):
        parser.error(f"--resume {args.resume}: with several students pass --resume auto (each student resumes from "
                     f"its own sub-folder), or resume one student's folder with a solo run")
    args.experiment = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), 'joint'])
    runs = []
    for (model, distiller), sub in zip(students, sub_folders(students)):
        a, text = student_args(args, model, distiller, os.path.join(args.experiment, sub))
        train_kd.check_args(parser.error, a)  # the solo run's argument checks, per student
        runs.append(StudentRun(a, text, os.path.join(a.output or './output/train', a.experiment)))
    teachers = {(r.args.teacher, r.args.teacher_checkpoint, str(r.args.teacher_kwargs), r.args.teacher_img_size)
                for r in runs if r.args.distiller != 'none'}
    args.teacher = next((r.args.teacher for r in runs if r.args.distiller != 'none'), '')  # --kd-model-name too
    if len(teachers) > 1:
        parser.error('the students of one joint run share one teacher; they name several (--kd-model-name and '
                     '--teacher must agree)')
    try:
        for r in runs:
            check_train_inputs(r.args)  # flags, data splits, each run folder: before anything is written
        return train_joint(args, runs)
    except FatalError as e:
        log_startup_error(_logger, e)
        return e.exit_code
    finally:
        release_run_lock()  # every student's run.lock


def _build_students(args, runs: List[StudentRun], device, in_chans):
    """Each student built as its solo run builds it (same RNG stream from the same point: equal initial weights and
    projectors), around one teacher shared by all."""
    rng_start = get_rng_state()
    teacher, data_config = None, None
    for r in runs:
        set_rng_state(rng_start)
        a = r.args
        model = train_kd.create_student(a, in_chans)
        cfg = resolve_data_config(vars(a), model=model, verbose=utils.is_primary(a) and data_config is None)
        if data_config is not None and any(cfg[k] != data_config[k] for k in SHARED_DATA):
            diff = ', '.join(f'{k} {cfg[k]} vs {data_config[k]}' for k in SHARED_DATA if cfg[k] != data_config[k])
            raise FatalError(f'students {runs[0].args.model} and {a.model} take different inputs ({diff}); a joint run '
                             f'feeds one batch to all: set --img-size / --mean / --std / --interpolation / --crop-pct')
        data_config = data_config or cfg
        if a.distiller != 'none' and teacher is not None:
            _replay_teacher_init(a, in_chans)  # the RNG draws the solo run makes for its teacher
        r.task = train_kd.create_task(a, model, cfg, device, in_chans, teacher=teacher)
        if a.distiller != 'none' and teacher is None:
            teacher = r.task.teacher.model
    memo = TeacherMemo(teacher) if teacher is not None else None
    return data_config, memo


def _replay_teacher_init(a, in_chans) -> None:
    """Create (and drop) the teacher's architecture without weights: the random draws of its initialisation, which
    the solo run makes between its student and its task (so a student's projectors start as in its solo run)."""
    resolve_teacher_img_size(a)
    try:
        head = check_teacher_head(a, a.num_classes)
        kwargs = dict(a.teacher_kwargs, **({'img_size': a.teacher_img_size} if a.teacher_img_size else {}))
        create_model(a.teacher, pretrained=False, num_classes=head or a.num_classes, in_chans=in_chans, **kwargs)
    except TeacherLoadError as e:
        raise FatalError(str(e)) from None


def _resume_position(runs: List[StudentRun]) -> None:
    """``--resume auto``: every student resumes at the newest position all their folders hold a loadable checkpoint
    of (a stop between two students' saves leaves one a save ahead; it goes back to the other's). Positions come
    from the checkpoints' metadata (memory-mapped); only the files of a chosen position are read in full."""
    found = [_positions(r.output_dir) for r in runs]
    if not any(found):
        return
    if not all(found):
        missing = [r.output_dir for r, f in zip(runs, found) if not f]
        raise FatalError(f"--resume auto: {', '.join(missing)} holds no checkpoint while the other students' folders "
                         f"do; resume the students one by one, or start the joint run in a new --experiment")
    for pos in sorted(set(found[0]).intersection(*found[1:]), reverse=True):
        if all(is_valid_checkpoint(f[pos]) for f in found):  # a damaged file: the next older common position
            for r, f in zip(runs, found):
                r.resume_path = f[pos]
                _logger.info(f"--resume auto: resuming from '{f[pos]}'")
            return
    raise FatalError('--resume auto: the students\' folders hold no checkpoint of a common position; resume them '
                     'one by one')


def _positions(folder: str) -> Dict[Tuple[int, float], str]:
    """{(epoch, batch): checkpoint file} of ``folder`` (epoch ends as batch inf; last.pth.tar preferred)."""
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.endswith('.pth.tar') or name.startswith(('tmp', 'recovery_tmp')):
            continue
        pos = checkpoint_position(os.path.join(folder, name))
        if pos is not None and (pos not in out or name == 'last.pth.tar'):
            out[pos] = os.path.join(folder, name)
    return out


def train_joint(args, runs: List[StudentRun]) -> int:
    device = train_kd.setup_device(args)
    for r in runs:
        for k in ('prefetcher', 'grad_accum_steps', 'distributed', 'world_size', 'rank', 'local_rank', 'device'):
            setattr(r.args, k, getattr(args, k))
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else suppress
    use_scaler = args.amp and amp_dtype == torch.float16 and device.type == 'cuda'
    utils.random_seed(args.seed, args.rank)

    dataset_train, dataset_eval = create_datasets(args)
    for r in runs:
        r.args.num_classes = args.num_classes
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    data_config, memo = _build_students(args, runs, device, in_chans)
    if args.lr is None:
        train_kd.resolve_lr(args)
    for r in runs:
        r.args.lr = args.lr
        r.task.to(device=device)
        if args.channels_last:
            r.task.to(memory_format=torch.channels_last)
        if args.amp and amp_dtype == torch.bfloat16 and hasattr(r.task, 'hold_teacher'):
            r.task.hold_teacher(amp_dtype)
        r.optimizer = create_optimizer_v2(r.task.get_trainable_module(), **optimizer_kwargs(cfg=r.args),
                                          **args.opt_kwargs, **fused_optimizer_kwargs(args.opt, device, args.opt_kwargs))
        r.loss_scaler = utils.NativeScaler(device=device.type) if use_scaler else None
        r.config = run_config(r.args, train_kd.RESUME_FREE_KEYS)

    for r in runs:  # one job per run folder; a new run never writes into a folder that holds one
        hold_run_lock(r.output_dir, r.args)
    if args.resume == 'auto':
        _resume_position(runs)
    start_epoch, resume_batch, extras = 0, 0, None
    for r in runs:
        check_same_resume(r.resume_path, args.distributed)
        start, batch, r.extras = train_kd.resume_checkpoint(r.args, r.task, r.optimizer, r.loss_scaler, r.resume_path,
                                                            r.config)
        if r is runs[0]:
            start_epoch, resume_batch, extras = start, batch, r.extras
        if utils.is_primary(args) and r.resume_path and not args.dry_run:
            truncate_summary(os.path.join(r.output_dir, 'summary.csv'), start_epoch)
        if args.model_ema:
            r.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                             device='cpu' if args.model_ema_force_cpu else None)
            if r.resume_path:
                load_task_ema_checkpoint(r.task, r.resume_path)
        if args.distributed:
            r.task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                       **(dict(broadcast_buffers=False) if args.no_ddp_bb else {}))
    position = EpochPosition(resume_batch, extras if resume_batch else None)

    collate_fn, mixup_fn = create_mixup(args)
    loader_train = create_train_loader(dataset_train, args, data_config, device, collate_fn=collate_fn,
                                       distributed=args.distributed)
    loader_eval = create_eval_loader(dataset_eval, args, data_config, device)
    if args.dry_run:
        return _dry_run(args, runs, loader_train, mixup_fn, amp_autocast, device, memo)

    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    for r in runs:
        if utils.is_primary(args):
            check_output_dir(r.output_dir)
            r.saver = RunSaver(model=r.task.get_eval_model(), optimizer=r.optimizer, args=r.args,
                               amp_scaler=r.loss_scaler, checkpoint_dir=r.output_dir, recovery_dir=r.output_dir,
                               decreasing=eval_metric == 'loss', max_history=args.checkpoint_hist, task=r.task,
                               run_config=r.config)
            if r.resume_path and os.path.dirname(os.path.abspath(r.resume_path)) == os.path.abspath(r.output_dir):
                r.saver.load_state_dict_from_checkpoint(r.resume_path)
                r.saver.adopt_recovery(r.resume_path)
            with open(os.path.join(r.output_dir, 'args.yaml'), 'w') as f:
                f.write(r.text + identity_yaml(r.args))
            r.writer = tensorboard_writer(r.output_dir, r.resume_path, start_epoch, resume_batch, len(loader_train),
                                          r.args)
            _logger.info(f'Student {r.name}: output folder {r.output_dir}')
        r.scheduler, num_epochs = create_scheduler_v2(
            r.optimizer, **scheduler_kwargs(r.args, decreasing_metric=eval_metric == 'loss'),
            updates_per_epoch=updates_per_epoch)
        if r.scheduler is not None and (start_epoch > 0 or resume_batch):
            if args.sched_on_updates:
                r.scheduler.step_update(start_epoch * updates_per_epoch + resume_batch // args.grad_accum_steps)
            else:
                r.scheduler.step(start_epoch)
        r.guard = NonFiniteGuard(args.nonfinite, args.nonfinite_max_skips, distributed=args.distributed, device=device)
        r.guard.skipped = (r.extras or {}).get('nonfinite_skipped', 0)
    if utils.is_primary(args):
        _logger.info(f'Joint run: {len(runs)} students, one teacher forward per batch; scheduled epochs: {num_epochs}, '
                     f'{updates_per_epoch} updates per epoch.')
    if args.teacher_min_top1 is not None:  # the one teacher, checked once
        check_teacher(next(r.task for r in runs if r.args.distiller != 'none'), loader_eval, args, device,
                      amp_autocast, logger=_logger)

    restore_signal_handlers = install_signal_handlers()
    timer = StepTimer(start_epoch * updates_per_epoch + resume_batch // args.grad_accum_steps,
                      num_epochs * updates_per_epoch, args.world_size)
    measure_balance = args.loss_balance_factor > 0 and not any(r.resume_path for r in runs) and start_epoch == 0
    exit_code = 0
    try:
        for epoch in range(start_epoch, num_epochs):
            start_data_epoch(epoch, dataset_train, loader_train, mixup_fn, args)
            metrics = train_joint_epoch(epoch, runs, loader_train, args, device, amp_autocast, mixup_fn, timer, position,
                                        memo, measure_balance=measure_balance and epoch == start_epoch)
            if metrics is None:
                exit_code = EXIT_PREEMPTED
                break
            for r, train_metrics in zip(runs, metrics):
                if not r.live:
                    continue
                if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                    utils.distribute_bn(r.task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
                eval_metrics = None
                if loader_eval is not None and ((epoch + 1) % args.val_interval == 0 or epoch + 1 == num_epochs):
                    if utils.is_primary(args):
                        _logger.info(f'Student {r.name}:')
                    eval_metrics = validate_task(r.task, loader_eval, r.args, device, amp_autocast, logger=_logger)
                if utils.is_primary(args):
                    train_kd.write_summary(epoch, train_metrics, eval_metrics, r.optimizer, r.task, r.args, r.writer,
                                           r.output_dir, has_eval=loader_eval is not None)
                    metric = eval_metrics[eval_metric] if eval_metrics else None
                    r.best_metric, r.best_epoch = r.saver.save_checkpoint(
                        epoch, metric=metric, run_state=dict(nonfinite_skipped=r.guard.skipped))
                if r.scheduler is not None:
                    r.scheduler.step(epoch + 1, eval_metrics[eval_metric] if eval_metrics else None)
            position.next_epoch()
            if not any(r.live for r in runs):
                break
    except KeyboardInterrupt:
        exit_code = EXIT_PREEMPTED
    finally:
        restore_signal_handlers()
        for r in runs:
            if r.writer is not None:
                r.writer.close()
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()
    if utils.is_primary(args):
        for r in runs:
            state = f'stopped: {r.error}' if r.error else f'best metric {r.best_metric} (epoch {r.best_epoch})'
            _logger.info(f'*** Student {r.name}: {state}')
    if exit_code == 0 and any(not r.live for r in runs):
        exit_code = EXIT_FATAL
    return exit_code


def _student_backward(r: StudentRun, loss, terms, need_update: bool, num_updates: int) -> bool:
    """The solo run's backward, clip, non-finite check and optimizer step for one student; True when skipped."""
    args = r.args
    clip_params = partial(r.task.get_clip_parameters, exclude_head='agc' in args.clip_mode)
    if r.loss_scaler is not None:
        if r.guard.skip_update(terms, num_updates):
            return True
        r.loss_scaler(loss, r.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                      parameters=clip_params(), need_update=need_update)
        return False
    loss.backward()
    if need_update:
        r.grad_norm = norm_and_clip(r.task.get_trainable_module().parameters(), args.clip_grad, args.clip_mode,
                                    clip_params())
        norm = {} if r.grad_norm is None else {'gradient': r.grad_norm}
        if r.guard.skip_update(dict(terms, **norm), num_updates):
            return True
        r.optimizer.step()
    return False


def torch_rng() -> dict:
    """The torch RNG state (CPU, and every CUDA device): what drop-path and dropout draw from."""
    state = {'cpu': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_torch_rng(state: dict) -> None:
    torch.set_rng_state(state['cpu'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class StudentStream:
    """A student's own torch RNG stream for its step (drop-path, dropout), forked from the process's stream at the
    first batch of each epoch, where its solo run's first step starts drawing. The process's stream then serves the
    data pipeline alone, as in a solo run whose loader has workers, so each student draws what it draws alone."""

    def __init__(self, saved: dict = None):
        self.state = saved

    def __enter__(self):
        self.outer = torch_rng()
        if self.state is None:
            self.state = self.outer
        set_torch_rng(self.state)
        return self

    def __exit__(self, *exc):
        self.state = torch_rng()
        set_torch_rng(self.outer)
        return False


def _stop_student(r: StudentRun, e: FatalError, where: str) -> None:
    r.error = f'{e} ({where})'
    _logger.error(f'Student {r.name} stopped, the other students go on: {e}')
    r.optimizer.zero_grad()


def train_joint_epoch(epoch, runs, loader, args, device, amp_autocast, mixup_fn, timer, position, memo,
                      measure_balance=False):
    """One epoch of every live student on the same batches; [metrics per student], or None when stopped by a signal.
    Each student's step is its solo run's step (forward, backward, clip, non-finite policy, update, EMA, schedule)."""
    utils.random_seed(args.seed + epoch * 4099, args.rank)
    for r in runs:
        r.task.train()
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    last_accum_steps = num_batches % accum_steps or accum_steps
    last_batch_idx_to_accum = num_batches - last_accum_steps
    num_updates = epoch * updates_per_epoch + position.start_batch // accum_steps
    for r in runs:
        saved = (r.extras or {}) if position.start_batch else {}  # resumed inside this epoch: its sums and stream
        r.sums = TermSums(device, args.distributed, saved.get('epoch_sums'), primary=utils.is_primary(args))
        own = (saved.get('student_rng') or [None] * args.world_size)[args.rank] if saved.get('student_rng') else None
        r.stream = StudentStream(own)
    timer.start_epoch()
    for r in runs:
        r.optimizer.zero_grad()
    counts = (memo.runs, memo.hits) if memo is not None else (0, 0)
    for batch_idx, (input, target) in enumerate(loader):
        if position.skip(batch_idx):
            timer.restart()
            continue
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        accum = last_accum_steps if batch_idx >= last_batch_idx_to_accum else accum_steps
        input, target = device_batch(input, target, args, device, mixup_fn)
        timer.data_ready()
        with memo.batch() if memo is not None else suppress():  # one teacher forward for every student
            for r in runs:
                if r.live and measure_balance and batch_idx == 0:
                    log_loss_balance(r.args, r.task, input, target, amp_autocast, r.output_dir)
                if not r.live:
                    continue
                with r.stream, (r.task.no_sync() if args.distributed and not need_update else suppress()):
                    with amp_autocast():
                        out = r.task(input, target)
                    terms = OrderedDict((k, v.detach()) for k, v in out.items() if k.startswith('loss'))
                    try:
                        skip = _student_backward(r, out['loss'] / accum, terms, need_update, num_updates)
                    except FatalError as e:  # --nonfinite skip past its limit
                        _stop_student(r, e, f'epoch {epoch} batch {batch_idx}')
                        continue
                del out
                r.sums.add(terms, input.shape[0])
                if need_update:
                    r.optimizer.zero_grad()
                    if not skip:
                        r.task.update_ema(step=num_updates + 1)
        timer.samples += input.shape[0]
        if not need_update:
            position.batch_done()
            timer.next_batch()
            continue

        num_updates += 1
        if args.synchronize_step and device.type == 'cuda':
            torch.cuda.synchronize()
        timer.update_done()
        log_now = update_idx % args.log_interval == 0 or last_batch
        if log_now:
            teacher_ms = sum(r.task.pop_teacher_ms() or 0. for r in runs if hasattr(r.task, 'pop_teacher_ms'))
            for r in runs:
                if not r.live:
                    continue
                try:
                    r.guard.flush()
                except FatalError as e:  # --nonfinite abort: this student stops, the others go on
                    _stop_student(r, e, f'epoch {epoch} update {update_idx}')
                    continue
                timer.grad_norm = r.grad_norm
                if utils.is_primary(args):
                    _logger.info(f'Student {r.name}:')
                log_train_step(epoch, update_idx, updates_per_epoch, num_updates, r.sums.means(), r.optimizer, timer,
                               r.writer, teacher_ms if r is runs[0] else None, accum_steps,
                               primary=utils.is_primary(args))
            if not any(r.live for r in runs):
                return [None] * len(runs)

        stop = stop_requested(args.distributed, device) if not args.distributed or log_now or \
            num_updates % 10 == 0 else False
        check_bad_images(loader, device, now=log_now or num_updates % 10 == 0)
        if stop or (args.recovery_interval and num_updates % args.recovery_interval == 0 and not last_batch):
            rng = position.rng_states(args.distributed)
            for r in runs:
                if not r.live:
                    continue
                r.guard.flush()
                state = dict(**rng, epoch_sums=r.sums.state(), nonfinite_skipped=r.guard.skipped,
                             student_rng=_gather(args.distributed, r.stream.state))
                if r.saver is not None:
                    r.saver.save_recovery(epoch, batch_idx, run_state=state)
            if stop:
                if utils.is_primary(args):
                    _logger.warning(f'Stopped at epoch {epoch} batch {batch_idx}; recovery checkpoints written for '
                                    f'every student. Continue with --resume auto (exit code {EXIT_PREEMPTED}).')
                return None
        for r in runs:
            if r.live and r.scheduler is not None:
                r.scheduler.step_update(num_updates=num_updates, metric=None)
        position.batch_done()
        timer.next_batch()

    if memo is not None and utils.is_primary(args):
        _logger.info(f'Epoch {epoch}: the teacher ran {memo.runs - counts[0]} times for '
                     f'{memo.runs - counts[0] + memo.hits - counts[1]} student steps')
    out = []
    for r in runs:
        if hasattr(r.optimizer, 'sync_lookahead'):
            r.optimizer.sync_lookahead()
        out.append(OrderedDict(r.sums.means(), img_per_s=timer.images_per_s.avg, data_time=timer.data.avg,
                               nonfinite_skipped=r.guard.skipped) if r.live else None)
    return out


def _gather(distributed: bool, state) -> list:
    """``state`` of every rank (collective when distributed), for a recovery checkpoint."""
    if not distributed:
        return [state]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


class _OneBatch:
    """A loader of one prepared batch (its length: the real loader's, for the steps-per-epoch line)."""

    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __iter__(self):
        return iter([self.batch])

    def __len__(self):
        return self.length


def _dry_run(args, runs, loader, mixup_fn, amp_autocast, device, memo) -> int:
    """``--dry-run`` of a joint run: each student's solo dry run on one and the same batch, so the teacher's forward
    runs once for all of them (the later students' step times are those of a joint step)."""
    batch = _OneBatch(device_batch(*next(iter(loader)), args, device, mixup_fn), len(loader))
    with memo.batch() if memo is not None else suppress():
        for r in runs:
            if utils.is_primary(args):
                _logger.info(f'Student {r.name}:')
            dry_run(r.args, r.task, r.optimizer, batch, None, amp_autocast, device, balance=log_loss_balance)
    if memo is not None and utils.is_primary(args):
        _logger.info(f'Joint dry run: the teacher ran {memo.runs} times for {memo.runs + memo.hits} student forwards')
    return 0
