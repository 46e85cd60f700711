"""The flags of timm's train.py that train_kd.py takes beyond its own: added to its parser with timm's names and
defaults (``add_timm_flags``), given timm's meaning where a distillation run can have it (``student_create_kwargs``,
``adapt_student``; the optimizer reads ``--layer-decay-min-scale`` / ``--layer-decay-no-opt-scale`` through timm's
``optimizer_kwargs``), and otherwise refused by name before anything is written (``timm_flag_problem``: the
reason and what to use instead). The full list of timm's flags is tests/timm_train_flags.txt."""
import argparse
from typing import Any, Optional

import torch

from .errors import FatalError

# (parser group title, option strings, add_argument keywords): timm's names, defaults and meaning
_FLAGS = (
    ('Dataset parameters', ('--input-key',), dict(default=None, type=str, help='dataset key for input images')),
    ('Dataset parameters', ('--target-key',), dict(default=None, type=str, help='dataset key for target labels')),
    ('Dataset parameters', ('--dataset-trust-remote-code',), dict(
        action='store_true', default=False, help='allow a hfds/ dataset to run code from its repo')),
    ('Model parameters', ('--head-init-scale',), dict(default=None, type=float,
                                                      help='multiply the student head weight and bias by this')),
    ('Model parameters', ('--head-init-bias',), dict(default=None, type=float,
                                                     help='set the student head bias to this value')),
    ('Model parameters', ('--fuser',), dict(default='', type=str, help='TorchScript fuser: refused (see README)')),
    ('Model parameters', ('--torchscript',), dict(action='store_true', default=False,
                                                  help='torch.jit.script the model: refused, use --torchcompile')),
    ('Device parameters', ('--model-dtype',), dict(default=None, type=str,
                                                   help='model dtype without AMP: only float32 (use --amp)')),
    ('Device parameters', ('--local_rank', '--local-rank'), dict(default=0, type=int,
                                                                 help='set by torch.distributed.launch')),
    ('Device parameters', ('--device-modules',), dict(default=None, type=str, nargs='+',
                                                      help='device backend modules: refused (CUDA or CPU only)')),
    ('Optimizer parameters', ('--layer-decay-min-scale',), dict(
        type=float, default=0, help='layer-wise lr decay minimum scale clamp (default: 0)')),
    ('Optimizer parameters', ('--layer-decay-no-opt-scale',), dict(
        type=float, default=None, help='layer-wise lr decay: freeze parameters whose scale is below this')),
    ('Augmentation and regularization parameters', ('--jsd-loss',), dict(
        action='store_true', default=False, help='Jensen-Shannon divergence + CE student loss (with --aug-splits)')),
    ('Augmentation and regularization parameters', ('--drop-connect',), dict(
        type=float, default=None, metavar='PCT', help='deprecated by timm: refused, use --drop-path')),
    ('Augmentation and regularization parameters', ('--drop-block',), dict(
        type=float, default=None, metavar='PCT', help='drop block rate of the student (default: None)')),
    ('Batch norm parameters', ('--split-bn',), dict(
        action='store_true', help='separate student BN layers per augmentation split (--aug-splits or --resplit)')),
    ('Miscellaneous parameters', ('--save-images',), dict(action='store_true', default=False, help='refused')),
    ('Miscellaneous parameters', ('--tta',), dict(type=int, default=0, metavar='N', help='refused above 1')),
    ('Miscellaneous parameters', ('--use-multi-epochs-loader',), dict(action='store_true', default=False,
                                                                      help='refused (exact resume)')),
    ('Miscellaneous parameters', ('--train-img-sizes',), dict(type=int, nargs='+', default=None, help='refused')),
    ('Miscellaneous parameters', ('--train-batch-sizes',), dict(type=int, nargs='+', default=None, help='refused')),
    ('Miscellaneous parameters', ('--train-size-probs',), dict(type=float, nargs='+', default=None, help='refused')),
    ('Miscellaneous parameters', ('--train-size-schedule',), dict(
        type=str, default='constant', choices=('constant', 'progressive'), help='refused')),
    ('Miscellaneous parameters', ('--train-size-schedule-spread',), dict(type=float, default=0.65, help='refused')),
    ('Miscellaneous parameters', ('--train-size-random-mix',), dict(type=float, default=0.1, help='refused')),
    ('Miscellaneous parameters', ('--train-batches-per-epoch', '--train-steps-per-epoch'), dict(
        type=int, default=None, help='refused')),
    ('Miscellaneous parameters', ('--variable-batch-loss-scale',), dict(
        default='none', type=str, choices=('none', 'sqrt', 'linear'), help='refused')),
    ('Miscellaneous parameters', ('--naflex-loader',), dict(action='store_true', default=False, help='refused')),
    ('Miscellaneous parameters', ('--naflex-train-seq-lens',), dict(
        type=int, nargs='+', default=[128, 256, 576, 784, 1024], help='refused')),
    ('Miscellaneous parameters', ('--naflex-max-seq-len',), dict(type=int, default=576, help='refused')),
    ('Miscellaneous parameters', ('--naflex-patch-sizes',), dict(type=int, nargs='+', default=None, help='refused')),
    ('Miscellaneous parameters', ('--naflex-patch-size-probs',), dict(type=float, nargs='+', default=None,
                                                                      help='refused')),
    ('Miscellaneous parameters', ('--naflex-loss-scale',), dict(
        default='linear', type=str, choices=('none', 'sqrt', 'linear'), help='refused')),
    ('Miscellaneous parameters', ('--naflex-patchify-channels-first',), dict(action='store_true', default=False,
                                                                             help='refused')),
)

