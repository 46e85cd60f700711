#!/usr/bin/env python3
"""ScaleKD / KD training script, shaped like timm's train.py.

The phases of main() follow timm's train.py and call timm's helpers; all distillation math lives
in ``distillers/`` (a ``timm.task.TrainingTask`` per method) and all knowledge of where a model
keeps its stage features lives in ``models/``. Recipes (``--config recipes/NAME.yaml``) set
defaults; command-line flags override them.

    python train_kd.py --config recipes/swinl_r50.yaml --data-dir /data/imagenet
    ./distributed_train.sh 8 --config recipes/swinl_vitb.yaml --data-dir /data/imagenet
"""
import argparse
import logging
import os
import sys
from collections import OrderedDict
from contextlib import suppress
from datetime import datetime
from functools import partial

import torch
import torch.distributed as dist

import timm
from timm import utils
from timm.data import resolve_data_config, AugMixDataset
from timm.layers import convert_sync_batchnorm, set_fast_norm
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import resume_task_checkpoint, load_task_ema_checkpoint

import models  # noqa: F401  registers the paper's student variants
from config import parse_args_with_recipe
from distillers.teacher import TeacherLoadError, check_model_name, check_teacher_head, create_teacher, identity_yaml, \
    teacher_head
from distillers.balance import log_loss_balance
from distillers.memo import TeacherMemo
from distillers.preflight import check_train_inputs, checked_build_task, settle_models
from distillers.flags import add_distill_args, check_distill_args, criterion_kwargs, describe_kd_settings, \
    resolve_teacher_img_size, student_args, student_list, task_kwargs
from runtime.checkpoint import check_output_dir
from runtime.code_version import code_version
from runtime.data import check_bad_images
from runtime.dryrun import dry_run_students
from runtime.device import check_compile, check_precision, fused_optimizer_kwargs
from runtime.distributed import collective_failure_message, collective_timeout
from runtime.loaders import create_datasets, create_eval_loader, create_mixup, create_train_loader, device_batch, \
    num_classes, start_data_epoch  # noqa: F401  (num_classes, create_train_loader: the benchmark)
from runtime.errors import EXIT_FATAL, EXIT_PREEMPTED, FatalError, log_startup_error, short
from runtime.metrics import StepTimer, TermSums, log_train_step, tensorboard_writer
from runtime.nonfinite import NonFiniteGuard, norm_and_clip
from runtime.plot import write_curves
from runtime.resume import EpochPosition, append_summary, check_same_resume, find_resume, load_state_extras, \
    run_config, truncate_summary
from runtime.rng import get_rng_state, set_rng_state
from runtime.runlock import hold_run_lock, release_run_lock
from runtime.saver import RunSaver
from runtime.signals import install_signal_handlers, stop_requested
from runtime.students import STOP_MARKER, StudentRun, StudentStream, gather, own_stream, read_stop_marker, \
    resume_positions, sub_folders, write_stop_marker
from runtime.unlabeled import LabelledOnly
from runtime.timm_flags import add_timm_flags, adapt_student, student_create_kwargs, timm_flag_problem
from runtime.tracking import add_tracking_args
from validate import check_teacher, eval_columns, validate_task

_logger = logging.getLogger('train')

# what every student of a joint run shares: one loader feeds one batch to all of them
SHARED_DATA = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')

# settings that may change between a run and its resume without changing what is trained (dest names)
RESUME_FREE_KEYS = frozenset({
    'resume', 'resume_force', 'no_resume_opt', 'workers', 'log_interval', 'recovery_interval', 'checkpoint_hist',
    'output', 'experiment', 'pin_mem', 'device', 'dist_backend', 'config', 'synchronize_step', 'start_epoch',
    'val_labelled', 'val_classes',  # what the data folders say, set at start-up
    'teacher_min_top1', 'teacher_check_batches', 'nonfinite', 'nonfinite_max_skips', 'val_interval', 'epochs',
    'data_dir', 'teacher_checkpoint', 'prefetcher', 'distributed', 'world_size', 'rank', 'local_rank',
    'dist_timeout', 'max_bad_images', 'loss_balance_factor', 'scalekd_allow_degenerate', 'no_plot',
    'lock_stale_minutes', 'dry_run', 'dataset_trust_remote_code', 'data',
    'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id',  # tracking only (runtime.tracking)
    'torchcompile', 'torchcompile_mode',  # compiled or eager: the same math (checkpoints hold unprefixed keys)
})


