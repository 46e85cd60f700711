"""Issue 22: optimizer and LR-schedule flags that timm's factories reject (or that hang, or are ignored silently)
stop before step 0 with one message naming the flags, exit code 2, and no run folder.

Most cases call ``runtime.optim_checks.check_optim_sched`` on parsed args directly (milliseconds each); a few go
end-to-end through ``train_kd.main``. Every optimizer timm lists and every scheduler of the factory, with the
default flags, is not refused (no false refusals), and each rule that stands for a timm rejection is matched by
timm itself rejecting the same flags (the rules are not stricter than timm).
"""
import os
import random

import numpy as np
import pytest
import torch
from timm.optim import get_optimizer_info, list_optimizers

import models  # noqa: F401  (registers the demo models)
import train_kd
from conftest import make_image_folder
from runtime import optim_checks
from runtime.errors import FatalError
from runtime.optim_checks import check_optim_sched
from runtime.flag_domains import check_numeric_flags
from runtime.preflight import SCHEDULERS, check_train_choices


def _args(*extra):
    args, _ = train_kd._parse_args(['--data-dir', 'd', '--model', 'resnet18', *extra])
    return args


def _refusal(*extra) -> str:
    with pytest.raises(FatalError) as e:
        check_optim_sched(_args(*extra))
    return str(e.value)


# (flags, text the message must hold, timm itself rejects these flags: True, or what happens instead)
BAD = [
    # optimizer
    ('--opt sgd --momentum 0', '--opt sgd uses Nesterov momentum, which needs --momentum > 0', True),
    ('--opt nesterov --momentum 0', '--opt-kwargs nesterov=False', True),
    ('--opt sgdw --momentum 0', 'needs --momentum > 0 (got 0)', True),
    ('--opt csgdc --momentum 0', 'needs --momentum > 0', True),
    ('--opt nlars --momentum 0', 'needs --momentum > 0', True),
    ('--opt lookahead_sgd --momentum 0', 'needs --momentum > 0', True),
    ('--opt sgd --opt-kwargs dampening=0.1', '--opt-kwargs dampening=0.1', True),
    ('--opt adamw --opt-betas 0.9', '--opt-betas 0.9: --opt adamw takes 2 betas', True),
    ('--opt adamw --opt-betas 0.9 0.99 0.9', '--opt adamw takes 2 betas', 'ignores the third beta'),
    ('--opt adafactor --opt-betas 0.9 0.99 0.9', '--opt adafactor takes 1 or 2 betas', 'ignores all but the first'),
    ('--opt adan --opt-betas 0.9 0.99', '--opt adan takes 3 betas', True),
    ('--opt lamb --opt-betas 0.9 0.99 0.9', '--opt lamb takes 2 betas', True),
    ('--opt adamw --opt-kwargs lr=0.1', '--opt-kwargs lr=0.1 repeats --lr', True),
    ('--opt adamw --opt-eps 1e-8 --opt-kwargs eps=1e-6', 'repeats --opt-eps', True),
    ('--opt sgd --opt-kwargs momentum=0.5', 'repeats --momentum', True),
    ('--opt adamw --opt-kwargs fused=True foreach=True', '--opt-kwargs fused=True foreach=True', True),
    ('--opt lamb --opt-kwargs fused=True', "--opt lamb: the optimizer (Lamb) cannot be built", True),
    ('--opt adamw --opt-kwargs bogus=1', "unexpected keyword argument 'bogus'", True),
    ('--opt adamw --opt-kwargs caution=True', "--opt-kwargs takes keywords of AdamW.__init__", True),
    ('--opt adafactor --opt-kwargs warmup_init=True', 'warmup_init requires relative_step=True', True),
    ('--opt rmsprop --opt-kwargs alpha=-1', 'Invalid alpha value', True),
    ('--opt mars --opt-kwargs mars_type=sgd', 'MARS type not supported', True),
    ('--opt muon --opt-kwargs algo=foo', "Invalid algo: foo", True),
    ('--opt adadelta --opt-kwargs rho=2', 'Invalid rho value', True),
    ('--opt adagrad --opt-kwargs lr_decay=-1', 'Invalid lr_decay value', True),
    ('--opt nadam --opt-kwargs momentum_decay=-1', 'Invalid momentum_decay value', True),
    ('--opt adafactorbv --opt-kwargs momentum_dtype=int8', 'int8 dtype not supported', True),
    ('--opt fusedadam', "--opt fusedadam is apex's FusedAdam and needs CUDA", True),
    ('--opt bnbadamw8bit', "--opt bnbadamw8bit is bitsandbytes's AdamW8bit and needs CUDA", True),
    ('--opt adahessian', '--opt adahessian is a second-order optimizer', 'its first step raises in train_kd.py'),
    ('--opt foo_sgd', "--opt foo_sgd: timm reads only the last part ('sgd')", 'runs plain sgd'),
    ('--opt lookahead_foo_adamw', "so 'lookahead_foo_' would be ignored", 'runs lookahead_adamw'),
    ('--lr-base-scale sqr', '--lr-base-scale sqr is not one of linear, sqrt', 'scales linearly'),
    # schedule
    ('--sched plateau --sched-on-updates', '--sched plateau steps once per epoch', True),
    ('--sched plateau --decay-rate 1', '--decay-rate 1: --sched plateau', True),
    ('--sched wsd --epochs 5 --warmup-epochs 5', '--sched wsd: --warmup-epochs 5 leaves none of --epochs 5', True),
    ('--sched rsqrt --epochs 3 --warmup-epochs 4 --decay-epochs 0.5', 'leaves none of --epochs 3', True),
    ('--sched wsd --epochs 50', '--decay-epochs 90: --sched wsd decays over the last', True),
    ('--sched wsd --epochs 10 --warmup-epochs 5 --decay-epochs 0.05', '--decay-epochs 0.05 is a fraction', True),
    ('--sched rsqrt --epochs 10 --warmup-epochs 0 --decay-epochs 0.2', '--sched rsqrt scales the lr', True),
    ('--sched cosine --epochs 2 --warmup-epochs 0 --lr-cycle-mul 0.5 --lr-cycle-limit 5 --cooldown-epochs 1',
     '--sched cosine: the lr schedule fails at epoch 4', True),  # at the scheduler step after the last epoch
    ('--sched tanh --epochs 10 --warmup-epochs 0 --lr-cycle-mul 0.5 --cooldown-epochs 10',
     '--lr-cycle-mul < 1 shrinks each cycle', True),
    ('--sched poly --epochs 10 --warmup-epochs 0 --lr-cycle-mul 0.5 --cooldown-epochs 10 --sched-on-updates',
     '--sched poly: the lr schedule fails at epoch 20', True),
    ('--sched multistep --decay-milestones 30 20', '--decay-milestones 30 20 must be strictly increasing',
     'decays at the wrong epochs'),
    ('--sched multistep --decay-milestones 30 30', 'must be strictly increasing', 'decays twice at once'),
    ('--lr-noise 0.4 0.6 0.8', '--lr-noise 0.4 0.6 0.8: pass one value', 'ignores the third value'),
    ('--lr-noise 0.6 0.4', '--lr-noise 0.6 0.4: noise is on from the first fraction', 'never adds noise'),
    ('--lr-noise 40 60', '--lr-noise 40 60: the values are fractions', 'never adds noise'),
    ('--lr-noise 0.4 --lr-noise-pct 0', '--lr-noise-pct 0 with --lr-noise', 'hangs at epoch 120'),
]


