"""The distillation flags and the one bridge from them to a task's keyword arguments.

A new distiller: its task class in its own file, one line in ``DISTILLERS`` (distillers/__init__.py),
its flags in ``add_distill_args``, their checks in ``check_distill_args`` and their mapping in
``task_kwargs`` (all here). Nothing outside ``distillers/`` changes: train_kd.py and the benchmark call
these functions. ``criterion_kwargs`` maps timm's loss flags to the student's own loss.
"""
import argparse
import os
from typing import Any, Dict, Tuple

from timm import utils

from .balance import DEFAULT_FACTOR
from runtime.errors import FatalError
from .base import TEACHER_MODES
from .dist import PAPER_IMAGENET as DIST_PAPER
from .distill_token import DISTILL_TYPES as TOKEN_TYPES
from . import DISTILLERS


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """The "Distillation parameters" group of train_kd.py (dest names are the recipe keys)."""
    group = parser.add_argument_group('Distillation parameters')
    group.add_argument('--distiller', default='none', type=str, choices=sorted(DISTILLERS),
                       help='distillation method (default: none)')
    group.add_argument('--teacher', default='', type=str, metavar='NAME',
                       help='teacher timm model name; with a pretrained tag and no --teacher-checkpoint its hub '
                            'weights are loaded, e.g. swin_large_patch4_window7_224.ms_in22k_ft_in1k')
    group.add_argument('--teacher-checkpoint', default='', type=str, metavar='PATH',
                       help='teacher weights from a local file (.pth/.pth.tar/.safetensors), loaded strictly')
    group.add_argument('--teacher-img-size', type=int, default=None, metavar='N',
                       help='teacher input size; the student batch is resized when it differs (default: same)')
    group.add_argument('--teacher-mode', default='eval', type=str, choices=TEACHER_MODES,
                       help='teacher mode during distillation; the official code left it in train mode '
                            '(drop-path active) (default: eval)')
    group.add_argument('--teacher-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                       help='extra teacher model kwargs, e.g. drop_path_rate=0.1')
    group.add_argument('--kd-temperature', type=float, default=1.0, metavar='T',
                       help='temperature of the logit terms: kd, dist (its tau) and token soft (default: 1.0)')
    group.add_argument('--kd-weight', type=float, default=0.5, metavar='W',
                       help='logit KD weight; the student loss gets 1 - W (default: 0.5)')
    # DIST (Huang et al., NeurIPS 2022): the paper's ImageNet weights; its tau is --kd-temperature
    for name, what in (('alpha', 'student loss'), ('beta', 'inter-class relation'), ('gamma', 'intra-class relation')):
        group.add_argument(f'--dist-{name}', type=float, default=DIST_PAPER[name], metavar='W',
                           help=f'DIST {what} weight {name} (default: {DIST_PAPER[name]:g}, the paper\'s ImageNet '
                                f'value)')
    group.add_argument('--token-distill-type', default='soft', type=str, choices=TOKEN_TYPES,
                       help='DeiT distillation-token loss: soft (KL at --kd-temperature) or hard (CE with the '
                            'teacher\'s top-1 class) (default: soft, as timm)')
    # per-stage weight pairs as the paper and the official configs give them (stage 3 = the TPP proxy path)
    for stage, path in (('s3', 'stage-3 (proxy path)'), ('s4', 'stage-4')):
        group.add_argument(f'--scalekd-alpha-{stage}', type=float, nargs=2, default=[0.08, 0.06],
                           metavar=('DIRECT', 'ALT'),
                           help=f'{path} feature weights, direct and DC-removed views (default: 0.08 0.06)')
    for stage in ('3', '4'):
        group.add_argument(f'--scalekd-heads-s{stage}', type=int, default=8, metavar='N',
                           help=f'attention heads of the stage-{stage} projectors (default: 8)')
    group.add_argument('--scalekd-softmax-scale', type=float, nargs=2, default=[5.0, 5.0], metavar=('DIRECT', 'ALT'),
                       help='attention logit scale of the direct-view and of the alternative-view projectors (both '
                            'stages; one value per view, as the official code reads the pair) (default: 5 5)')
    group.add_argument('--scalekd-cap-norm', default='bn', type=str, choices=('bn', 'ln'),
                       help='norm in the projector stem: BatchNorm2d or channel LayerNorm (default: bn)')
    group.add_argument('--scalekd-student-s3', type=int, default=None, metavar='IDX',
                       help='student stage-3 tap: forward_intermediates index (default: from feature_info)')
    group.add_argument('--scalekd-student-s4', type=int, default=None, metavar='IDX',
                       help='student stage-4 tap index (default: the final, normed features)')
    group.add_argument('--scalekd-tail-blocks', type=int, default=None, metavar='N',
                       help='blocks in the teacher tail for ViT/EVA teachers (default: depth // 12)')
    group.add_argument('--scalekd-dfm-norm', default='safe', type=str, choices=('safe', 'official'),
                       help='channel normalisation in the alternative (mean-removed) view: safe = no gradient at '
                            'positions that are zero up to rounding, otherwise identical to F.normalize; official = '
                            'F.normalize, whose gradient there is of order 1/eps (default: safe)')
    group.add_argument('--scalekd-allow-degenerate', action='store_true', default=False,
                       help='train even when an alternative-view term is constant by construction (a student map '
                            'with a single position); by default such a run is refused before step 0')
    group.add_argument('--loss-balance-factor', type=float, default=DEFAULT_FACTOR, metavar='F',
                       help='before the first update, log the gradient norm each loss term sends into the student '
                            'and warn when one exceeds F x the student loss\'s (0: skip the measurement) '
                            f'(default: {DEFAULT_FACTOR:g})')


def task_kwargs(args: argparse.Namespace, img_size: Tuple[int, int]) -> Dict[str, Any]:
    """The one place where flags become distiller keyword arguments."""
    if args.distiller == 'none':
        return {}
    kw = dict(teacher_mode=args.teacher_mode,
              teacher_img_size=(args.teacher_img_size,) * 2 if args.teacher_img_size else None)
    # timm's --distill-loss-weight / --task-loss-weight where the parser has them (None: timm's defaults, 1 and 1)
    timm_weights = dict(distill_loss_weight=getattr(args, 'distill_loss_weight', None),
                        task_loss_weight=getattr(args, 'task_loss_weight', None))
    if args.distiller in ('kd', 'scalekd'):
        kw.update(kd_weight=args.kd_weight, kd_temperature=args.kd_temperature)
    if args.distiller == 'dist':
        kw.update(dist_alpha=args.dist_alpha, dist_beta=args.dist_beta, dist_gamma=args.dist_gamma,
                  kd_temperature=args.kd_temperature)
    elif args.distiller == 'feature':
        kw.update(timm_weights)
    elif args.distiller == 'token':
        kw.update(distill_type=args.token_distill_type, kd_temperature=args.kd_temperature, **timm_weights)
    elif args.distiller == 'scalekd':
        kw.update(img_size=img_size, student_s3=args.scalekd_student_s3, student_s4=args.scalekd_student_s4,
                  alpha_s3=args.scalekd_alpha_s3, alpha_s4=args.scalekd_alpha_s4, heads_s3=args.scalekd_heads_s3,
                  heads_s4=args.scalekd_heads_s4, softmax_scale=args.scalekd_softmax_scale,
                  cap_norm=args.scalekd_cap_norm, tail_blocks=args.scalekd_tail_blocks,
                  dfm_norm=args.scalekd_dfm_norm)
    return kw


def criterion_kwargs(args):
    """The student's own loss, through timm's create_classification_loss."""
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if args.bce_loss:
        return dict(loss_type='bce', soft_targets=mixup_active, smoothing=args.smoothing,
                    bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, pos_weight=args.bce_pos_weight)
    return dict(loss_type='ce', soft_targets=mixup_active, smoothing=args.smoothing)


def check_distill_args(parser_error, args: argparse.Namespace) -> None:
    """Distillation flags that contradict each other stop at parse time (``parser_error`` exits)."""
    if args.distiller != 'none' and not args.teacher:
        parser_error(f'--distiller {args.distiller} needs a teacher: pass --teacher NAME (and --teacher-checkpoint '
                     f'PATH for local weights)')
    if args.distiller == 'none' and (args.teacher or args.teacher_checkpoint):
        parser_error(f'--teacher is set but --distiller is none; pass one of --distiller '
                     f'{", ".join(d for d in DISTILLERS if d != "none")}')
    if args.teacher_checkpoint and not os.path.isfile(args.teacher_checkpoint):
        parser_error(f"--teacher-checkpoint '{args.teacher_checkpoint}' does not exist")
    if args.distiller == 'dist' and args.batch_size < 2:
        parser_error(f'--distiller dist needs -b 2 or more: its intra-class term correlates each class\'s '
                     f'probabilities across the images of one process\'s batch (got -b {args.batch_size})')
    if args.distiller == 'scalekd' and args.layer_decay is not None:
        parser_error('--layer-decay is not supported with --distiller scalekd (projectors have no layer id)')


def resolve_teacher_img_size(args: argparse.Namespace) -> None:
    """--teacher-kwargs img_size=N (as in the teacher's own --model-kwargs) means --teacher-img-size N."""
    kw_size = args.teacher_kwargs.pop('img_size', None) if isinstance(args.teacher_kwargs, dict) else None
    if kw_size is not None and args.teacher_img_size and kw_size != args.teacher_img_size:
        raise FatalError(f'--teacher-img-size {args.teacher_img_size} and --teacher-kwargs img_size={kw_size} '
                         f'disagree; pass only one of them')
    args.teacher_img_size = args.teacher_img_size or kw_size


def teacher_size(teacher_img_size, teacher_kwargs) -> int:
    """The teacher's input size from --teacher-img-size and/or --teacher-kwargs img_size= (popped from the
    kwargs); both given and different stops with a message."""
    kw_size = teacher_kwargs.pop('img_size', None) if isinstance(teacher_kwargs, dict) else None
    if kw_size is not None and teacher_img_size and kw_size != teacher_img_size:
        raise FatalError(f'--teacher-img-size {teacher_img_size} and --teacher-kwargs img_size={kw_size} '
                         f'disagree; pass only one of them')
    return teacher_img_size or kw_size