def build_parser():
    parser = argparse.ArgumentParser(description='ScaleKD / KD training (timm-style)')
    parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                        help='recipe YAML (sections or flat dest-name keys) giving defaults for the flags below')

    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>") (default: ImageFolder or ImageTar if empty)')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
    group.add_argument('--val-split', metavar='NAME', default='validation',
                       help='dataset validation split (default: validation)')
    group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                       help='manually specify num samples in train split, for IterableDatasets.')
    group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                       help='manually specify num samples in validation split, for IterableDatasets.')
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of dataset for torch/ and tfds/ datasets that support it.')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to class to idx mapping file (default: "")')
    group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode for input')
    group.add_argument('--unlabeled-data', default=None, nargs='+', metavar='DIR',
                       help='folders of images without labels (read recursively, any layout; class folders are not '
                            'labels) that join training: the teacher teaches them, the label loss skips them')
    group.add_argument('--labels', default='folders', choices=('folders', 'none'),
                       help='folders: the train split\'s class folders are labels; none: no label is read, the '
                            'student learns from the teacher alone (the class count comes from the teacher\'s head; '
                            'chosen by itself when the train split holds images but no class folders)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='resnet50', type=str, metavar='MODEL',
                       help='name of the student model to train (default: "resnet50")')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start with a pretrained version of the student')
    group.add_argument('--pretrained-path', default=None, type=str,
                       help='load this checkpoint as if it were the pretrained weights (with adaptation).')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='load this checkpoint into the student after initialization')
    group.add_argument('--resume', default='', type=str, metavar='PATH',
                       help='resume the full run (student, EMA, projectors, optimizer, scaler, epoch) from a '
                            'checkpoint; "auto" takes the newest valid one in the run folder (default: none)')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='prevent resume of optimizer state when resuming model')
    group.add_argument('--resume-force', action='store_true', default=False,
                       help='resume even if the saved run was started with different settings')
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (default: the number of class folders)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL',
                       help='global pool type, one of (fast, avg, max, avgmax, avgmaxc). Model default if None.')
    group.add_argument('--img-size', type=int, default=None, metavar='N',
                       help='image size (default: None => model default)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N',
                       help='input dimensions (d h w, e.g. --input-size 3 224 224), uses model default if empty')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='input image center crop percent (for validation only)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='override mean pixel value of dataset')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override std deviation')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='image resize interpolation type (overrides model)')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N',
                       help='input batch size per process for training (default: 128)')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size override (default: None)')
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=False,
                       help='use channels_last memory layout (--no-channels-last: NCHW, where a recipe sets it)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='the number of steps to accumulate gradients (default: 1)')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='enable gradient checkpointing through the student where supported')
    group.add_argument('--fast-norm', default=False, action='store_true', help='enable experimental fast-norm')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra student kwargs, e.g. class_token=False global_pool=avg')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                       help='enable torch.compile() of student, projectors and teacher with this backend')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='torch.compile mode (default: None)')

    add_distill_args(parser)

    group = parser.add_argument_group('Device parameters')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                       help='device to use for training (default: cuda if available)')
    group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=False,
                       help='use mixed precision (autocast); --no-amp: fp32, where a recipe sets amp')
    group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                       help='lower precision AMP dtype (default: float16)')
    group.add_argument('--no-ddp-bb', action='store_true', default=False,
                       help='force broadcast buffers for native DDP to off.')
    group.add_argument('--synchronize-step', action='store_true', default=False,
                       help='torch.cuda.synchronize() end of each step')
    group.add_argument('--dist-backend', default=None, type=str,
                       help='torch.distributed backend (default: nccl on cuda, gloo on cpu)')
    group.add_argument('--dist-timeout', type=float, default=float(os.environ.get('TORCH_DIST_TIMEOUT', 0) or 1800),
                       metavar='SEC', help='collective timeout: when a rank dies or hangs, the others stop with an '
                                           'error after this many seconds (default: $TORCH_DIST_TIMEOUT or 1800)')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='Optimizer (default: "sgd")')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='Optimizer Epsilon')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='Optimizer Betas')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='Optimizer momentum (default: 0.9)')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay (default: 2e-5)')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='Clip gradient norm (default: None, no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm', help='Gradient clipping mode: "norm", "value", "agc"')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER',
                       help='LR scheduler (default: "cosine")')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='Apply LR scheduler step on update instead of epoch end.')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate, overrides lr-base if set (default: None)')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * global_batch_size / base_size')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='base learning rate batch size (divisor, default: 256).')
    group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                       help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='learning rate noise limit percent (default: 0.67)')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='learning rate noise std-dev (default: 1.0)')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='learning rate cycle len multiplier (default: 1.0)')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='amount to decay each learning rate cycle (default: 0.5)')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                       help='learning rate cycle limit, cycles enabled if > 1')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR',
                       help='warmup learning rate (default: 1e-5)')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='lower lr bound for cyclic schedulers that hit 0 (default: 0)')
    group.add_argument('--epochs', type=int, default=300, metavar='N', help='number of epochs to train (default: 300)')
    group.add_argument('--epoch-repeats', type=float, default=0., metavar='N',
                       help='epoch repeat multiplier (number of times to repeat dataset epoch per train epoch).')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='manual epoch number (useful on restarts)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='list of decay epoch indices for multistep lr. must be increasing')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N',
                       help='epochs to warmup LR, if scheduler supports')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='Exclude warmup period from decay schedule.')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='patience epochs for Plateau LR scheduler (default: 10)')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                       help='LR decay rate (default: 0.1)')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False, help='Disable all training augmentation')
    group.add_argument('--train-crop-mode', type=str, default=None, help='Crop-mode in train')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='Random resize scale (default: 0.08 1.0)')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='Random resize aspect ratio (default: 0.75 1.33)')
    group.add_argument('--hflip', type=float, default=0.5, help='Horizontal flip training aug probability')
    group.add_argument('--vflip', type=float, default=0., help='Vertical flip training aug probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT',
                       help='Color jitter factor (default: 0.4)')
    group.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT',
                       help='Probability of applying any color jitter.')
    group.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT',
                       help='Probability of applying random grayscale conversion.')
    group.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT',
                       help='Probability of applying gaussian blur.')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='Use AutoAugment policy. "v0" or "original", or RandAugment "rand-m9-mstd0.5-inc1"')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='Number of augmentation repetitions (distributed training only) (default: 0)')
    group.add_argument('--aug-splits', type=int, default=0,
                       help='Number of augmentation splits (default: 0, valid: 0 or >=2)')
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help='Enable BCE loss w/ Mixup/CutMix use.')
    group.add_argument('--bce-sum', action='store_true', default=False,
                       help='Sum over classes when using BCE loss.')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='Threshold for binarizing softened BCE targets (default: None, disabled).')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='Positive weighting for BCE loss.')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT',
                       help='Random erase prob (default: 0.)')
    group.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    group.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    group.add_argument('--resplit', action='store_true', default=False,
                       help='Do not random erase first (clean) augmentation split')
    group.add_argument('--mixup', type=float, default=0.0,
                       help='mixup alpha, mixup enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix', type=float, default=0.0,
                       help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='Probability of performing mixup or cutmix when either/both is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='Probability of switching to cutmix when both mixup and cutmix enabled')
    group.add_argument('--mixup-mode', type=str, default='batch',
                       help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='Turn off mixup after this epoch, disabled if 0 (default: 0)')
    group.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='Training interpolation (random, bilinear, bicubic default: "random")')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='Dropout rate (default: 0.)')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help='Drop path rate (default: None)')

    group = parser.add_argument_group('Batch norm parameters')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override (if not None)')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override (if not None)')
    group.add_argument('--sync-bn', action='store_true', help='Enable synchronized BatchNorm (student only).')
    group.add_argument('--dist-bn', type=str, default='reduce',
                       help='Distribute BatchNorm stats between nodes after each epoch ("broadcast", "reduce", or "")')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='Enable tracking moving average of model weights.')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                       help='Force ema to be tracked on CPU, rank=0 node only. Disables EMA validation.')
    group.add_argument('--model-ema-decay', type=float, default=0.9998,
                       help='Decay factor for model weights moving average (default: 0.9998)')
    group.add_argument('--model-ema-warmup', action='store_true', help='Enable warmup for model EMA decay.')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
    group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N',
                       help='how many batches to wait before logging training status')
    group.add_argument('--val-interval', type=int, default=1, metavar='N',
                       help='validate every N epochs (the last epoch is always validated)')
    group.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                       help='how many updates to wait between recovery checkpoints (0: off)')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N',
                       help='number of checkpoints to keep (default: 10)')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N',
                       help='how many training processes to use (default: 4)')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='path to output folder (default: none, current dir)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of train experiment, name of sub-folder for output')
    group.add_argument('--no-plot', action='store_true', default=False,
                       help='do not draw <output>/<experiment>/curves.png (losses, top-1, agreement, lr) every epoch')
    group.add_argument('--lock-stale-minutes', type=float, default=10.0, metavar='MIN',
                       help='the run folder\'s run.lock of a job on another host whose heartbeat (every minute) is '
                            'older than this is stale and taken over (default: 10)')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                       help='Best metric (default: "top1")')
    group.add_argument('--nonfinite', default='abort', type=str, choices=('abort', 'skip'),
                       help='on a non-finite loss or gradient: stop naming the term, or skip the update '
                            '(default: abort)')
    group.add_argument('--nonfinite-max-skips', type=int, default=10, metavar='N',
                       help='with --nonfinite skip, stop after this many skipped updates (default: 10)')
    group.add_argument('--teacher-min-top1', type=float, default=None, metavar='PCT',
                       help='evaluate the teacher on the validation split before training and stop if its top-1 '
                            'is below PCT (default: off)')
    group.add_argument('--teacher-check-batches', type=int, default=None, metavar='N',
                       help='with --teacher-min-top1, evaluate on the first N validation batches only')
    group.add_argument('--dry-run', action='store_true', default=False,
                       help='run every check before step 0, log the geometry, loss balance and trained parameters, time '
                            'two forward + backward + update steps at the chosen batch (peak memory on CUDA), then exit '
                            '0 having written nothing: will this pair and batch fit?')
    group.add_argument('--max-bad-images', type=int, default=100, metavar='N',
                       help='unreadable or corrupt images are skipped and named in the log; stop when a process '
                            'has skipped more than N of them (default: 100)')
    add_timm_flags(parser)  # the rest of timm's train.py flags: timm's meaning, or refused by name (check_args)
    add_tracking_args(parser)  # --log-wandb, --wandb-project, --wandb-tags, --wandb-resume-id (timm's)
    return parser