@pytest.mark.parametrize('flags,expect,timm_rejects', BAD, ids=[b[0] for b in BAD])
def test_bad_combination_is_refused(flags, expect, timm_rejects):
    args = _args(*flags.split())
    check_numeric_flags(args)  # each passed the pre-flight as it was: a new refusal
    check_train_choices(args)
    msg = _refusal(*flags.split())
    assert expect in msg, msg
    assert msg.startswith('--'), msg  # the message opens with the flag at fault


@pytest.mark.parametrize('flags', [b[0] for b in BAD if b[2] is True and 'apex' not in b[1]
                                   and "bitsandbytes" not in b[1]])
def test_rule_is_not_stricter_than_timm(flags):
    """Each rule that stands for a timm rejection: timm's factory (the catch-all alone) rejects the same flags."""
    args = _args(*flags.split())
    with pytest.raises(FatalError):
        if '--sched' in flags or '--lr-noise' in flags:
            optim_checks._build_schedule(args)
        else:
            optim_checks._build_optimizer(args)


@pytest.mark.parametrize('prefix', ['', 'lookahead_'])
def test_every_timm_optimizer_with_default_flags_is_accepted(prefix):
    refused = {}
    for name in list_optimizers():
        info = get_optimizer_info(name)
        try:
            check_optim_sched(_args('--opt', prefix + name))
        except FatalError as e:
            refused[name] = str(e)
        if isinstance(info.opt_class, str):  # apex / bitsandbytes: need CUDA and their package
            msg = refused.pop(name, '')
            assert 'needs CUDA' in msg if not torch.cuda.is_available() else 'package' in msg or not msg, name
        elif info.second_order:  # adahessian: train_kd.py keeps no backward graph
            assert 'second-order' in refused.pop(name, ''), name
    assert refused == {}, refused
    assert len(list_optimizers()) > 80  # timm 1.0.31 lists 93


