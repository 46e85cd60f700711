"""The distillation flags and the one bridge from them to a task's keyword arguments.

A new distiller: its task class in its own file, one line in ``DISTILLERS`` (distillers/__init__.py),
its flags in ``add_distill_args``, their checks in ``check_distill_args`` and their mapping in
``task_kwargs`` (all here). Nothing outside ``distillers/`` changes: train_kd.py and the benchmark call
these functions. ``criterion_kwargs`` maps timm's loss flags to the student's own loss.
"""
import argparse
import copy
import os
from typing import Any, Dict, List, Tuple

import yaml
from timm import utils

from .balance import DEFAULT_FACTOR
from runtime.errors import FatalError
from .base import TEACHER_MODES
from .dist import PAPER_IMAGENET as DIST_PAPER
from .distill_token import DISTILL_TYPES as TOKEN_TYPES
from .feature import timm_loss_weights
from . import DISTILLERS


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """The "Distillation parameters" group of train_kd.py (dest names are the recipe keys)."""
    group = parser.add_argument_group('Distillation parameters')
    group.add_argument('--distiller', default='none', type=distiller_names, metavar='{' + ','.join(sorted(DISTILLERS)) + '}',
                       help='distillation method; with --model A,B,C one for every student or a comma list of the same '
                            'length (default: none)')
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
    group.add_argument('--teacher-features-only', action='store_true', default=False,
                       help='distil from the teacher\'s features only, never its logits: for a teacher whose head was '
                            'trained on other classes than the data\'s (--distiller scalekd drops its KD term; '
                            '--distiller feature uses no logits anyway). Default: a head that does not fit the data '
                            'stops the run before step 0')
    group.add_argument('--kd-temperature', type=float, default=None, metavar='T',
                       help='temperature of the logit terms: kd, dist (its tau) and token soft (default: 1.0; 4.0, '
                            'timm\'s, when the teacher is named by --kd-model-name for kd / feature / token)')
    group.add_argument('--kd-weight', type=float, default=None, metavar='W',
                       help='logit KD weight of kd and scalekd; the student loss gets 1 - W. Not with '
                            '--distill-loss-weight / --task-loss-weight (default: 0.5; with --kd-model-name and no '
                            'weight flag, timm\'s 1.0 and 1.0)')
    # DIST (Huang et al., NeurIPS 2022): the paper's ImageNet weights; its tau is --kd-temperature
    for name, what in (('alpha', 'student loss'), ('beta', 'inter-class relation'), ('gamma', 'intra-class relation')):
        group.add_argument(f'--dist-{name}', type=float, default=DIST_PAPER[name], metavar='W',
                           help=f'DIST {what} weight {name} (default: {DIST_PAPER[name]:g}, the paper\'s ImageNet '
                                f'value)')
    group.add_argument('--token-distill-type', '--kd-token-distill-type', default='soft', type=str, choices=TOKEN_TYPES,
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
    add_timm_kd_args(parser)
    group.add_argument('--loss-balance-factor', type=float, default=DEFAULT_FACTOR, metavar='F',
                       help='before the first update, log the gradient norm each loss term sends into the student '
                            'and warn when one exceeds F x the student loss\'s (0: skip the measurement) '
                            f'(default: {DEFAULT_FACTOR:g})')


def distiller_names(text: str) -> str:
    """``--distiller``: a name of DISTILLERS, or a comma list of them (one per student of ``--model A,B,C``)."""
    bad = [d for d in text.split(',') if d not in DISTILLERS]
    if bad:
        raise argparse.ArgumentTypeError(f"invalid choice: {bad[0]!r} (choose from {', '.join(sorted(DISTILLERS))})")
    return text


def student_list(args: argparse.Namespace, parser_error) -> List[Tuple[str, str]]:
    """[(model, distiller)] of ``--model A,B,C`` and ``--distiller`` (one name for all, or one per student), after
    timm's rule (``--kd-model-name`` alone turns logit KD on), so a joint run trains what its solo runs train."""
    if args.distiller == 'none' and timm_rule_distiller(args):
        args.distiller = timm_rule_distiller(args)
    names = [m.strip() for m in str(args.model).split(',')]
    distillers = str(args.distiller).split(',')
    if len(distillers) == 1:
        distillers = distillers * len(names)
    if len(distillers) != len(names) or not all(names):
        parser_error(f'--distiller {args.distiller} names {len(distillers)} distillers for {len(names)} students '
                     f'(--model {args.model}); give one for all or one per student')
    return list(zip(names, distillers))


def student_args(args: argparse.Namespace, model: str, distiller: str, experiment: str
                 ) -> Tuple[argparse.Namespace, str]:
    """One student's own args (a deep copy: no dict or list is shared with another student) and the args.yaml text a
    solo run of it writes (before the checks resolve anything, as the solo run's)."""
    a = argparse.Namespace(**copy.deepcopy(vars(args)))
    a.model, a.distiller, a.experiment = model, distiller, experiment
    # a distillation flag applies to the students whose distiller uses it (an ablation passes --kd-weight for kd)
    if distiller not in KD_WEIGHT_USERS:
        a.kd_weight = None
    if distiller in ('none', 'dist'):
        a.distill_loss_weight = a.task_loss_weight = None
    if distiller == 'none':  # the no-teacher baseline: a solo run of it names no teacher
        a.teacher, a.teacher_checkpoint, a.kd_model_name, a.kd_distill_type = '', '', None, None
        a.kd_temperature, a.teacher_features_only = None, False
    return a, yaml.safe_dump(vars(a), default_flow_style=False)


def task_kwargs(args: argparse.Namespace, img_size: Tuple[int, int]) -> Dict[str, Any]:
    """The one place where flags become distiller keyword arguments."""
    if args.distiller == 'none':
        return {}
    kw = dict(teacher_mode=args.teacher_mode,
              teacher_img_size=(args.teacher_img_size,) * 2 if args.teacher_img_size else None)
    if args.distiller in ('kd', 'scalekd'):
        task_w, distill_w = loss_weights(args)
        if args.teacher_features_only:  # no logit term: the student loss at 1.0 unless --task-loss-weight says
            task_w, distill_w = (1.0 if args.task_loss_weight is None else args.task_loss_weight), 0.0
        kw.update(kd_weight=distill_w, task_weight=task_w, kd_temperature=kd_temperature(args))
    if args.distiller == 'dist':
        kw.update(dist_alpha=args.dist_alpha, dist_beta=args.dist_beta, dist_gamma=args.dist_gamma,
                  kd_temperature=kd_temperature(args))
    elif args.distiller in ('feature', 'token'):
        # timm's own tasks apply timm's weight rules (neither flag: both 1.0)
        kw.update(distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight)
        if args.distiller == 'token':
            kw.update(distill_type=args.token_distill_type, kd_temperature=kd_temperature(args))
    elif args.distiller == 'scalekd':
        kw.update(img_size=img_size, student_s3=args.scalekd_student_s3, student_s4=args.scalekd_student_s4,
                  alpha_s3=args.scalekd_alpha_s3, alpha_s4=args.scalekd_alpha_s4, heads_s3=args.scalekd_heads_s3,
                  heads_s4=args.scalekd_heads_s4, softmax_scale=args.scalekd_softmax_scale,
                  cap_norm=args.scalekd_cap_norm, tail_blocks=args.scalekd_tail_blocks,
                  dfm_norm=args.scalekd_dfm_norm, use_teacher_logits=not args.teacher_features_only)
    return kw


def criterion_kwargs(args):
    """The student's own loss, through timm's create_classification_loss."""
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if getattr(args, 'jsd_loss', False):  # timm's JsdCrossEntropy: CE on the clean split + JSD across the splits
        return dict(loss_type='jsd', jsd_splits=args.aug_splits, smoothing=args.smoothing)
    if args.bce_loss:
        return dict(loss_type='bce', soft_targets=mixup_active, smoothing=args.smoothing,
                    bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum, pos_weight=args.bce_pos_weight)
    return dict(loss_type='ce', soft_targets=mixup_active, smoothing=args.smoothing)


def check_distill_args(parser_error, args: argparse.Namespace) -> None:
    """Distillation flags that contradict each other stop at parse time (``parser_error`` exits)."""
    resolve_timm_kd_args(parser_error, args)
    resolve_kd_settings(parser_error, args)
    if args.distiller != 'none' and not args.teacher:
        parser_error(f'--distiller {args.distiller} needs a teacher: pass --teacher NAME (and --teacher-checkpoint '
                     f'PATH for local weights)')
    if args.distiller == 'none' and (args.teacher or args.teacher_checkpoint):
        parser_error(f'--teacher is set but --distiller is none; pass one of --distiller '
                     f'{", ".join(d for d in DISTILLERS if d != "none")}')
    if args.teacher_checkpoint and not os.path.exists(args.teacher_checkpoint):  # a file or a run folder
        parser_error(f"--teacher-checkpoint '{args.teacher_checkpoint}' does not exist")
    if args.teacher_features_only and args.distiller not in ('scalekd', 'feature'):
        parser_error(f'--teacher-features-only leaves --distiller {args.distiller} nothing to learn from (it uses only '
                     f'the teacher\'s logits); use --distiller scalekd or feature')
    if args.teacher_features_only and args.distill_loss_weight is not None:
        parser_error('--teacher-features-only drops the logit term that --distill-loss-weight weighs; pass only one')
    if args.distiller == 'dist' and args.batch_size < 2:
        parser_error(f'--distiller dist needs -b 2 or more: its intra-class term correlates each class\'s '
                     f'probabilities across the images of one process\'s batch (got -b {args.batch_size})')
    if args.distiller == 'scalekd' and args.layer_decay is not None:
        parser_error('--layer-decay is not supported with --distiller scalekd (projectors have no layer id)')


def resolve_teacher_img_size(args: argparse.Namespace) -> None:
    """--teacher-kwargs img_size=N (as in the teacher's own --model-kwargs) means --teacher-img-size N."""
    args.teacher_img_size = teacher_size(args.teacher_img_size, args.teacher_kwargs)


def teacher_size(teacher_img_size, teacher_kwargs) -> int:
    """The teacher's input size from --teacher-img-size and/or --teacher-kwargs img_size= (popped from the
    kwargs); both given and different stops with a message."""
    kw_size = teacher_kwargs.pop('img_size', None) if isinstance(teacher_kwargs, dict) else None
    if kw_size is not None and teacher_img_size and kw_size != teacher_img_size:
        raise FatalError(f'--teacher-img-size {teacher_img_size} and --teacher-kwargs img_size={kw_size} '
                         f'disagree; pass only one of them')
    return teacher_img_size or kw_size


# timm train.py's --kd-distill-type -> this project's --distiller
TIMM_DISTILL_TYPES = {'logit': 'kd', 'feature': 'feature', 'token': 'token'}


def add_timm_kd_args(parser: argparse.ArgumentParser) -> None:
    """timm train.py's knowledge-distillation flags, with timm's meaning (README: "timm's KD flags")."""
    group = parser.add_argument_group("timm train.py distillation flags (same meaning as in timm)")
    group.add_argument('--kd-model-name', default=None, type=str, metavar='NAME',
                       help='teacher by timm name, as --teacher; alone it turns distillation on (logit KD unless '
                            '--kd-distill-type says otherwise); with --teacher-checkpoint its weights come from the '
                            'file')
    group.add_argument('--kd-distill-type', default=None, type=str, choices=sorted(TIMM_DISTILL_TYPES),
                       help='distiller by timm name: logit = --distiller kd, feature = --distiller feature, token = '
                            '--distiller token (default: logit)')
    group.add_argument('--kd-loss-type', default=None, type=str, choices=('kl',),
                       help="logit distillation loss; timm's only choice, accepted for its command lines "
                            "(default: kl)")
    group.add_argument('--distill-loss-weight', default=None, type=float, metavar='W',
                       help="weight of the distillation term; alone, the student loss keeps weight 1.0 (timm's rule); "
                            "not with --kd-weight")
    group.add_argument('--task-loss-weight', default=None, type=float, metavar='W',
                       help='weight of the student loss; alone, the distillation term gets 1 - W; with '
                            '--distill-loss-weight both are independent; not with --kd-weight')
    for role in ('student', 'teacher'):
        group.add_argument(f'--kd-{role}-feature-dim', type=int, default=None, metavar='N',
                           help=f"--distiller feature: the {role}'s pooled feature width, as timm's flag; checked "
                                f"against the model's before step 0 (default: read from the model)")


# the logit-KD settings no flag and no recipe sets: this project's (ScaleKD's), and timm train.py's (temperature 4.0;
# weights 1.0 and 1.0, timm's rule with neither weight flag: distillers.feature.timm_loss_weights)
PROJECT_KD_TEMPERATURE, PROJECT_KD_WEIGHT = 1.0, 0.5
TIMM_KD_TEMPERATURE = 4.0
KD_WEIGHT_USERS = ('kd', 'scalekd')  # the distillers --kd-weight applies to


def timm_defaults(args: argparse.Namespace) -> bool:
    """True when unset KD settings take timm train.py's defaults: the teacher is named with timm's spelling
    (--kd-model-name) and the distiller is one of timm's tasks (kd = timm's logit, feature, token)."""
    return bool(getattr(args, 'kd_model_name', None)) and args.distiller in TIMM_DISTILL_TYPES.values()


def kd_temperature(args: argparse.Namespace) -> float:
    """The temperature of the logit terms: --kd-temperature, else 4.0 (timm_defaults) or 1.0."""
    if args.kd_temperature is not None:
        return args.kd_temperature
    return TIMM_KD_TEMPERATURE if timm_defaults(args) else PROJECT_KD_TEMPERATURE


def loss_weights(args: argparse.Namespace) -> Tuple[float, float]:
    """(student-loss weight, distillation weight) of kd and scalekd: --kd-weight K -> (1 - K, K); else timm's rules:
    both --distill-loss-weight and --task-loss-weight -> as given; only --distill-loss-weight -> (1.0, it); only
    --task-loss-weight W -> (W, 1 - W). Nothing set: (0.5, 0.5), or timm's (1.0, 1.0) under ``timm_defaults``."""
    task_w, distill_w, kd_w = args.task_loss_weight, args.distill_loss_weight, args.kd_weight
    if kd_w is None and task_w is None and distill_w is None and not timm_defaults(args):
        kd_w = PROJECT_KD_WEIGHT
    if kd_w is not None:
        return 1.0 - kd_w, kd_w
    return timm_loss_weights(distill_w, task_w)


def resolve_kd_settings(parser_error, args: argparse.Namespace) -> None:
    """Refuse weight flags that contradict or that the distiller does not use (a recipe key counts as set), then
    write the effective temperature (and --kd-weight where it is the default) into ``args``, so the checkpoint's
    args and the resume check hold what is trained. args.yaml keeps the requested (unset) values; they resolve
    the same way when it is loaded again. Idempotent."""
    kd_w = args.kd_weight
    pair = [f for f, v in (('--distill-loss-weight', args.distill_loss_weight),
                           ('--task-loss-weight', args.task_loss_weight)) if v is not None]
    if kd_w is not None and pair:
        parser_error(f"--kd-weight {kd_w:g} and {' and '.join(pair)} both set the loss weights (on the command line "
                     f"or in the recipe); keep --kd-weight W (student loss 1 - W) or timm's "
                     f"--distill-loss-weight / --task-loss-weight, not both")
    if kd_w is not None and args.distiller not in KD_WEIGHT_USERS:
        why = {'none': 'nothing is distilled without a teacher (pass --kd-model-name NAME for logit KD)',
               'dist': 'DIST weighs its terms with --dist-alpha (student loss), --dist-beta and --dist-gamma',
               }.get(args.distiller, "timm's task weighs its terms with --distill-loss-weight / --task-loss-weight")
        parser_error(f"--kd-weight {kd_w:g} (or the recipe key 'kd_weight') is not used by --distiller "
                     f"{args.distiller}: {why}; drop it (it applies to --distiller kd and scalekd)")
    dims = [f'--kd-{r}-feature-dim' for r in ('student', 'teacher') if getattr(args, f'kd_{r}_feature_dim') is not None]
    if dims and args.distiller != 'feature':
        parser_error(f"{' / '.join(dims)} only apply to --distiller feature (timm's --kd-distill-type feature), "
                     f"whose projection maps the student's pooled width onto the teacher's; --distiller "
                     f"{args.distiller} has no such projection: drop the flag")
    args.kd_temperature = kd_temperature(args)
    if args.distiller in KD_WEIGHT_USERS and kd_w is None and not pair and not timm_defaults(args):
        args.kd_weight = PROJECT_KD_WEIGHT


def describe_kd_settings(args: argparse.Namespace) -> str:
    """One start-up line: the effective temperature and loss weights, and which defaults filled what is unset."""
    if args.distiller == 'none':
        return ''
    source = "timm train.py's" if timm_defaults(args) else "this project's"
    if args.distiller == 'dist':
        weights = f'alpha {args.dist_alpha:g}, beta {args.dist_beta:g}, gamma {args.dist_gamma:g}'
    else:
        task_w, distill_w = loss_weights(args) if args.distiller in KD_WEIGHT_USERS else \
            timm_loss_weights(args.distill_loss_weight, args.task_loss_weight)
        weights = f'student loss weight {task_w:g}, distillation weight {distill_w:g}'
    temp = '' if args.distiller == 'feature' else f'temperature {kd_temperature(args):g}, '
    return f'--distiller {args.distiller}: {temp}{weights}; values not set take {source} defaults'


def timm_rule_distiller(args: argparse.Namespace) -> str:
    """timm's rule for a run whose --distiller is unset: --kd-model-name NAME (or --kd-distill-type with a teacher)
    turns distillation on, logit KD unless --kd-distill-type says otherwise; '' when it does not apply."""
    kd_type = getattr(args, 'kd_distill_type', None)
    if getattr(args, 'kd_model_name', None) or (kd_type is not None and args.teacher):
        return TIMM_DISTILL_TYPES[kd_type or 'logit']
    return ''


def resolve_timm_kd_args(parser_error, args: argparse.Namespace) -> None:
    """Map timm's KD flags onto this project's (--kd-model-name -> --teacher, --kd-distill-type -> --distiller);
    contradictions stop with a message naming both flags."""
    name = getattr(args, 'kd_model_name', None)
    if name:
        if args.teacher and args.teacher != name:
            parser_error(f"--teacher '{args.teacher}' and --kd-model-name '{name}' name different teachers; pass "
                         f"only one of them")
        args.teacher = name
    kd_type = args.kd_distill_type
    if kd_type is not None:
        wanted = TIMM_DISTILL_TYPES[kd_type]
        if wanted not in DISTILLERS:
            parser_error(f"--kd-distill-type {kd_type} is not available here; choose one of "
                         f"{sorted(t for t, d in TIMM_DISTILL_TYPES.items() if d in DISTILLERS)}")
        if args.distiller not in ('none', wanted):
            parser_error(f'--kd-distill-type {kd_type} means --distiller {wanted}, but --distiller {args.distiller} '
                         f'is set; pass only one of them')
    if args.distiller == 'none' and timm_rule_distiller(args):
        args.distiller = timm_rule_distiller(args)
    for flag, w in (('--distill-loss-weight', args.distill_loss_weight), ('--task-loss-weight', args.task_loss_weight)):
        if w is not None and not (w >= 0 and w < float('inf')):
            parser_error(f'{flag} must be a finite number >= 0, got {w}')
    if args.distill_loss_weight is None and args.task_loss_weight is not None and args.task_loss_weight > 1:
        parser_error(f'--task-loss-weight {args.task_loss_weight} alone gives the distillation term 1 - W < 0; '
                     f'pass a value in [0, 1] or set --distill-loss-weight too')
    if args.distiller == 'dist' and (args.distill_loss_weight is not None or args.task_loss_weight is not None):
        parser_error('--distill-loss-weight / --task-loss-weight do not apply to --distiller dist (two relation '
                     'terms): set its weights with --dist-alpha (student loss), --dist-beta and --dist-gamma')
    if args.distiller == 'none' and (args.distill_loss_weight is not None or args.task_loss_weight is not None
                                     or kd_type is not None):
        parser_error('--kd-distill-type / --distill-loss-weight / --task-loss-weight need a teacher: pass '
                     '--kd-model-name NAME (or --distiller and --teacher)')