def _parse_args(argv=None):
    return parse_args_with_recipe(build_parser(), argv)


def check_args(parser_error, args):
    check_distill_args(parser_error, args)
    problem = timm_flag_problem(args)  # a timm flag a distillation run cannot honour: its reason and what instead
    if problem:
        parser_error(problem)
    problem = check_model_name(args.model, '--model')  # a registry name (tag), hf-hub: or local-dir:, as timm's
    if problem:
        parser_error(problem)
    if args.grad_accum_steps < 1:
        parser_error('--grad-accum-steps must be >= 1')
    if not args.data_dir and not args.dataset:
        parser_error('--data-dir is required (an ImageFolder root with train/ and validation/ or val/ folders)')
    problem = unlabeled_problem(args)  # --unlabeled-data / --labels none with what cannot use them
    if problem:
        parser_error(problem)


def main(argv=None):
    if not logging.getLogger().handlers:  # in-process callers (tests) would stack one handler per call
        utils.setup_default_logging()
    args, args_text = _parse_args(argv)
    runs = list_students(build_parser().error, args, args_text)  # --model A,B,C: one teacher pass, several students
    try:
        for r in runs:
            check_train_inputs(r.args)  # flags, data splits, run folders: before anything is created or written
        return train(args, runs)
    except FatalError as e:
        log_startup_error(_logger, e)
        return e.exit_code
    except RuntimeError as e:  # a collective broken by a dead or hung rank: one line instead of a traceback
        msg = collective_failure_message(e, args.rank, args.dist_timeout) if getattr(args, 'distributed', 0) else None
        if msg is None:
            raise
        _logger.error(msg)
        return EXIT_FATAL
    finally:
        release_run_lock()  # every student's run.lock, if train() took them, on every exit path


def list_students(parser_error, args, args_text):
    """The run's students: a list of one (``args`` itself, its folder named once the input size is known), or for
    ``--model A,B,C`` one StudentRun per student, each with its own copy of every setting and the args.yaml a solo
    run of it writes, in ``<output>/<experiment>/<model>-<distiller>``. Each student passes the solo run's checks."""
    students = student_list(args, parser_error)  # timm's --kd-model-name rule first: a joint run trains the same
    if len(students) == 1:
        check_args(parser_error, args)
        return [StudentRun(args, args_text, None)]
    if args.resume not in ('', 'auto'):
        parser_error(f"--resume {args.resume}: with several students pass --resume auto (each student resumes from "
                     f"its own sub-folder), or resume one student's folder with a solo run")
    args.experiment = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), 'joint'])
    runs = []
    for (model, distiller), sub in zip(students, sub_folders(students)):
        a, text = student_args(args, model, distiller, os.path.join(args.experiment, sub))
        check_args(parser_error, a)  # the solo run's argument checks, per student
        runs.append(StudentRun(a, text, os.path.join(a.output or './output/train', a.experiment)))
    teachers = {(r.args.teacher, r.args.teacher_checkpoint, str(r.args.teacher_kwargs), r.args.teacher_img_size)
                for r in runs if r.args.distiller != 'none'}
    if len(teachers) > 1:
        parser_error('the students of one joint run share one teacher; they name several (--kd-model-name and '
                     '--teacher must agree)')
    args.teacher = next((r.args.teacher for r in runs if r.args.distiller != 'none'), '')
    return runs


