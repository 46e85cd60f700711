"""Pre-flight: input that cannot give a right result stops before step 0 and before any file is written.

Every check raises ``FatalError`` (exit code 2) with one message: what is wrong, the offending
value, and what to do. The scripts call these functions first thing; the data splits are checked
by ``runtime.data.check_splits`` and the model-dependent checks by ``check_model_input`` once the
models exist (still before the run folder is touched).

* ``check_numeric_flags``: every numeric flag in its domain (``FLAG_DOMAINS``), finite.
* ``check_output_path`` / ``check_output_file``: the run folder / an output file can be created
  (no file in the way, a writable existing ancestor), without creating anything.
* ``check_model_input``: a model takes the input size it will get (one dry forward, RNG untouched).
"""
import math
import os
from typing import Any, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import FatalError, short

# dest -> (kind, low, high, what the value is). kind: 'int' / 'float'; a bound given as ('>', x) is
# exclusive, a plain number inclusive, None unbounded. A None value means "not set" and is valid.
FLAG_DOMAINS = {
    # data and model
    'batch_size': ('int', 1, None, 'images per process and step'),
    'validation_batch_size': ('int', 1, None, 'images per process and validation step'),
    'img_size': ('int', 1, None, 'input image size in pixels'),
    'input_size': ('int', 1, None, 'input dimensions (channels, height, width)'),
    'in_chans': ('int', 1, None, 'image input channels'),
    'num_classes': ('int', 1, None, 'number of classes'),
    'crop_pct': ('float', ('>', 0), None, 'validation centre-crop fraction'),
    'std': ('float', ('>', 0), None, 'per-channel std of the normalisation'),
    'mean': ('float', None, None, 'per-channel mean of the normalisation'),
    'grad_accum_steps': ('int', 1, None, 'batches accumulated per update'),
    'workers': ('int', 0, None, 'data loader processes'),
    'train_num_samples': ('int', 1, None, 'samples of the train split'),
    'val_num_samples': ('int', 1, None, 'samples of the validation split'),
    # optimizer and schedule
    'lr': ('float', ('>', 0), None, 'learning rate'),
    'lr_base': ('float', ('>', 0), None, 'base learning rate'),
    'lr_base_size': ('int', 1, None, 'batch size of the base learning rate'),
    'weight_decay': ('float', 0, None, 'weight decay'),
    'momentum': ('float', 0, ('<', 1), 'optimizer momentum'),
    'opt_eps': ('float', ('>', 0), None, 'optimizer epsilon'),
    'opt_betas': ('float', 0, ('<', 1), 'optimizer betas'),
    'clip_grad': ('float', ('>', 0), None, 'gradient clipping threshold'),
    'layer_decay': ('float', ('>', 0), None, 'layer-wise learning-rate decay'),
    'epochs': ('int', 1, None, 'number of epochs'),
    'start_epoch': ('int', 0, None, 'first epoch'),
    'epoch_repeats': ('float', 0, None, 'epoch repeat multiplier'),
    'warmup_epochs': ('int', 0, None, 'warm-up epochs'),
    'warmup_lr': ('float', 0, None, 'warm-up learning rate'),
    'min_lr': ('float', 0, None, 'lowest learning rate'),
    'cooldown_epochs': ('int', 0, None, 'cool-down epochs'),
    'patience_epochs': ('int', 0, None, 'plateau patience in epochs'),
    'decay_rate': ('float', ('>', 0), None, 'learning-rate decay rate'),
    'decay_epochs': ('float', ('>', 0), None, 'epochs between learning-rate decays'),
    'decay_milestones': ('int', 0, None, 'epochs of the learning-rate decays'),
    'lr_cycle_mul': ('float', ('>', 0), None, 'cycle length multiplier'),
    'lr_cycle_decay': ('float', ('>', 0), None, 'cycle decay'),
    'lr_cycle_limit': ('int', 1, None, 'number of cycles'),
    'lr_k_decay': ('float', ('>', 0), None, 'k-decay'),
    'lr_noise': ('float', 0, None, 'noise on/off epoch fractions'),
    'lr_noise_pct': ('float', 0, None, 'noise limit'),
    'lr_noise_std': ('float', 0, None, 'noise std-dev'),
    # augmentation and regularisation
    'scale': ('float', ('>', 0), 1, 'random-resized-crop area fractions'),
    'ratio': ('float', ('>', 0), None, 'random-resized-crop aspect ratios'),
    'hflip': ('float', 0, 1, 'horizontal flip probability'),
    'vflip': ('float', 0, 1, 'vertical flip probability'),
    'color_jitter': ('float', 0, None, 'colour jitter factor'),
    'color_jitter_prob': ('float', 0, 1, 'colour jitter probability'),
    'grayscale_prob': ('float', 0, 1, 'grayscale probability'),
    'gaussian_blur_prob': ('float', 0, 1, 'gaussian blur probability'),
    'aug_repeats': ('float', 0, None, 'augmentation repeats'),
    'aug_splits': ('int', 0, None, 'augmentation splits'),
    'reprob': ('float', 0, 1, 'random-erase probability'),
    'recount': ('int', 1, None, 'random-erase count'),
    'mixup': ('float', 0, None, 'mixup alpha'),
    'cutmix': ('float', 0, None, 'cutmix alpha'),
    'cutmix_minmax': ('float', 0, 1, 'cutmix min/max ratio'),
    'mixup_prob': ('float', 0, 1, 'mixup/cutmix probability'),
    'mixup_switch_prob': ('float', 0, 1, 'mixup/cutmix switch probability'),
    'mixup_off_epoch': ('int', 0, None, 'epoch mixup is switched off'),
    'smoothing': ('float', 0, ('<', 1), 'label smoothing'),
    'bce_target_thresh': ('float', 0, 1, 'BCE target threshold'),
    'bce_pos_weight': ('float', ('>', 0), None, 'BCE positive weight'),
    'drop': ('float', 0, ('<', 1), 'dropout rate'),
    'drop_path': ('float', 0, ('<', 1), 'drop-path rate'),
    'bn_momentum': ('float', 0, 1, 'BatchNorm momentum'),
    'bn_eps': ('float', ('>', 0), None, 'BatchNorm epsilon'),
    'model_ema_decay': ('float', 0, 1, 'EMA decay'),
    # distillation
    'teacher_img_size': ('int', 1, None, 'teacher input size in pixels'),
    'kd_temperature': ('float', ('>', 0), None, 'logit KD temperature'),
    'kd_weight': ('float', 0, 1, 'logit KD weight (the student loss gets 1 - W)'),
    'scalekd_alpha_s3': ('float', 0, None, 'stage-3 feature weights'),
    'scalekd_alpha_s4': ('float', 0, None, 'stage-4 feature weights'),
    'scalekd_heads_s3': ('int', 1, None, 'stage-3 projector heads'),
    'scalekd_heads_s4': ('int', 1, None, 'stage-4 projector heads'),
    'scalekd_softmax_scale': ('float', ('>', 0), None, 'projector attention logit scales'),
    'scalekd_tail_blocks': ('int', 1, None, 'teacher tail blocks'),
    'loss_balance_factor': ('float', 0, None, 'loss-balance warning factor (0: off)'),
    # run
    'seed': ('int', 0, 2 ** 32 - 1 - 4096, 'random seed'),
    'log_interval': ('int', 1, None, 'updates between log lines'),
    'log_freq': ('int', 1, None, 'batches between log lines'),
    'val_interval': ('int', 1, None, 'epochs between validations'),
    'recovery_interval': ('int', 0, None, 'updates between recovery checkpoints (0: off)'),
    'checkpoint_hist': ('int', 1, None, 'checkpoints kept'),
    'nonfinite_max_skips': ('int', 0, None, 'skipped updates allowed'),
    'max_bad_images': ('int', 0, None, 'unreadable images allowed'),
    'dist_timeout': ('float', 0, None, 'collective timeout in seconds'),
    'teacher_min_top1': ('float', 0, 100, 'teacher top-1 threshold in percent'),
    'teacher_check_batches': ('int', 1, None, 'validation batches of the teacher check'),
}