_NAFLEX = ('NaFlex variable-resolution training (dict batches of patches with a variable sequence length, for NaFlex '
           'ViTs) cannot feed a distiller here: the teacher, the ScaleKD projectors and every loss take one image '
           'tensor of one size. Train at one size (--img-size / --input-size)')
_SIZES = ('per-batch image and batch sizes change the input grid from batch to batch, while the ScaleKD projectors '
          'are built for one grid, the teacher runs at one --teacher-img-size, and exact resume replays one sampler '
          'order. Train at one size (--img-size) and batch (-b)')
# dest -> (an example command line that triggers the refusal, the reason and what to use instead)
REFUSED = {
    'data': (['/data/imagenet'], "timm's train.py deprecates its positional data folder; pass --data-dir DIR"),
    'fuser': (['--fuser', 'te'], '--fuser picks a TorchScript fuser, which acts only on torch.jit.script models and '
                                 'this script scripts none (--torchscript is refused); use --torchcompile'),
    'torchscript': (['--torchscript'], '--torchscript: torch.jit.script cannot script a distillation task (teacher '
                                       'feature taps, projectors) and TorchScript is deprecated in torch; use '
                                       '--torchcompile'),
    'model_dtype': (['--model-dtype', 'bfloat16'], '--model-dtype: low-precision weights without AMP are not '
                    'supported (the loop feeds fp32 inputs, the distillers keep their loss terms and projectors in '
                    'fp32); use --amp --amp-dtype bfloat16 (autocast; the frozen teacher is held in bf16)'),
    'device_modules': (['--device-modules', 'torch_npu'], '--device-modules: only CUDA and CPU are supported (the '
                       'pre-flight bf16/compile checks, fused optimizers, peak-memory report and distributed backend '
                       'know no other device); use --device cuda or --device cpu'),
    'drop_connect': (['--drop-connect', '0.1'], "--drop-connect is deprecated by timm and its train.py ignores it "
                                                "(the rate reaches no model); use --drop-path RATE"),
    'save_images': (['--save-images'], '--save-images: this loop does not write input batches as JPEGs into the run '
                    'folder (not part of its files: atomic writes, resume); to look at the augmented inputs, drop it '
                    'and iterate timm.data.create_loader with the same data flags'),
    'tta': (['--tta', '2'], "--tta N: timm's train.py averages the logits of N consecutive validation images (its "
                            "loader does not oversample one image), so top-1 would score averages of different "
                            "images; drop --tta (the epoch-end validation is timm's plain one)"),
    'use_multi_epochs_loader': (['--use-multi-epochs-loader'], '--use-multi-epochs-loader keeps the loader workers '
                                'across epochs, so their seeds carry over and a resumed run cannot replay an epoch\'s '
                                'batches (exact resume restarts the workers from each epoch\'s seed); drop it'),
    'naflex_loader': (['--naflex-loader'], f'--naflex-loader: {_NAFLEX}'),
    'train_img_sizes': (['--train-img-sizes', '160', '224'], f'--train-img-sizes: {_SIZES}'),
}
_NEEDS = {  # flags that timm reads only with another, refused, flag
    'naflex_train_seq_lens': '--naflex-loader', 'naflex_max_seq_len': '--naflex-loader',
    'naflex_patch_sizes': '--naflex-loader', 'naflex_patch_size_probs': '--naflex-loader',
    'naflex_loss_scale': '--naflex-loader', 'naflex_patchify_channels_first': '--naflex-loader',
    'train_batch_sizes': '--train-img-sizes', 'train_size_probs': '--train-img-sizes',
    'train_size_schedule': '--train-img-sizes', 'train_size_schedule_spread': '--train-img-sizes',
    'train_size_random_mix': '--train-img-sizes', 'train_batches_per_epoch': '--train-img-sizes',
    'variable_batch_loss_scale': '--train-img-sizes',
}
_EXAMPLES = {'naflex_train_seq_lens': ['256'], 'naflex_max_seq_len': ['256'], 'naflex_patch_sizes': ['16'],
             'naflex_patch_size_probs': ['1.0'], 'naflex_loss_scale': ['sqrt'], 'naflex_patchify_channels_first': [],
             'train_batch_sizes': ['64'], 'train_size_probs': ['1.0'], 'train_size_schedule': ['progressive'],
             'train_size_schedule_spread': ['0.5'], 'train_size_random_mix': ['0.2'], 'train_batches_per_epoch': ['10'],
             'variable_batch_loss_scale': ['sqrt']}