def train(args, runs):
    device = setup_device(args)
    for r in runs:  # what the set-up resolved for the run, every student alike
        for k in ('prefetcher', 'grad_accum_steps', 'distributed', 'world_size', 'rank', 'local_rank', 'device'):
            setattr(r.args, k, getattr(args, k))
    runs = skip_stopped_students(args, runs)  # --resume auto of a joint run: a student stopped alone stays stopped
    live = [r for r in runs if r.live]
    if not live:
        return EXIT_FATAL

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else suppress
    utils.random_seed(args.seed, args.rank)
    if args.fast_norm:
        set_fast_norm()

    # create the train and eval datasets (before the models: the class count comes from the data)
    dataset_train, dataset_eval = create_datasets(args)
    for r in live:  # a train split without class folders is read without labels (checked again for each student)
        r.args.labels = args.labels
        problem = unlabeled_problem(r.args)
        if problem:
            raise FatalError(problem)
    if args.num_classes is None:  # --labels none: the class count of the teacher's head
        args.num_classes = classes_from_teacher(args, live)

    # create every student and its task around one frozen teacher (eval mode): device, channels_last, sync-bn
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    data_config, memo = build_students(args, live, device, in_chans, amp_dtype)

    # per student: learning rate, optimizer, run folder and lock, resume, EMA, DDP, compile
    start_epoch, resume_batch, extras = setup_students(args, live, device, amp_dtype)
    if args.torchcompile and memo is not None:  # the shared teacher's features: compiled once, for every student
        memo.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
    position = EpochPosition(resume_batch, extras if resume_batch else None)  # where the first epoch goes on

    # loaders and mixup (one loader for every student)
    collate_fn, mixup_fn = create_mixup(args)
    if args.aug_splits > 1:
        dataset_train = AugMixDataset(dataset_train, num_splits=args.aug_splits)
    loader_train = create_train_loader(dataset_train, args, data_config, device, collate_fn=collate_fn,
                                       distributed=args.distributed)
    loader_eval = create_eval_loader(dataset_eval, args, data_config, device)

    if args.dry_run:  # checks passed, models and loaders built: time the steps and stop, nothing written
        return dry_run_students(args, live, loader_train, mixup_fn, amp_autocast, device, memo,
                                balance=log_loss_balance if args.labels != 'none' else None)
    if args.teacher_min_top1 is not None:  # the one teacher, checked once, before anything is written
        check_teacher(next(r.task for r in live if r.args.distiller != 'none'), loader_eval, args, device,
                      amp_autocast, logger=_logger)

    # per student: checkpoint saver, args.yaml, TensorBoard (rank 0 only), LR schedule, non-finite guard
    eval_metric = eval_metric_of(args, loader_eval)
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    num_epochs = start_outputs(args, live, eval_metric, start_epoch, resume_batch, len(loader_train), device)
    if utils.is_primary(args):
        _logger.info(f'Scheduled epochs: {num_epochs}, {updates_per_epoch} updates per epoch.' + (
            f' Joint run: {len(live)} of {len(runs)} students, one teacher forward per batch.' if len(runs) > 1 else ''))

    restore_signal_handlers = install_signal_handlers()
    timer = StepTimer(start_epoch * updates_per_epoch + resume_batch // args.grad_accum_steps,
                      num_epochs * updates_per_epoch, args.world_size)
    measure_balance = args.loss_balance_factor > 0 and not any(r.resume_path for r in live) and start_epoch == 0 \
        and args.labels != 'none'  # without a label loss there is no reference term to weigh the others against
    exit_code = 0
    try:
        for epoch in range(start_epoch, num_epochs):
            start_data_epoch(epoch, dataset_train, loader_train, mixup_fn, args)  # sampler epoch, --mixup-off-epoch
            metrics = train_one_epoch(epoch, runs, loader_train, args, device, amp_autocast, mixup_fn, timer,
                                      position, memo, measure_balance=measure_balance and epoch == start_epoch)
            if metrics is None:  # stopped by a signal; every live student's recovery checkpoint was written
                exit_code = EXIT_PREEMPTED if any(r.live for r in live) else EXIT_FATAL
                break
            end_epoch(epoch, runs, metrics, loader_eval, args, device, amp_autocast, eval_metric, num_epochs)
            position.next_epoch()
            if not any(r.live for r in live):
                break
    except KeyboardInterrupt:
        exit_code = EXIT_PREEMPTED
    finally:
        restore_signal_handlers()
        for r in live:
            if r.writer is not None:
                r.writer.close()
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()
    report_students(args, runs)
    if exit_code == 0 and any(not r.live for r in runs):
        exit_code = EXIT_FATAL  # a student stopped: the run says so in its exit code
    return exit_code


def skip_stopped_students(args, runs):
    """``--resume auto`` of a joint run leaves a student that stopped alone (its folder's stop marker) stopped,
    saying so; the others resume. Rank 0's view of the markers, on every rank."""
    if len(runs) == 1 or args.resume != 'auto':
        return runs
    markers = [read_stop_marker(r.output_dir) for r in runs]
    if args.distributed:
        dist.broadcast_object_list(markers, src=0)
    for r, m in zip(runs, markers):
        if m is not None:
            r.error = f"stopped at epoch {m.get('epoch')} batch {m.get('batch')}: {m.get('reason')}"
            if utils.is_primary(args):
                _logger.warning(f'Student {r.name} {r.error}. --resume auto leaves it stopped and resumes the others; '
                                f'to continue it, resume its folder alone: python train_kd.py --config '
                                f'{os.path.join(r.output_dir, "args.yaml")} --resume auto')
    return runs


def build_students(args, runs, device, in_chans, amp_dtype):
    """Each student built as its solo run builds it (the same RNG stream from the same point: equal initial weights
    and projectors) around one teacher shared by all; on the device, channels_last, the teacher held in bf16, and
    sync-bn. Returns the data config every student takes and, with several students, the teacher memo."""
    rng_start = get_rng_state()
    teacher, data_config = None, None
    for r in runs:
        set_rng_state(rng_start)
        a = r.args
        for k in ('num_classes', 'labels', 'val_labelled', 'val_classes'):  # what the data folders say
            setattr(a, k, getattr(args, k))
        model = create_student(a, in_chans)
        cfg = resolve_data_config(vars(a), model=model, verbose=utils.is_primary(a) and data_config is None)
        if data_config is not None and any(cfg[k] != data_config[k] for k in SHARED_DATA):
            diff = ', '.join(f'{k} {cfg[k]} vs {data_config[k]}' for k in SHARED_DATA if cfg[k] != data_config[k])
            raise FatalError(f'students {runs[0].args.model} and {a.model} take different inputs ({diff}); a joint run '
                             f'feeds one batch to all: set --img-size / --mean / --std / --interpolation / --crop-pct')
        data_config = data_config or cfg
        if r.output_dir is None:  # a solo run's folder is named after its model and input size
            r.output_dir = _output_dir(a, tuple(cfg['input_size'][-2:]))
            r.name = os.path.basename(r.output_dir)
        if a.distiller != 'none' and teacher is not None:
            replay_teacher_init(a, in_chans)  # the RNG draws the solo run makes for its teacher
        r.task = create_task(a, model, cfg, device, in_chans, teacher=teacher)
        if a.distiller != 'none' and teacher is None:
            teacher = r.task.teacher.model
    for r in runs:  # every student built (each checks the shared teacher as it was created), then on the device
        a = r.args
        r.task.to(device=device)
        if args.channels_last:  # the teacher too
            r.task.to(memory_format=torch.channels_last)
        if args.amp and amp_dtype == torch.bfloat16 and hasattr(r.task, 'hold_teacher'):
            r.task.hold_teacher(amp_dtype)  # frozen weights cast once, not by autocast in every call
        if args.distributed and args.sync_bn:
            a.dist_bn = args.dist_bn = ''
            student = r.task.get_eval_model()
            assert convert_sync_batchnorm(student) is student, 'sync-bn conversion must happen in place'
            if utils.is_primary(args):
                _logger.info(f'Converted the BatchNorm layers of {a.model} to SyncBatchNorm (projectors keep local BN).')
    memo = TeacherMemo(teacher) if teacher is not None and len(runs) > 1 else None
    return data_config, memo


