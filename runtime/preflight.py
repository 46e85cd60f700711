"""Pre-flight: input that cannot give a right result stops before step 0 and before any file is written.

Every check raises ``FatalError`` (exit code 2) with one message: what is wrong, the offending
value, and what to do. The scripts call these functions first thing; the data splits are checked
by ``runtime.splits.check_splits`` and the model-dependent checks by ``check_model_input`` once the
models exist (still before the run folder is touched).

* ``check_numeric_flags`` (``flag_domains``): every numeric flag in its domain, finite.
* ``check_train_choices``: names (optimizer, scheduler, metric, clip mode, device), input files and model keywords.
* ``check_optim_sched`` (``optim_checks``): the optimizer and the LR schedule can be built and run with the flags.
* ``check_output_path`` / ``check_output_file``: the run folder / an output file can be created
  (no file in the way, a writable existing ancestor), without creating anything.
* ``check_model_input``: a model takes the input size it will get (one dry forward, RNG untouched).
"""
import os
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import FatalError, short
from .flag_domains import check_numeric_flags
from .optim_checks import check_optim_sched


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
    flags, names, the optimizer and schedule, the run folder, the ImageFolder splits (against the batch size and
    the process count)."""
    from .data import check_data_dir
    from .splits import check_splits
    from .tracking import check_tracking
    check_numeric_flags(args)
    check_tracking(args)  # --log-wandb: wandb importable
    check_train_choices(args)
    check_optim_sched(args)
    check_output_path(os.path.join(args.output or './output/train', args.experiment or ''))
    if args.dataset:
        return
    check_data_dir(args.data_dir, (args.train_split,))
    world_size = int(os.environ.get('WORLD_SIZE', '1') or 1)
    check_splits(args.data_dir, args.train_split, args.val_split, args.batch_size, world_size, args.class_map,
                 train_labels=getattr(args, 'labels', 'folders') != 'none')


SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'wsd', 'rsqrt', 'constant', 'plateau', 'none')
EVAL_METRICS = ('top1', 'top5', 'loss', 'agree_top1')
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
    if getattr(args, 'drop_block', None) is not None:  # timm's --drop-block: a keyword only some models take
        check_model_kwargs('student', args.model, {'drop_block_rate': args.drop_block}, '--drop-block')


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
