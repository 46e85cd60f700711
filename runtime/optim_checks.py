"""Optimizer and LR-schedule pre-flight: flag combinations that timm's ``create_optimizer_v2`` /
``create_scheduler_v2`` (or the optimizer and scheduler classes behind them) reject, or that would hang or be
ignored silently, stop before step 0 with one ``FatalError`` naming the flags and the fix.

``check_optim_sched(args)`` runs from ``check_train_inputs``, before the process group, the data and the run folder:

1. rules knowable from the flags alone (``_optimizer_rules``, ``_schedule_rules``), each with its own message;
2. a catch-all: the optimizer is built by timm's factory on a dummy ``nn.Linear`` (a 2-D weight with decay, a
   1-D bias without) with the run's ``optimizer_kwargs(cfg=args)`` and ``--opt-kwargs`` and takes one step; the
   schedule is built by ``create_scheduler_v2`` from ``scheduler_kwargs(args)`` and evaluated at every epoch
   boundary (noise off). Any exception, or an lr that is not a finite number >= 0, becomes a ``FatalError``.

Not covered here: ``--layer-decay`` (its grouping needs the model; the dummy build leaves it out, its domain is in
``flag_domains``), the project's own ``fused=True`` on CUDA (``runtime.device``; the dummy lives on the CPU), and
apex / bitsandbytes optimizers (only their package and CUDA are checked). RNG states are left untouched.
"""
import importlib.util
import math
import random
import warnings
from typing import Any, Dict

import torch
import torch.nn as nn

from .errors import FatalError, short

# optimizer_kwargs(cfg=args) keys -> the flag that sets them (a key repeated in --opt-kwargs is a TypeError)
FLAG_OF_KWARG = {'opt': '--opt', 'lr': '--lr', 'weight_decay': '--weight-decay', 'momentum': '--momentum',
                 'eps': '--opt-eps', 'betas': '--opt-betas', 'layer_decay': '--layer-decay'}
LR_BASE_SCALES = ('', 'linear', 'sqrt')
CYCLE_SCHEDULERS = ('cosine', 'tanh', 'poly')
UPDATES_PER_EPOCH = 1000  # stand-in for --sched-on-updates (the loader does not exist yet); epoch boundaries only


def _opt_name(opt: str) -> str:
    """The registry name of --opt; a prefix other than one ``lookahead_`` is ignored by timm, so refused here."""
    parts = opt.lower().split('_')
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'lookahead'):
        raise FatalError(f"--opt {opt}: timm reads only the last part ('{parts[-1]}') and one 'lookahead_' prefix, "
                         f"so '{'_'.join(parts[:-1])}_' would be ignored silently; pass --opt {parts[-1]} or "
                         f"--opt lookahead_{parts[-1]}")
    return parts[-1]


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ' '.join(f'{k}={v}' for k, v in kwargs.items())


def _optimizer_rules(args: Any, info) -> None:
    opt, extra = args.opt, dict(args.opt_kwargs or {})
    if isinstance(info.opt_class, str):  # apex.* / bitsandbytes.*: imported by timm when the optimizer is built
        package = info.opt_class.split('.')[0]
        if not args.device.startswith('cuda'):
            raise FatalError(f"--opt {opt} is {package}'s {info.opt_class.rsplit('.', 1)[-1]} and needs CUDA; "
                             f"--device is {args.device}. Pass a timm optimizer (e.g. --opt adamw or sgd)")
        if importlib.util.find_spec(package) is None:
            raise FatalError(f"--opt {opt} needs the '{package}' package, which is not installed; install it or "
                             f"pass a timm optimizer (e.g. --opt adamw or sgd)")
    if info.second_order:
        raise FatalError(f"--opt {opt} is a second-order optimizer: its step needs the backward graph "
                         f"(create_graph=True), which train_kd.py does not keep; pass a first-order optimizer "
                         f"(e.g. --opt adamw, lamb or sgd)")
    if args.lr_base_scale not in LR_BASE_SCALES:
        raise FatalError(f"--lr-base-scale {args.lr_base_scale} is not one of linear, sqrt; pass one of them, or "
                         f"leave it empty (sqrt for ada*/lamb optimizers, else linear)")
    from timm.optim import optimizer_kwargs
    twice = [k for k in optimizer_kwargs(cfg=args) if k in extra]
    if twice:
        k = twice[0]
        raise FatalError(f"--opt-kwargs {k}={extra[k]} repeats {FLAG_OF_KWARG.get(k, k)}, which the optimizer "
                         f"already gets; pass the value with {FLAG_OF_KWARG.get(k, k)} and drop {k}= from "
                         f"--opt-kwargs")
    if extra.get('fused') and extra.get('foreach'):
        raise FatalError('--opt-kwargs fused=True foreach=True: an optimizer runs one implementation; keep one of '
                         'them')
    from timm.optim import Adafactor, Lars, SGDW
    betas, counts = args.opt_betas, ((1, 2) if info.opt_class is Adafactor else (info.num_betas,))  # Adafactor: beta1
    if info.has_betas and betas is not None and len(betas) not in counts:
        example = ' '.join(['0.9', '0.999', '0.99'][:info.num_betas])
        raise FatalError(f"--opt-betas {' '.join(f'{b:g}' for b in betas)}: --opt {opt} takes "
                         f"{' or '.join(map(str, counts))} betas; pass {info.num_betas} values (e.g. --opt-betas "
                         f"{example})")
    if info.opt_class in (torch.optim.SGD, SGDW, Lars):  # their __init__: Nesterov needs momentum, no dampening
        nesterov = extra.get('nesterov', (info.defaults or {}).get('nesterov', False))
        momentum, dampening = extra.get('momentum', args.momentum), extra.get('dampening', 0)
        if nesterov and momentum <= 0:
            raise FatalError(f"--opt {opt} uses Nesterov momentum, which needs --momentum > 0 (got {momentum:g}); "
                             f"pass e.g. --momentum 0.9, or --opt-kwargs nesterov=False for SGD without Nesterov")
        if nesterov and dampening != 0:
            raise FatalError(f"--opt-kwargs dampening={dampening}: --opt {opt} uses Nesterov momentum, which needs "
                             f"dampening 0; drop dampening= or add nesterov=False")