def replay_teacher_init(a, in_chans) -> None:
    """Create (and drop) the teacher's architecture without weights: the random draws of its initialisation, which
    the solo run makes between its student and its task (so a student's projectors start as in its solo run)."""
    resolve_teacher_img_size(a)
    try:
        head = check_teacher_head(a, a.num_classes)
        kwargs = dict(a.teacher_kwargs, **({'img_size': a.teacher_img_size} if a.teacher_img_size else {}))
        create_model(a.teacher, pretrained=False, num_classes=head or a.num_classes, in_chans=in_chans, **kwargs)
    except TeacherLoadError as e:
        raise FatalError(str(e)) from None


def setup_students(args, runs, device, amp_dtype):
    """Each student's learning rate, optimizer and loss scaler, run folder lock, resume (student, projectors,
    optimizer, scaler, then the exact-resume state), EMA, DDP and compile. Returns where training starts."""
    use_scaler = args.amp and amp_dtype == torch.float16 and device.type == 'cuda'
    for r in runs:
        a = r.args
        if a.lr is None:  # from --lr-base and the global batch: recorded in the student's own args
            resolve_lr(a)
        r.optimizer = create_optimizer_v2(r.task.get_trainable_module(), **optimizer_kwargs(cfg=a), **a.opt_kwargs,
                                          **fused_optimizer_kwargs(a.opt, device, a.opt_kwargs))
        r.loss_scaler = utils.NativeScaler(device=device.type) if use_scaler else None
        r.config = run_config(a, RESUME_FREE_KEYS)
        hold_run_lock(r.output_dir, a)  # one job per run folder; a new run never writes into a folder holding one
    if len(runs) == 1 and args.resume:
        runs[0].resume_path = find_resume(args.resume, runs[0].output_dir)
        marker = os.path.join(runs[0].output_dir, STOP_MARKER)
        if runs[0].resume_path and os.path.isfile(marker) and utils.is_primary(args) and not args.dry_run:
            os.remove(marker)  # a student a joint run had stopped, continued alone: it trains again
            _logger.info(f'{runs[0].output_dir}: a joint run had stopped this student; resumed alone, it trains again')
    elif args.resume == 'auto':
        resume_positions(runs)  # the newest position every healthy student's folder holds
    start = None
    for r in runs:
        a = r.args
        check_same_resume(r.resume_path, args.distributed)
        epoch, batch, r.extras = resume_checkpoint(a, r.task, r.optimizer, r.loss_scaler, r.resume_path, r.config)
        start = start or (epoch, batch, r.extras)  # healthy students resume at one position
        if utils.is_primary(args) and r.resume_path and not args.dry_run:  # rows of epochs trained again
            truncate_summary(os.path.join(r.output_dir, 'summary.csv'), start[0])
        if args.model_ema:  # exponential moving average of the trainable module (student + projectors)
            r.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                             device='cpu' if args.model_ema_force_cpu else None)
            if r.resume_path:
                load_task_ema_checkpoint(r.task, r.resume_path)
        if args.distributed:  # DDP wraps the trainable module only, never the teacher
            r.task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                       **(dict(broadcast_buffers=False) if args.no_ddp_bb else {}))
        if args.torchcompile:  # after DDP, so that its all-reduce overlaps the compiled backward
            r.task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
            r.task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    return start