def _bound(b) -> Tuple[Optional[float], bool]:
    return (b[1], True) if isinstance(b, tuple) else (b, False)


def describe_domain(kind: str, low, high) -> str:
    """'an integer >= 1', 'a number > 0 and < 1', ... (the text of a flag's valid values)."""
    parts = []
    lo, lo_open = _bound(low)
    hi, hi_open = _bound(high)
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    what = 'an integer' if kind == 'int' else 'a finite number'
    return f"{what} {' and '.join(parts)}" if parts else what


def value_error(dest: str, value, low, high, kind: str, what: str) -> Optional[str]:
    """None when ``value`` (one number) is in the domain, else why not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f'is not a number ({type(value).__name__})'
    if kind == 'int' and not float(value).is_integer():
        return 'is not an integer'
    if not math.isfinite(value):
        return 'is not finite'
    lo, lo_open = _bound(low)
    hi, hi_open = _bound(high)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        return 'is too small'
    if hi is not None and (value > hi or (hi_open and value == hi)):
        return 'is too large'
    return None


def check_numeric_flags(args: Any, domains: Optional[dict] = None, skip: Iterable[str] = ()) -> None:
    """Every numeric flag of ``args`` in ``FLAG_DOMAINS`` (or ``domains``) is in its domain; else FatalError."""
    skip = set(skip)
    for dest, (kind, low, high, what) in (domains or FLAG_DOMAINS).items():
        if dest in skip or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            why = value_error(dest, v, low, high, kind, what)
            if why is not None:
                flag = '--' + dest.replace('_', '-')
                shown = ' '.join(f'{x:g}' if isinstance(x, float) else str(x) for x in values)
                raise FatalError(f"{flag} {shown} {why}: the {what} must be {describe_domain(kind, low, high)}. "
                                 f"Pass {flag} with such a value (on the command line or as '{dest}' in the recipe)")
    _check_relations(args)


def _check_relations(args: Any) -> None:
    """Domains that depend on two flags."""
    scale = getattr(args, 'scale', None)
    if isinstance(scale, (list, tuple)) and len(scale) == 2 and scale[0] > scale[1]:
        raise FatalError(f"--scale {scale[0]:g} {scale[1]:g}: the first (smallest crop area) must not exceed the "
                         f"second; pass e.g. --scale 0.08 1.0")
    aug_splits = getattr(args, 'aug_splits', 0) or 0
    if aug_splits == 1:
        raise FatalError('--aug-splits 1 is not valid: pass 0 (off) or 2 and more')
    mean, std = getattr(args, 'mean', None), getattr(args, 'std', None)
    if mean and std and len(mean) != len(std):
        raise FatalError(f"--mean has {len(mean)} values but --std {len(std)}; pass one value per input channel "
                         f"to both")


def _existing_ancestor(path: str) -> Tuple[str, Optional[str]]:
    """The deepest existing part of ``path`` and, when that part is not a folder, why the path cannot be made."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        return probe, 'Not a directory' if probe != path else 'it is a file, not a folder'
    if not os.access(probe, os.W_OK | os.X_OK):
        return probe, 'Permission denied'
    return probe, None