@pytest.mark.parametrize('sched', SCHEDULERS)
@pytest.mark.parametrize('on_updates', [False, True])
def test_every_scheduler_with_default_flags_is_accepted(sched, on_updates):
    extra = ['--sched-on-updates'] if on_updates else []
    if sched == 'plateau' and on_updates:
        assert 'steps once per epoch' in _refusal('--sched', sched, *extra)
        return
    check_optim_sched(_args('--sched', sched, *extra))
    check_optim_sched(_args('--sched', sched, '--epochs', '3', '--warmup-epochs', '1', '--decay-epochs', '0.5',
                            '--lr-noise', '0.5', '--decay-milestones', '1', *extra))


def test_good_corner_cases_are_accepted():
    for flags in ('--opt momentum --momentum 0', '--opt sgd --momentum 0 --opt-kwargs nesterov=False',
                  '--opt adafactor --opt-betas 0.9', '--opt adafactor --opt-betas 0.9 0.999',
                  '--opt adamw --opt-kwargs amsgrad=True',
                  '--opt adamw --opt-kwargs fused=True', '--opt sgd --opt-eps 1e-8',
                  '--sched wsd --epochs 50 --warmup-epochs 5 --decay-epochs 45.4',
                  '--sched wsd --epochs 5 --warmup-epochs 5 --warmup-prefix --decay-epochs 0.2',
                  '--sched wsd --epochs 10 --warmup-epochs 5 --decay-epochs 0.05 --sched-on-updates',
                  '--sched cosine --epochs 10 --lr-cycle-mul 0.5 --lr-cycle-limit 3 --warmup-epochs 0',
                  '--sched cosine --epochs 10 --lr-cycle-mul 2 --lr-cycle-limit 3',
                  '--sched none --lr-noise 0.6 0.4',
                  '--sched step --decay-rate 2', '--lr-base 0.5 --layer-decay 0.75', '--lr 0.1 --lr-base-scale sqrt'):
        check_optim_sched(_args(*flags.split()))


def test_check_leaves_rng_untouched():
    """The dummy builds and steps (kron draws, noise is off) leave torch, Python and NumPy RNG states as they were."""
    def seed():
        torch.manual_seed(3)
        random.seed(3)
        np.random.seed(3)

    def draw():
        return torch.rand(1).item(), random.random(), float(np.random.rand())

    seed()
    expect = draw()
    seed()
    check_optim_sched(_args('--opt', 'kron', '--lr-noise', '0.1'))
    assert draw() == expect


# --- end to end: train_kd.main exits 2 with the message as its last record, before the run folder exists ---------
@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('osc') / 'data', classes=3, per_class=2)


@pytest.mark.parametrize('flags,expect', [  # what each did before (measured)
    ('--opt sgd --momentum 0', '--opt sgd uses Nesterov momentum'),  # ValueError traceback once the models existed
    ('--sched wsd', '--decay-epochs 90: --sched wsd'),  # ValueError traceback after args.yaml and tb/ were written
    ('--lr-cycle-mul 0.5 --lr-cycle-limit 5 --cooldown-epochs 1',  # trained all 4 epochs, then a math domain error
     '--sched cosine: the lr schedule fails at epoch 4'),
    ('--lr-noise 0.5 --lr-noise-pct 0', '--lr-noise-pct 0 with --lr-noise'),  # hung in epoch 1, deaf to SIGTERM
])
def test_train_kd_refuses_before_the_run_folder(data, tmp_path, caplog, flags, expect):
    argv = ['--data-dir', data, '--model', 'scalekd_demo_resnet', '-b', '2', '--epochs', '2', '-j', '0',
            '--warmup-epochs', '0', '--loss-balance-factor', '0', '--output', str(tmp_path), '--experiment', 'run',
            *flags.split()]
    caplog.clear()
    assert train_kd.main(argv) == 2
    last = caplog.records[-1]
    assert last.levelname == 'ERROR' and expect in last.getMessage(), last.getMessage()
    assert not os.path.exists(tmp_path / 'run')