def _schedule_rules(args: Any) -> None:
    sched, epochs, warmup = args.sched, args.epochs, args.warmup_epochs
    if sched == 'plateau' and args.sched_on_updates:
        raise FatalError('--sched plateau steps once per epoch on the eval metric; drop --sched-on-updates or pass '
                         'another --sched (e.g. cosine)')
    if sched == 'plateau' and args.decay_rate >= 1:
        raise FatalError(f'--decay-rate {args.decay_rate:g}: --sched plateau multiplies the lr by it on a plateau '
                         f'(torch ReduceLROnPlateau needs a factor < 1); pass e.g. --decay-rate 0.1')
    if sched in ('wsd', 'rsqrt'):
        length = epochs if args.warmup_prefix else epochs - warmup
        if length <= 0:
            raise FatalError(f'--sched {sched}: --warmup-epochs {warmup} leaves none of --epochs {epochs} for the '
                             f'stable and decay phases; pass more --epochs, fewer --warmup-epochs, or --warmup-prefix '
                             f'(warm-up before the --epochs)')
        span = f"--epochs {epochs}{'' if args.warmup_prefix else f' - --warmup-epochs {warmup}'} = {length}"
        decay = args.decay_epochs
        if decay >= 1 and (decay if args.sched_on_updates else round(decay)) > length:
            raise FatalError(f'--decay-epochs {decay:g}: --sched {sched} decays over the last --decay-epochs of '
                             f'the stable and decay phases ({span} epochs); pass --decay-epochs <= {length}, or a '
                             f'fraction such as 0.2')
        if decay < 1 and not args.sched_on_updates and round(decay * length) < 1:
            raise FatalError(f'--decay-epochs {decay:g} is a fraction of the {length} stable and decay epochs of '
                             f'--sched {sched} ({span}) that rounds to 0 epochs; pass at least {1 / length:.3g} '
                             f'(one epoch)')
        if sched == 'rsqrt' and warmup == 0:
            raise FatalError('--sched rsqrt scales the lr by (1 + t / --warmup-epochs) ** -0.5, which needs '
                             '--warmup-epochs >= 1; pass e.g. --warmup-epochs 5, or --sched wsd')
    if sched == 'multistep':
        ms = list(args.decay_milestones or [])
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise FatalError(f"--decay-milestones {' '.join(map(str, ms))} must be strictly increasing (timm's "
                             f"multistep schedule assumes sorted epochs); pass e.g. "
                             f"{' '.join(map(str, sorted(set(ms))))}")
    noise = args.lr_noise
    if noise is not None and sched != 'none':
        shown = ' '.join(f'{n:g}' for n in noise)
        if len(noise) > 2:
            raise FatalError(f'--lr-noise {shown}: pass one value (noise from that fraction of the schedule on) '
                             f'or two (on, off), e.g. --lr-noise 0.4 0.9')
        if len(noise) == 2 and noise[0] >= noise[1]:
            raise FatalError(f'--lr-noise {shown}: noise is on from the first fraction until the second, so the '
                             f'first must be smaller or there is no noise; pass e.g. --lr-noise {noise[1]:g} '
                             f'{noise[0]:g}')
        if noise[0] > 1:
            raise FatalError(f'--lr-noise {shown}: the values are fractions of the schedule (0.4 = 40%), so noise '
                             f'would start after it ends; pass e.g. --lr-noise 0.4 0.9')
        if args.lr_noise_pct <= 0:
            raise FatalError(f'--lr-noise-pct {args.lr_noise_pct:g} with --lr-noise: timm redraws the noise until '
                             f'|noise| < --lr-noise-pct, which never happens at 0 (the run would hang); pass e.g. '
                             f'--lr-noise-pct 0.67')