_OPTION = {kw.get('dest', names[0].lstrip('-').replace('-', '_')): names[0] for _, names, kw in _FLAGS}
_BASE = {'--naflex-loader': _NAFLEX, '--train-img-sizes': _SIZES}
for _dest, _flag in _NEEDS.items():
    REFUSED[_dest] = ([_OPTION[_dest]] + _EXAMPLES[_dest],
                      f'{_OPTION[_dest]} is read by timm only with {_flag}, which is refused here: {_BASE[_flag]}')
_ALLOWED = {'model_dtype': (None, 'float32'), 'tta': (0, 1)}  # values that keep timm's default behaviour


def add_timm_flags(parser: argparse.ArgumentParser) -> None:
    """timm train.py's flags that train_kd.py's own groups lack, into those groups (same titles as timm's)."""
    groups = {g.title: g for g in parser._action_groups}
    for title, names, kwargs in _FLAGS:
        groups[title].add_argument(*names, **kwargs)
    parser.add_argument('data', nargs='?', metavar='DIR', default=None,
                        help="timm's deprecated positional data folder: refused, pass --data-dir")


def _defaults() -> dict:
    out = {kw.get('dest', names[0].lstrip('-').replace('-', '_')): kw.get('default', False) for _, names, kw in _FLAGS}
    return dict(out, data=None)