def check_output_path(output_dir: str, flag: str = '--output DIR') -> None:
    """The run folder exists as a writable folder or can be created (nothing is created here)."""
    probe, why = _existing_ancestor(output_dir)
    if why is not None:
        where = '' if probe == os.path.abspath(output_dir) else f" ('{probe}' is in the way)"
        raise FatalError(f"output folder '{output_dir}' is not writable ({why}); pass {flag} on a writable "
                         f"disk{where}")


def check_output_file(path: str, flag: str, create_parents: bool = False) -> None:
    """An output file can be written: its folder exists (or, with ``create_parents``, can be made) and is writable,
    and the path is not a folder."""
    if os.path.isdir(path):
        raise FatalError(f"{flag} '{path}' is a folder; pass a file name, e.g. {os.path.join(path, 'out')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not create_parents and not os.path.isdir(folder):
        raise FatalError(f"the folder of {flag} '{path}' does not exist ('{folder}'); create it first "
                         f"(mkdir -p {folder}) or pass a path in an existing folder")
    probe, why = _existing_ancestor(folder)
    if why is not None:
        raise FatalError(f"{flag} '{path}' cannot be written ({why}: '{probe}'); pass a path on a writable disk")


def _patch_hint(model: nn.Module) -> str:
    m = getattr(model, 'module', model)
    patch = getattr(getattr(m, 'patch_embed', None), 'patch_size', None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    fixed = getattr(getattr(m, 'patch_embed', None), 'img_size', None)
    fixed = fixed[0] if isinstance(fixed, (tuple, list)) else fixed
    default = getattr(m, 'pretrained_cfg', {}).get('input_size', (None, None, None))[-1]
    hints = []
    if fixed:
        hints.append(f'it is built for {fixed} px')
    if patch:
        hints.append(f'its patch size is {patch}')
    elif default:
        hints.append(f'its default size is {default} px')
    return f" ({', '.join(hints)})" if hints else ''


def check_model_input(model: nn.Module, name: str, input_size: Sequence[int], role: str, fix: str,
                      device: Optional[torch.device] = None) -> None:
    """``model`` takes a (1, C, H, W) batch of ``input_size``: one forward in eval mode, no gradient, RNG and
    BatchNorm statistics untouched. Else FatalError naming the model, the size and ``fix``."""
    was_training = model.training
    device = device or next(model.parameters(), torch.zeros(())).device
    c, h, w = input_size
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            model(torch.zeros(1, c, h, w, device=device))
    except Exception as e:  # the model's own check (assert, shape mismatch) in whatever form it takes
        raise FatalError(f"{role} {name} cannot take {c}x{h}x{w} input{_patch_hint(model)}: {short(e).rstrip('.')}. "
                         f"{fix}") from None
    finally:
        model.train(was_training)


def check_train_inputs(args: Any) -> None:
    """train_kd.py's pre-flight, before the process group, the data loaders and the run folder exist: numeric
    flags, the run folder, the ImageFolder splits (against the batch size and the process count)."""
    from .data import check_data_dir, check_splits  # noqa: E402  (data imports PIL; keep this file light)
    check_numeric_flags(args)
    check_train_choices(args)
    check_output_path(os.path.join(args.output or './output/train', args.experiment or ''))
    if args.dataset:
        return
    check_data_dir(args.data_dir, (args.train_split,))
    world_size = int(os.environ.get('WORLD_SIZE', '1') or 1)
    check_splits(args.data_dir, args.train_split, args.val_split, args.batch_size, world_size, args.class_map)


SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant', 'plateau', 'none')
EVAL_METRICS = ('top1', 'top5', 'loss')
CLIP_MODES = ('norm', 'value', 'agc')


def check_train_choices(args: Any) -> None:
    """Names and files train_kd.py would only trip over after the models are built (or after an epoch)."""
    from timm.optim import get_optimizer_info
    try:
        get_optimizer_info(args.opt.lower().split('_')[-1])
    except ValueError:
        raise FatalError(f"--opt {args.opt} is not an optimizer of timm; pass one of timm.optim.list_optimizers() "
                         f"(e.g. sgd, adamw, lamb), optionally prefixed lookahead_") from None
    for flag, value, valid in (('--sched', args.sched, SCHEDULERS), ('--eval-metric', args.eval_metric, EVAL_METRICS),
                               ('--clip-mode', args.clip_mode, CLIP_MODES)):
        if value not in valid:
            raise FatalError(f"{flag} {value} is not one of {', '.join(valid)}; pass one of them")
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise FatalError(f"--device {args.device}: no CUDA device is available here; pass --device cpu")
    for flag, path in (('--class-map', args.class_map), ('--initial-checkpoint', args.initial_checkpoint),
                       ('--pretrained-path', args.pretrained_path)):
        if path and not os.path.isfile(path):
            raise FatalError(f"{flag} '{path}' does not exist; pass an existing file or drop {flag}")
    for role, name, kwargs, flag in (('student', args.model, args.model_kwargs, '--model-kwargs'),
                                     ('teacher', getattr(args, 'teacher', ''), getattr(args, 'teacher_kwargs', {}),
                                      '--teacher-kwargs')):
        if name and kwargs:
            check_model_kwargs(role, name, kwargs, flag)


def check_model_kwargs(role: str, name: str, kwargs: dict, flag: str) -> None:
    """``timm.create_model(name, **kwargs)`` accepts the keywords (built on the meta device: no memory, no RNG)."""
    import random
    import numpy as np
    import timm
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.device('meta'):
            timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if 'keyword argument' not in str(e):
            return
        shown = ' '.join(f'{k}={v}' for k, v in kwargs.items())
        raise FatalError(f"{role} {name} cannot be built with {flag} {shown} ({short(e)}); drop or correct the "
                         f"keyword (see the model class's arguments in timm)") from None
    except Exception:  # anything else is reported where the model is really built
        return
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
