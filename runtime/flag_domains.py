"""The domain of every numeric flag of the scripts, and the check that refuses a value outside it.

``FLAG_DOMAINS`` maps a dest name to its kind, bounds and meaning; ``check_numeric_flags(args)`` checks
every dest ``args`` has (train_kd.py, validate.py and export.py alike) and raises ``FatalError``
(exit code 2) naming the flag, the value, the valid range and the recipe key.
"""
import math
from typing import Any, Iterable, Optional, Tuple

from .errors import FatalError

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
    'distill_loss_weight': ('float', 0, None, 'weight of the distillation term'),
    'task_loss_weight': ('float', 0, None, 'weight of the student loss'),
    'kd_student_feature_dim': ('int', 1, None, "student's pooled feature width"),
    'kd_teacher_feature_dim': ('int', 1, None, "teacher's pooled feature width"),
    'dist_alpha': ('float', 0, None, 'DIST student loss weight'),
    'dist_beta': ('float', 0, None, 'DIST inter-class relation weight'),
    'dist_gamma': ('float', 0, None, 'DIST intra-class relation weight'),
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
    'lock_stale_minutes': ('float', ('>', 0), None, 'minutes without a heartbeat before a run lock is stale'),
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