def timm_flag_problem(args: Any) -> Optional[str]:
    """The first timm flag of ``args`` that a distillation run here cannot honour, as a message naming it with the
    reason and what to use instead (None when there is none)."""
    defaults = _defaults()
    for dest, (_, reason) in REFUSED.items():
        value = getattr(args, dest, defaults[dest])
        if value != defaults[dest] and value not in _ALLOWED.get(dest, ()):
            return reason if dest != 'data' else f"positional DIR '{value}': {reason.replace('DIR', value)}"
    if args.split_bn and not (args.aug_splits > 1 or args.resplit):
        return '--split-bn needs --aug-splits N (N >= 2) or --resplit: timm splits the BN statistics by augmentation ' \
               'split; add one of them or drop --split-bn'
    if args.split_bn and args.sync_bn:
        return '--split-bn and --sync-bn cannot be combined (timm refuses it too); pass one'
    if args.jsd_loss:
        if args.aug_splits < 2:
            return '--jsd-loss compares the augmentation splits of each image: add --aug-splits N (N >= 2, e.g. 3)'
        if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None or args.bce_loss:
            return '--jsd-loss is a hard-label loss over clean/augmented splits: drop --mixup/--cutmix/--bce-loss'
    kind = args.dataset.split('/')[0].lower() if '/' in (args.dataset or '') else ''
    for flag, dest in (('--input-key', 'input_key'), ('--target-key', 'target_key')):
        if getattr(args, dest) is not None and kind not in ('hfds', 'hfids', 'wds', 'tfds'):
            return f'{flag} names a field of a hfds/, hfids/, wds/ or tfds/ dataset (--dataset KIND/NAME), not of ' \
                   f'--dataset {args.dataset or "(an ImageFolder root)"}; drop {flag}'
    if kind == 'wds' and args.input_key is not None and 'jpg' not in args.input_key.split(';'):
        return f"--input-key {args.input_key} with a wds/ dataset: timm's wds reader stores every decoded image " \
               f"under 'jpg' and then looks the image up by --input-key, so a key list without jpg fails at the " \
               f"first sample; pass --input-key '{args.input_key};jpg' (the first key a sample has is read)"
    for flag, dest in (('--layer-decay-min-scale', 'layer_decay_min_scale'),
                       ('--layer-decay-no-opt-scale', 'layer_decay_no_opt_scale')):
        if getattr(args, dest) not in (None, defaults[dest]) and args.layer_decay is None:
            return f'{flag} only acts with --layer-decay RATE (timm ignores it otherwise); add --layer-decay or drop it'
    return None


def student_create_kwargs(args: Any) -> dict:
    """timm.create_model keywords of the student from timm's model flags (``--drop-block``)."""
    return {'drop_block_rate': args.drop_block} if args.drop_block is not None else {}


def adapt_student(model: torch.nn.Module, args: Any) -> torch.nn.Module:
    """timm train.py's changes to a freshly created model: ``--head-init-scale`` / ``--head-init-bias`` on the
    classifier (every head of a distilled model) and ``--split-bn`` (timm's convert_splitbn_model)."""
    if args.head_init_scale is not None or args.head_init_bias is not None:
        heads = model.get_classifier()
        heads = heads if isinstance(heads, (tuple, list)) else (heads,)
        for head in heads:
            if not isinstance(getattr(head, 'weight', None), torch.Tensor) or \
                    (args.head_init_bias is not None and getattr(head, 'bias', None) is None):
                raise FatalError(f'--head-init-scale/--head-init-bias: the student {args.model} has no classifier '
                                 f'with a weight and bias ({type(head).__name__}); drop the flag')
            with torch.no_grad():
                if args.head_init_scale is not None:
                    head.weight.mul_(args.head_init_scale)
                    if head.bias is not None:
                        head.bias.mul_(args.head_init_scale)
                if args.head_init_bias is not None:
                    head.bias.fill_(args.head_init_bias)
    if args.split_bn:
        from timm.layers import convert_splitbn_model
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    return model


def plain_student_state(state: dict) -> dict:
    """A student state dict without the per-split BatchNorm statistics of ``--split-bn`` (``...aux_bn.N...``): in eval
    mode timm's SplitBatchNorm2d is its main BatchNorm, so the rest is the plain timm model, same outputs."""
    return {k: v for k, v in state.items() if '.aux_bn.' not in f'.{k}'}