def start_outputs(args, runs, eval_metric, start_epoch, resume_batch, num_batches, device):
    """Each student's checkpoint saver, args.yaml and TensorBoard writer (rank 0), LR schedule (a mid-epoch resume
    continues at the update after the checkpoint) and non-finite guard; returns the number of epochs."""
    updates_per_epoch = (num_batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    for r in runs:
        a = r.args
        if utils.is_primary(args):
            check_output_dir(r.output_dir)
            r.saver = RunSaver(model=r.task.get_eval_model(), optimizer=r.optimizer, args=a, amp_scaler=r.loss_scaler,
                               checkpoint_dir=r.output_dir, recovery_dir=r.output_dir,
                               decreasing=eval_metric == 'loss', max_history=args.checkpoint_hist, task=r.task,
                               run_config=r.config)
            if r.resume_path and os.path.dirname(os.path.abspath(r.resume_path)) == os.path.abspath(r.output_dir):
                r.saver.load_state_dict_from_checkpoint(r.resume_path)
                r.saver.adopt_recovery(r.resume_path)  # rotated away by the next recovery saves
            with open(os.path.join(r.output_dir, 'args.yaml'), 'w') as f:
                f.write(r.text + identity_yaml(a))
            r.writer = tensorboard_writer(r.output_dir, r.resume_path, start_epoch, resume_batch, num_batches, a)
            _logger.info(f'Output folder: {r.output_dir}')
        r.scheduler, num_epochs = create_scheduler_v2(
            r.optimizer, **scheduler_kwargs(a, decreasing_metric=eval_metric == 'loss'),
            updates_per_epoch=updates_per_epoch)
        if r.scheduler is not None and (start_epoch > 0 or resume_batch):
            if args.sched_on_updates:
                r.scheduler.step_update(start_epoch * updates_per_epoch + resume_batch // args.grad_accum_steps)
            else:
                r.scheduler.step(start_epoch)
        r.guard = NonFiniteGuard(args.nonfinite, args.nonfinite_max_skips, distributed=args.distributed, device=device)
        r.guard.skipped = (r.extras or {}).get('nonfinite_skipped', 0)
    return num_epochs


def setup_device(args):
    """Device, distributed process group (with a collective timeout), TF32; logs the code and library versions."""
    if args.device.startswith('cuda') and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    with collective_timeout(args.dist_timeout):
        device = utils.init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Training in distributed mode with {args.world_size} processes '
                     f'(rank {args.rank}, device {args.device}).')
    else:
        _logger.info(f'Training with a single process on device {args.device}.')
    if utils.is_primary(args):
        _logger.info(f'Code: {code_version()}, torch {torch.__version__}, timm {timm.__version__}')
    assert args.rank >= 0
    if args.aug_repeats and not args.distributed:
        raise FatalError(f'--aug-repeats {args.aug_repeats:g} needs distributed training (timm\'s RepeatAugSampler); '
                         f'launch with ./distributed_train.sh N ... or drop --aug-repeats')
    if args.sync_bn and args.distributed and device.type == 'cpu':
        raise FatalError('--sync-bn needs GPUs (torch SyncBatchNorm does not run on CPU); drop --sync-bn for CPU runs')
    check_precision(args.amp, args.amp_dtype, device)  # bf16 on a GPU without it, a compiler that does not work:
    check_compile(args.torchcompile, args.torchcompile_mode, device)  # stop here, not inside the first step
    return device


def create_student(args, in_chans):
    """The student (timm's create_model with the run's flags); a hub that cannot be reached stops with a message."""
    try:
        model = create_model(
            args.model, pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes,
            drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
            bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, checkpoint_path=args.initial_checkpoint or None,
            **({'pretrained_cfg_overlay': dict(file=args.pretrained_path)} if args.pretrained_path else {}),
            **student_create_kwargs(args), **args.model_kwargs,
        )
        model = adapt_student(model, args)  # --head-init-scale/-bias, --split-bn (timm's helpers)
    except (OSError, ValueError) as e:  # hub offline / not found, a local-dir: folder without weights
        raise FatalError(f"--model '{args.model}' cannot be created ({short(e)}); check the name, the network (hub "
                         f"weights) or the folder") from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if utils.is_primary(args):
        head = model.pretrained_cfg.get('num_classes') if args.pretrained and not args.pretrained_path else None
        note = f' (its pretrained head had {head} classes: re-initialised for {model.num_classes})' \
            if head and head != model.num_classes else ''
        _logger.info(f'Student {safe_model_name(args.model)} created, param count: '
                     f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M{note}')
    return model


def create_task(args, model, data_config, device, in_chans, teacher=None):
    """The frozen teacher (for a distiller; ``teacher``: one already built) and the training task around ``model``."""
    if args.distiller == 'none':
        teacher = None
    elif teacher is None:
        resolve_teacher_img_size(args)
        try:  # a head for other classes than the data's stops here, unless no logit is used (then it is kept)
            head = check_teacher_head(args, args.num_classes)
            teacher = create_teacher(
                args.teacher, num_classes=head or args.num_classes, in_chans=in_chans,
                checkpoint=args.teacher_checkpoint or None, img_size=args.teacher_img_size, **args.teacher_kwargs)
        except TeacherLoadError as e:
            raise FatalError(str(e)) from None
    img_size = tuple(data_config['input_size'][-2:])
    settle_models(args, model, teacher, img_size, in_chans, device)  # same teacher on every rank; sizes they take
    task = checked_build_task(  # a pair the distiller cannot set up (e.g. no ScaleKD grids) stops with one message
        args, img_size, args.distiller, model, teacher, criterion_kwargs=criterion_kwargs(args), device=device,
        **task_kwargs(args, img_size), mean=data_config['mean'], std=data_config['std'],
    )
    if utils.is_primary(args) and teacher is not None:
        n_extra = sum(p.numel() for p in task.get_trainable_module().parameters()) - \
            sum(p.numel() for p in model.parameters())
        _logger.info(f'Teacher {args.teacher}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M params '
                     f'(frozen, {args.teacher_mode} mode); distillation adds {n_extra / 1e6:.2f} M trained params')
        _logger.info('Weights: ' + identity_yaml(args).strip().replace('\n', '  '))
        _logger.info(describe_kd_settings(args))  # effective temperature and weights, and whose defaults
        for k, w in getattr(task, 'loss_weights', {}).items():
            _logger.info(f'  loss weight {k}: {w:g}')
    if hasattr(task, 'check_geometry'):  # ScaleKD: log the grids, refuse a term that is constant by construction
        task.check_geometry(args.scalekd_allow_degenerate, _logger if utils.is_primary(args) else None)
    if args.unlabeled_data or args.labels == 'none':  # the label loss over the labelled samples only (or none)
        task.criterion = LabelledOnly(task.criterion, labels=args.labels != 'none')
    return task


def unlabeled_problem(args) -> str:
    """Why --unlabeled-data / --labels none cannot run with these flags ('' when they can)."""
    flag = '--labels none' if args.labels == 'none' else '--unlabeled-data' if args.unlabeled_data else ''
    if not flag:
        return ''
    if args.distiller == 'none':
        return (f'{flag} needs a teacher: images without labels teach the student only through it; pass --distiller '
                f'kd, dist, scalekd or feature with --teacher NAME')
    if args.dataset and args.dataset.split('/')[0] not in ('', 'folder'):
        return f'{flag} works with an ImageFolder --data-dir, not --dataset {args.dataset}'
    if getattr(args, 'jsd_loss', False):
        return f'{flag} with --jsd-loss: the JSD label loss cannot skip the samples without a label; drop --jsd-loss'
    if args.labels == 'none' and args.distiller == 'token':
        return ('--labels none with --distiller token: its class token learns from labels; use kd, dist, scalekd or '
                'feature')
    return ''


def classes_from_teacher(args, runs) -> int:
    """--labels none: the class count of the teacher's head (its pretrained config or checkpoint), checked against a
    labelled validation split."""
    a = next(r.args for r in runs if r.args.distiller != 'none')
    classes, where = teacher_head(a.teacher, a.teacher_checkpoint or None)
    if classes is None:
        raise FatalError(f'--labels none takes the class count from the teacher\'s head, and {a.teacher} names none '
                         f'(no pretrained tag or checkpoint); pass --num-classes N, the classes of its head')
    if args.val_classes is not None and args.val_classes != classes:
        raise FatalError(f'the teacher\'s head has {classes} classes ({where}) but the validation split has '
                         f'{args.val_classes} class folders; validate on the teacher\'s classes or drop --val-split')
    if utils.is_primary(args):
        _logger.info(f'--labels none: no label is read; {classes} classes from the teacher\'s head ({where})')
    return classes


def eval_metric_of(args, loader_eval) -> str:
    """The metric model_best is chosen on: --eval-metric; the loss without validation; teacher agreement when the
    validation split has no labels."""
    if loader_eval is None:
        return 'loss'
    if not args.val_labelled and args.eval_metric in ('top1', 'top5', 'loss'):
        if utils.is_primary(args):
            _logger.info('The validation split has no labels: the student is validated by its agreement with the '
                         'teacher and KL(teacher || student); model_best is chosen on agreement (agree_top1)')
        return 'agree_top1'
    return args.eval_metric


def resolve_lr(args):
    """args.lr from --lr-base scaled by the global batch (timm's rule: linear, sqrt for adaptive optimizers)."""
    global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
    batch_ratio = global_batch_size / args.lr_base_size
    if not args.lr_base_scale:
        on = args.opt.lower()
        args.lr_base_scale = 'sqrt' if any(o in on for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        batch_ratio = batch_ratio ** 0.5
    args.lr = args.lr_base * batch_ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) '
                     f'and effective global batch size ({global_batch_size}) with {args.lr_base_scale} scaling.')


def resume_checkpoint(args, task, optimizer, loss_scaler, resume_path, config):
    """Load ``resume_path`` (if any) into the task, optimizer and scaler.

    Returns (first epoch, first batch in it, the checkpoint's exact-resume state or None): --start-epoch,
    else the epoch after the checkpoint's, or for a recovery checkpoint the next unseen batch of its epoch.
    """
    resume_epoch, extras = None, None
    if resume_path:
        try:
            resume_epoch = resume_task_checkpoint(
                task, resume_path, optimizer=None if args.no_resume_opt else optimizer,
                loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args))
        except FileNotFoundError:
            raise FatalError(f"--resume checkpoint '{resume_path}' does not exist") from None
        except RuntimeError as e:
            raise FatalError(f"--resume checkpoint '{resume_path}' does not fit this run: {str(e)[:500]}") from None
        defaults = {a.dest: a.default for a in build_parser()._actions}  # flags newer than the checkpoint
        extras = load_state_extras(resume_path, config, rank=args.rank, world_size=args.world_size,
                                   force=args.resume_force, defaults=defaults)
    start_epoch = args.start_epoch if args.start_epoch is not None else resume_epoch or 0
    if extras is not None and extras.get('batch_idx') is not None:
        # a mid-epoch (recovery) checkpoint: continue inside its epoch, at the next unseen batch
        start_epoch, resume_batch = extras['epoch'], extras['batch_idx'] + 1
        if resume_batch % args.grad_accum_steps:
            raise FatalError('a recovery checkpoint inside a gradient-accumulation group cannot be resumed exactly')
        return start_epoch, resume_batch, extras
    return start_epoch, 0, extras