def _opt_flags(args: Any) -> str:
    parts = [f'--opt {args.opt}', f'--lr {args.lr:g}' if args.lr is not None else f'--lr-base {args.lr_base:g}',
             f'--weight-decay {args.weight_decay:g}', f'--momentum {args.momentum:g}']
    if args.opt_eps is not None:
        parts.append(f'--opt-eps {args.opt_eps:g}')
    if args.opt_betas is not None:
        parts.append(f"--opt-betas {' '.join(f'{b:g}' for b in args.opt_betas)}")
    if args.opt_kwargs:
        parts.append(f'--opt-kwargs {_kwargs_text(args.opt_kwargs)}')
    return ' '.join(parts)


def _build_optimizer(args: Any) -> None:
    """timm's factory on a dummy module with the run's kwargs, then one step on a gradient of ones."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    kwargs = optimizer_kwargs(cfg=args)
    kwargs.pop('layer_decay', None)  # needs the model's layer grouping
    if kwargs['lr'] is None:  # resolved from --lr-base and the global batch later: same sign, same checks
        kwargs['lr'] = args.lr_base
    model = nn.Linear(4, 4)
    stage = 'be built'
    try:
        with warnings.catch_warnings(), torch.compiler.set_stance('force_eager'):  # kron compiles its step
            warnings.simplefilter('ignore')  # kron's note on opt_einsum
            optimizer = create_optimizer_v2(model, **kwargs, **(args.opt_kwargs or {}))
            stage = 'take a step'
            model(torch.ones(2, 4)).square().mean().backward()
            optimizer.step()
    except Exception as e:  # the class's own checks, in whatever form they take
        from timm.optim import get_optimizer_class
        cls = getattr(get_optimizer_class(_opt_name(args.opt), bind_defaults=False), '__name__', 'the optimizer')
        hint = f'; --opt-kwargs takes keywords of {cls}.__init__' if args.opt_kwargs else ''
        raise FatalError(f'--opt {args.opt}: the optimizer ({cls}) cannot {stage} with {_opt_flags(args)} '
                         f'({short(e).rstrip(".")}); correct these flags{hint}') from None


def _sched_flags(args: Any) -> str:
    names = {'cosine': ('epochs', 'warmup_epochs', 'lr_cycle_mul', 'lr_cycle_decay', 'lr_cycle_limit', 'lr_k_decay',
                        'cooldown_epochs', 'min_lr'),
             'step': ('decay_epochs', 'decay_rate', 'warmup_epochs'), 'multistep': ('decay_milestones', 'decay_rate'),
             'plateau': ('decay_rate', 'patience_epochs', 'min_lr'), 'wsd': ('epochs', 'warmup_epochs', 'decay_epochs')}
    names['tanh'] = names['cosine']
    names['poly'] = names['cosine'] + ('decay_rate',)
    names['rsqrt'] = names['wsd']
    shown = []
    for dest in names.get(args.sched, ('epochs', 'warmup_epochs')):
        v = getattr(args, dest)
        shown.append(f"--{dest.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else f'{v:g}'}")
    return ' '.join([f'--sched {args.sched}'] + shown)


def _build_schedule(args: Any) -> None:
    """timm's factory on a dummy optimizer, then the lr at every epoch boundary the run reaches (noise off)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    lr = args.lr if args.lr is not None else args.lr_base
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    per_epoch = UPDATES_PER_EPOCH if args.sched_on_updates else 1
    epoch = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # plateau's deprecation, cosine's single-cycle note
            scheduler, num_epochs = create_scheduler_v2(
                optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
                updates_per_epoch=per_epoch)
        if scheduler is None:
            return
        scheduler.noise_range_t = None  # noise scales the lr by < --lr-noise-pct; its draws are not needed here
        for epoch in range(num_epochs + 1):
            if args.sched_on_updates:
                scheduler.step_update(epoch * per_epoch)
            else:
                scheduler.step(epoch)
            value = optimizer.param_groups[0]['lr']
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f'lr {value}')
    except Exception as e:
        at = '' if epoch is None else f' at epoch {epoch}'
        hint = ('; --lr-cycle-mul < 1 shrinks each cycle, and the schedule cannot run past the total length of all '
                'cycles (fewer --lr-cycle-limit or --cooldown-epochs, or --lr-cycle-mul >= 1)'
                if args.sched in CYCLE_SCHEDULERS and args.lr_cycle_mul < 1 else '')
        raise FatalError(f'--sched {args.sched}: the lr schedule fails{at} with {_sched_flags(args)} '
                         f'({short(e).rstrip(".")}); correct these flags{hint}') from None


def check_optim_sched(args: Any) -> None:
    """The optimizer and the LR schedule train_kd.py will build can be built and run; else one FatalError."""
    from timm.optim import get_optimizer_info
    info = get_optimizer_info(_opt_name(args.opt))  # unknown names: check_train_choices
    _optimizer_rules(args, info)
    _schedule_rules(args)
    py_state = random.getstate()  # torch's through fork_rng; numpy's is not used by timm.optim / timm.scheduler
    try:
        with torch.random.fork_rng(devices=[]):
            if not isinstance(info.opt_class, str):
                _build_optimizer(args)
            _build_schedule(args)
    finally:
        random.setstate(py_state)