def write_summary(epoch, train_metrics, eval_metrics, optimizer, task, args, writer, output_dir, has_eval):
    """One summary.csv row (an epoch without validation keeps the eval columns, empty), the eval scalars, curves.png."""
    lrs = [pg['lr'] for pg in optimizer.param_groups]
    row_eval = eval_metrics
    if eval_metrics is None and has_eval:
        row_eval = OrderedDict((k, '') for k in eval_columns(task, args))
    summary = os.path.join(output_dir, 'summary.csv')
    append_summary(summary, epoch, train_metrics, row_eval, lr=sum(lrs) / len(lrs))  # widens an older header
    for k, v in (eval_metrics or {}).items():
        writer.add_scalar(f'eval/{k}', v, epoch)
    writer.flush()
    if not args.no_plot:  # curves.png from summary.csv; a failure is a warning
        write_curves(summary, os.path.join(output_dir, 'curves.png'), title=os.path.basename(output_dir))


def _output_dir(args, img_size):
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(img_size[-1])])
    return os.path.join(args.output or './output/train', exp_name)


def end_epoch(epoch, runs, metrics, loader_eval, args, device, amp_autocast, eval_metric, num_epochs):
    """After an epoch, each live student alone: BatchNorm statistics across ranks, validation, its summary row,
    checkpoints and LR schedule; an error it meets stops it, the others go on."""
    for r, train_metrics in zip(runs, metrics):
        if not r.live:
            continue
        try:
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                utils.distribute_bn(r.task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
            eval_metrics = None
            if loader_eval is not None and ((epoch + 1) % args.val_interval == 0 or epoch + 1 == num_epochs):
                if utils.is_primary(args) and len(runs) > 1:
                    _logger.info(f'Student {r.name}:')
                eval_metrics = validate_task(r.task, loader_eval, r.args, device, amp_autocast, logger=_logger)
            if utils.is_primary(args):
                write_summary(epoch, train_metrics, eval_metrics, r.optimizer, r.task, r.args, r.writer, r.output_dir,
                              has_eval=loader_eval is not None)
                metric = eval_metrics[eval_metric] if eval_metrics else None
                r.best_metric, r.best_epoch = r.saver.save_checkpoint(
                    epoch, metric=metric, run_state=dict(nonfinite_skipped=r.guard.skipped))
            if r.scheduler is not None:
                r.scheduler.step(epoch + 1, eval_metrics[eval_metric] if eval_metrics else None)
        except FatalError as e:
            stop_student(r, runs, e, epoch, -1, 'at the end of the epoch')


def stop_student(r, runs, e, epoch, batch_idx, where):
    """``r`` stops (its non-finite policy, or an error of its own); the others go on. In a joint run its folder gets
    a stop marker, so ``--resume auto`` of the joint run leaves it stopped."""
    r.error = f'{e} ({where})'
    if len(runs) > 1:
        _logger.error(f'Student {r.name} stopped, the other students go on: {e}')
        if utils.is_primary(r.args):
            write_stop_marker(r.output_dir, str(e), epoch, batch_idx)
    else:
        log_startup_error(_logger, e)
    r.optimizer.zero_grad()


def report_students(args, runs):
    if not utils.is_primary(args):
        return
    for r in runs:
        if len(runs) == 1 and r.best_metric is not None:
            _logger.info(f'*** Best metric: {r.best_metric} (epoch {r.best_epoch})')
        elif len(runs) > 1:
            state = f'stopped: {r.error}' if r.error else f'best metric {r.best_metric} (epoch {r.best_epoch})'
            _logger.info(f'*** Student {r.name}: {state}')


def student_step(r, input, target, args, amp_autocast, need_update, accum, num_updates):
    """One student's forward, backward, gradient norm and clip, non-finite policy and optimizer step (with
    gradient accumulation); True when its update is skipped. --nonfinite skip past its limit raises FatalError."""
    with r.stream, (r.task.no_sync() if args.distributed and not need_update else suppress()):
        with amp_autocast():
            out = r.task(input, target)
        terms = OrderedDict((k, v.detach()) for k, v in out.items() if k.startswith('loss'))
        loss = out['loss'] / accum
        del out
        a = r.args
        clip_params = partial(r.task.get_clip_parameters, exclude_head='agc' in a.clip_mode)
        skip = False
        if r.loss_scaler is not None:
            skip = r.guard.skip_update(terms, num_updates)
            if not skip:
                r.loss_scaler(loss, r.optimizer, clip_grad=a.clip_grad, clip_mode=a.clip_mode,
                              parameters=clip_params(), need_update=need_update)
        else:
            loss.backward()
            if need_update:  # one gradient norm per update: non-finite check, --clip-grad and the log line
                r.grad_norm = norm_and_clip(r.task.get_trainable_module().parameters(), a.clip_grad, a.clip_mode,
                                            clip_params())
                norm = {} if r.grad_norm is None else {'gradient': r.grad_norm}
                skip = r.guard.skip_update(dict(terms, **norm), num_updates)
                if not skip:
                    r.optimizer.step()
    r.sums.add(terms, input.shape[0])
    if need_update:
        r.optimizer.zero_grad()
        if not skip:
            r.task.update_ema(step=num_updates + 1)
    return skip


def train_one_epoch(epoch, runs, loader, args, device, amp_autocast, mixup_fn, timer, position, memo=None,
                    measure_balance=False):
    """One epoch of every live student on the same batches (one student: a solo run); [metrics per student], or
    None when a stop signal ended it (each live student's recovery checkpoint written). ``position``
    (runtime.resume.EpochPosition) resumes inside the epoch from a recovery checkpoint (skip + RNG replay)."""
    # every epoch starts from its own seed, so a resumed run sees the same sampler order and worker seeds
    utils.random_seed(args.seed + epoch * 4099, args.rank)
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    last_accum_steps = num_batches % accum_steps or accum_steps
    last_batch_idx_to_accum = num_batches - last_accum_steps
    num_updates = epoch * updates_per_epoch + position.start_batch // accum_steps
    start_students(epoch, runs, position, args, device)
    counts = (memo.runs, memo.hits) if memo is not None else (0, 0)
    timer.start_epoch()
    for batch_idx, (input, target) in enumerate(loader):
        if position.skip(batch_idx):  # resumed mid-epoch: this batch was trained before the stop
            timer.restart()
            continue
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        accum = last_accum_steps if batch_idx >= last_batch_idx_to_accum else accum_steps
        input, target = device_batch(input, target, args, device, mixup_fn)
        timer.data_ready()
        with memo.batch() if memo is not None else suppress():  # one teacher forward for every student
            for r in [r for r in runs if r.live]:
                if measure_balance and batch_idx == 0:
                    log_loss_balance(r.args, r.task, input, target, amp_autocast, r.output_dir)
                try:
                    student_step(r, input, target, args, amp_autocast, need_update, accum, num_updates)
                except FatalError as e:  # --nonfinite skip past its limit: this student stops
                    stop_student(r, runs, e, epoch, batch_idx, f'epoch {epoch} batch {batch_idx}')
        timer.samples += input.shape[0]
        if not any(r.live for r in runs):
            return [None] * len(runs)
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
            log_students(epoch, batch_idx, updates_per_epoch, num_updates, runs, timer, accum_steps, args)
        # a stop signal: agreed on every update in one process, across ranks at log points and every 10 updates
        stop = stop_requested(args.distributed, device) if not args.distributed or log_now or \
            num_updates % 10 == 0 else False
        check_bad_images(loader, device, now=log_now or num_updates % 10 == 0)  # --max-bad-images: all ranks
        if stop or (args.recovery_interval and num_updates % args.recovery_interval == 0 and not last_batch):
            save_recovery(epoch, batch_idx, runs, position, args)
            if stop:
                if utils.is_primary(args) and any(r.live for r in runs):
                    _logger.warning(f'Stopped at epoch {epoch} batch {batch_idx}; recovery checkpoint'
                                    f'{"s written for every student" if len(runs) > 1 else " written"}. '
                                    f'Continue with --resume auto (exit code {EXIT_PREEMPTED}).')
                return None
        if not any(r.live for r in runs):
            return [None] * len(runs)
        for r in runs:
            if r.live and r.scheduler is not None:
                r.scheduler.step_update(num_updates=num_updates, metric=None)
        position.batch_done()
        timer.next_batch()

    if memo is not None and utils.is_primary(args):
        _logger.info(f'Epoch {epoch}: the teacher ran {memo.runs - counts[0]} times for '
                     f'{memo.runs - counts[0] + memo.hits - counts[1]} student steps')
    return [end_train_metrics(r, timer) for r in runs]


def start_students(epoch, runs, position, args, device):
    """At an epoch's start: each live student in train mode, its loss sums, its own RNG stream (several students;
    resumed inside this epoch: the saved sums and stream) and no gradient."""
    for r in runs:
        if not r.live:
            continue
        r.task.train()
        saved = (r.extras or {}) if position.start_batch else {}
        r.sums = TermSums(device, args.distributed, saved.get('epoch_sums'), primary=utils.is_primary(args))
        r.stream = StudentStream(own_stream(saved.get('student_rng'), args.rank, args.world_size, r.name),
                                 enabled=len(runs) > 1)
        r.optimizer.zero_grad()


def log_students(epoch, batch_idx, updates_per_epoch, num_updates, runs, timer, accum_steps, args):
    """A log step: each live student's non-finite check (abort policy: it stops alone) and its console line."""
    update_idx = batch_idx // accum_steps
    teacher_ms = [r.task.pop_teacher_ms() for r in runs if r.live and hasattr(r.task, 'pop_teacher_ms')]
    teacher_ms = sum(t or 0. for t in teacher_ms) if any(t is not None for t in teacher_ms) else None
    first = True
    for r in runs:
        if not r.live:
            continue
        try:
            r.guard.flush()  # abort policy: a non-finite term of any update since the last check stops here
        except FatalError as e:
            stop_student(r, runs, e, epoch, batch_idx, f'epoch {epoch} update {update_idx}')
            continue
        timer.grad_norm = r.grad_norm
        if utils.is_primary(args) and len(runs) > 1:
            _logger.info(f'Student {r.name}:')
        log_train_step(epoch, update_idx, updates_per_epoch, num_updates, r.sums.means(), r.optimizer, timer,
                       r.writer, teacher_ms if first else None, accum_steps, primary=utils.is_primary(args))
        first = False


def save_recovery(epoch, batch_idx, runs, position, args):
    """A recovery point or a stop: each live student's non-finite check (a student that fails it stops alone and
    gets no recovery file), then its recovery checkpoint with the exact-resume state."""
    rng = position.rng_states(args.distributed)
    for r in runs:
        if not r.live:
            continue
        try:
            r.guard.flush()
        except FatalError as e:
            stop_student(r, runs, e, epoch, batch_idx, f'epoch {epoch} batch {batch_idx}')
            continue
        state = dict(**rng, epoch_sums=r.sums.state(), nonfinite_skipped=r.guard.skipped)
        if len(runs) > 1:  # each student's own RNG stream, of every rank
            state['student_rng'] = gather(args.distributed, r.stream.state)
        if r.saver is not None:
            r.saver.save_recovery(epoch, batch_idx, run_state=state)


def end_train_metrics(r, timer):
    """A live student's epoch metrics (loss means over ranks, img/s, data wait, skipped updates); None if stopped."""
    if not r.live:
        return None
    if hasattr(r.optimizer, 'sync_lookahead'):
        r.optimizer.sync_lookahead()
    return OrderedDict(r.sums.means(), img_per_s=timer.images_per_s.avg, data_time=timer.data.avg,
                       nonfinite_skipped=r.guard.skipped)


if __name__ == '__main__':
    sys.exit(main())
