"""Issue 17: bad input never yields a wrong number or a bare traceback.

Every refused run exits with code 2, its last output line is the message (the last log record in-process,
the last line of stderr/stdout of a subprocess), and an existing run folder it points at stays
byte-for-byte unchanged. Most runs go in-process through ``train_kd.main``; a few through a subprocess
where the real console output matters (parser errors, loader workers, torchrun).
"""
import hashlib
import logging
import math
import os
import subprocess
import sys

import pytest
import timm
import torch

import export
import models  # noqa: F401
import train_kd
import validate
from conftest import make_image_folder
from runtime.flag_domains import FLAG_DOMAINS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures('one_thread')


def _argv(root, data, *extra, exp='run'):
    return ['--data-dir', str(data), '--model', 'scalekd_demo_resnet', '-b', '4', '--epochs', '1', '-j', '0',
            '--lr', '0.01', '--warmup-epochs', '0', '--loss-balance-factor', '0', '--log-interval', '1',
            '--output', str(root), '--experiment', exp, *extra]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    """A data folder, a teacher checkpoint and a finished run (the folder every refused run points at)."""
    root = tmp_path_factory.mktemp('pre')
    data = make_image_folder(root / 'data', classes=3, per_class=4)
    torch.manual_seed(0)
    torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=3).state_dict()},
               root / 'teacher.pth')
    assert train_kd.main(_argv(root, data, '--checkpoint-hist', '3')) == 0
    return root, data, str(root / 'teacher.pth')


def _snapshot(folder):
    out = {}
    for d, _, files in os.walk(folder):
        out[os.path.relpath(d, folder) + '/'] = ''
        for f in files:
            with open(os.path.join(d, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _last_record(caplog):
    records = [r for r in caplog.records if r.name != 'timm.models._builder']
    return records[-1]


def _refused(env, caplog, extra, expect, data=None, main=train_kd.main):
    """``main(argv)`` exits with 2, its last log record is the ERROR ``expect``, the run folder is unchanged."""
    root, default_data, _ = env
    run = os.path.join(root, 'run')
    before = _snapshot(run)
    caplog.clear()
    rc = main(_argv(root, data or default_data, *extra) if main is train_kd.main else extra)
    last = _last_record(caplog)
    assert rc == 2, caplog.text[-2000:]
    assert last.levelname == 'ERROR' and expect in last.getMessage(), last.getMessage()
    assert _snapshot(run) == before
    return last.getMessage()


def _subprocess(cmd, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', **(env_extra or {}))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


# --- silently wrong results before: now refused -------------------------------------------------------------
def test_silently_wrong_data_is_refused(env, tmp_path, caplog):
    root, _, _ = env
    # train/ but no validation split: timm would validate on the whole folder (the training images)
    only_train = make_image_folder(tmp_path / 'only_train', splits=('train',))
    msg = _refused(env, caplog, [], "has no 'validation' split", data=only_train)
    assert "pass --val-split '' to train without validation" in msg
    # a validation split that lacks a training class: indices would shift by one from that class on
    lacking = make_image_folder(tmp_path / 'lacking')
    for f in os.listdir(os.path.join(lacking, 'validation', 'class1')):
        os.remove(os.path.join(lacking, 'validation', 'class1', f))
    os.rmdir(os.path.join(lacking, 'validation', 'class1'))
    msg = _refused(env, caplog, [], 'does not have the class folders of the train split', data=lacking)
    assert 'missing there: class1' in msg
    extra = make_image_folder(tmp_path / 'extra', classes=3)
    make_image_folder(tmp_path / 'extra_v', classes=4, splits=('validation',))
    os.rename(os.path.join(tmp_path / 'extra_v', 'validation', 'class3'), os.path.join(extra, 'validation', 'class3'))
    _refused(env, caplog, [], 'not in the train split: class3', data=extra)
    # a batch larger than the training set: zero updates (drop_last), yet a "best metric" before
    msg = _refused(env, caplog, ['-b', '64'], '--batch-size 64 is larger than the train split')
    assert '(12 images)' in msg and 'Pass --batch-size 12 or less' in msg
    # a directory symlink loop: the loader would read the same files again and again
    loop = make_image_folder(tmp_path / 'loop')
    os.symlink(os.path.join(loop, 'train'), os.path.join(loop, 'train', 'class0', 'again'))
    _refused(env, caplog, [], 'the data folder has a symlink loop', data=loop)
    # a symlinked class folder that is not a loop trains as before; --val-split '' trains without validation
    linked = make_image_folder(tmp_path / 'linked')
    os.rename(os.path.join(linked, 'train', 'class2'), tmp_path / 'elsewhere')
    os.symlink(tmp_path / 'elsewhere', os.path.join(linked, 'train', 'class2'))
    assert train_kd.main(_argv(tmp_path, linked, exp='linked')) == 0
    assert train_kd.main(_argv(tmp_path, only_train, '--val-split', '', exp='noval')) == 0


# --- bare tracebacks before: now one message ----------------------------------------------------------------
def test_recipe_that_is_not_text_or_not_a_mapping(env, tmp_path):
    root, data, _ = env
    before = _snapshot(os.path.join(root, 'run'))
    for content, expect in ((bytes(range(256)), 'is not a text file'),
                            (b'- lr: 0.1\n- epochs: 3\n', 'must be a mapping of keys to values, got list'),
                            (b'optim: {lr: [\n', 'is not valid YAML')):
        recipe = tmp_path / 'recipe.yaml'
        recipe.write_bytes(content)
        rc, out = _subprocess([sys.executable, 'train_kd.py', '--config', str(recipe)] + _argv(root, data))
        assert rc == 2, out[-2000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith('train_kd.py: error: ') and expect in last, last
        assert 'Traceback' not in out
    assert _snapshot(os.path.join(root, 'run')) == before


def test_empty_class_folder_in_train(env, tmp_path, caplog):
    data = make_image_folder(tmp_path / 'd')
    for split in ('train', 'validation'):
        os.makedirs(os.path.join(data, split, 'class9'))
    msg = _refused(env, caplog, [], "holds no images (1 empty class folder(s): class9)", data=data)
    assert 'add images' in msg


def test_scalekd_student_without_grids_and_sizes_models_cannot_take(env, tmp_path, caplog):
    root, data, teacher = env
    kd = ['--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher,
          '--teacher-img-size', '32']
    msg = _refused(env, caplog, kd + ['--model', 'pit_ti_224', '--img-size', '224'],
                   '--distiller scalekd cannot pair student pit_ti_224 with teacher scalekd_demo_vit')
    assert 'tokens do not fold onto a 14x14 grid' in msg and 'tap 1: 128x14x14' in msg and '96x8x8' in msg
    msg = _refused(env, caplog, kd + ['--model', 'crossvit_tiny_240', '--img-size', '240'],
                   '--distiller scalekd cannot pair student crossvit_tiny_240')
    assert 'use a CNN, ViT/Mixer or Swin student' in msg
    # an image size the student cannot take
    msg = _refused(env, caplog, ['--model', 'vit_tiny_patch16_224', '--img-size', '30'],
                   'student vit_tiny_patch16_224 cannot take 3x30x30 input (it is built for 224 px, its patch size '
                   'is 16)')
    assert msg.endswith('or build it for 30 px with --model-kwargs img_size=30')
    # a teacher built for 224 px fed the student's 32 px batch
    path = tmp_path / 'vit224.pth'
    torch.save({'state_dict': timm.create_model('vit_tiny_patch16_224', num_classes=3).state_dict()}, path)
    _refused(env, caplog, ['--distiller', 'kd', '--teacher', 'vit_tiny_patch16_224', '--teacher-checkpoint',
                           str(path)], 'teacher vit_tiny_patch16_224 cannot take 3x32x32 input')


def test_export_and_validate_into_a_missing_folder(env, tmp_path, caplog):
    root, data, _ = env
    ckpt = os.path.join(root, 'run', 'last.pth.tar')
    out = tmp_path / 'no' / 'such' / 'student.safetensors'
    _refused(env, caplog, ['--checkpoint', ckpt, '--output', str(out)], 'the folder of --output', main=export.main)
    assert not (tmp_path / 'no').exists()
    _refused(env, caplog, ['--data-dir', data, '--checkpoint', ckpt, '--results-file', str(out)],
             'the folder of --results-file', main=validate.main)
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    _refused(env, caplog, [], 'is not writable (Not a directory)', main=lambda argv: train_kd.main(
        _argv(blocker / 'sub', data)))
    assert blocker.read_text() == 'x'


def _bad_images(folder, n):
    data = make_image_folder(folder, classes=3, per_class=20)
    for c in range(3):
        for i in range(n):
            with open(os.path.join(data, 'train', f'class{c}', f'bad{i}.png'), 'wb') as f:
                f.write(b'not an image')
    return data


def test_unreadable_image_limit_message_is_printed_last(env, tmp_path):
    root, _, _ = env
    data = _bad_images(tmp_path / 'bad', 8)
    # found while training (not before step 0), so this run writes its own folder
    rc, out = _subprocess([sys.executable, 'train_kd.py'] + _argv(tmp_path, data, '-j', '3', '--max-bad-images', '3',
                                                                  exp='bad'))
    assert rc == 2, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith('ERROR: more than --max-bad-images 3 images of the train split could not be read'), last
    assert 'Traceback' not in out and not os.path.exists(tmp_path / 'bad' / 'last.pth.tar')


# --- numeric flags: many invalid values each, never a traceback ---------------------------------------------
def _invalid_values(kind, low, high):
    lo = low[1] if isinstance(low, tuple) else low
    hi = high[1] if isinstance(high, tuple) else high
    bad = []
    if lo is not None:
        bad += [lo - 1, lo - 1000] + ([lo] if isinstance(low, tuple) else []) + ([lo - 0.5] if kind == 'float' else [])
    if hi is not None:
        bad += [hi + 1, hi * 10 + 7] + ([hi] if isinstance(high, tuple) else []) + \
            ([hi + 0.5] if kind == 'float' else [])
    if kind == 'float':
        bad += [math.nan, math.inf, -math.inf]
    return bad


def _fmt(v):
    return repr(v) if isinstance(v, float) and math.isfinite(v) else str(v) if isinstance(v, int) else \
        {'nan': 'nan', 'inf': 'inf', '-inf': '-inf'}[str(v)]


def test_every_numeric_flag_refuses_values_outside_its_domain(env, caplog, capsys):
    root, data, _ = env
    actions = {a.dest: a for a in train_kd.build_parser()._actions}
    before = _snapshot(os.path.join(root, 'run'))
    tried = 0
    for dest, (kind, low, high, _) in FLAG_DOMAINS.items():
        action = actions.get(dest)
        if action is None:
            continue
        flag = action.option_strings[-1]
        n = action.nargs if isinstance(action.nargs, int) else 1
        extra = []
        if dest.startswith('scalekd_') or dest in ('kd_temperature', 'kd_weight', 'teacher_img_size'):
            extra = ['--distiller', 'kd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', env[2]]
        elif dest in ('kd_student_feature_dim', 'kd_teacher_feature_dim'):  # refused for any other distiller
            extra = ['--distiller', 'feature', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', env[2]]
        for v in _invalid_values(kind, low, high):
            caplog.clear()
            argv = _argv(root, data, *extra, flag, *([_fmt(v)] * n))
            try:
                rc = train_kd.main(argv)
                message = _last_record(caplog).getMessage()
            except SystemExit as e:  # refused by the parser (argparse's own checks)
                rc, message = e.code, capsys.readouterr().err.strip().splitlines()[-1]
            tried += 1
            assert rc == 2, (flag, v)
            assert flag in message or dest in message, (flag, v, message)
    assert tried > 200
    assert _snapshot(os.path.join(root, 'run')) == before


def test_numeric_flags_of_validate_and_export(env, caplog):
    root, data, _ = env
    ckpt = os.path.join(root, 'run', 'last.pth.tar')
    for v in ('0', '-3'):
        _refused(env, caplog, ['--data-dir', data, '--checkpoint', ckpt, '-b', v], f'--batch-size {v}',
                 main=validate.main)
        _refused(env, caplog, ['--checkpoint', ckpt, '-b', v, '--validate-data', data], f'--batch-size {v}',
                 main=export.main)


# --- teacher flags: --teacher-kwargs img_size= is --teacher-img-size, in train_kd.py and validate.py ----------
def test_teacher_img_size_from_kwargs_in_train_and_validate(env, tmp_path, caplog):
    root, data, _ = env
    path = tmp_path / 'vit32.pth'
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=16)
    torch.save({'state_dict': vit.state_dict()}, path)
    teacher = ['--teacher', 'vit_tiny_patch16_224', '--teacher-checkpoint', str(path)]
    assert train_kd.main(_argv(tmp_path, data, '--distiller', 'kd', *teacher, '--teacher-kwargs', 'img_size=32',
                               'patch_size=16', exp='kw')) == 0
    for flags in (['--teacher-kwargs', 'img_size=32', 'patch_size=16'],
                  ['--teacher-img-size', '32', '--teacher-kwargs', 'patch_size=16']):
        got = validate.validate_main(['--data-dir', data, '-j', '0', *teacher, *flags])
        assert 0 <= got['top1'] <= 100
    _refused(env, caplog, ['--data-dir', data, *teacher, '--teacher-img-size', '64', '--teacher-kwargs',
                           'img_size=32', 'patch_size=16'], '--teacher-img-size 64 and --teacher-kwargs img_size=32 '
                                                          'disagree', main=validate.main)


# --- distributed: the unreadable-image limit counts every rank -----------------------------------------------
def test_unreadable_images_on_both_ranks_stop_at_the_global_limit(tmp_path):
    from test_distributed import _finish, _launch
    data = make_image_folder(tmp_path / 'data', classes=2, per_class=4, splits=('train',))
    files = sorted((os.path.join(data, 'train', f'class{c}', f'{i}.png') for c in range(2) for i in range(4)))
    # the DistributedSampler of epoch 0 (seed 0) gives each rank four indices: break one image of each rank
    shards = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(range(len(files)), num_replicas=2, rank=rank)
        sampler.set_epoch(0)
        shards.append(list(sampler))
    n = len(files)
    i0, i1 = next((a, b) for a in shards[0] for b in shards[1]  # a skipped image is replaced by the next one
                  if (a + 1) % n not in (a, b) and (b + 1) % n not in (a, b))
    for i in (i0, i1):
        with open(files[i], 'wb') as f:
            f.write(b'not an image')
    argv = ['--data-dir', data, '--val-split', '', '--model', 'scalekd_demo_resnet', '-b', '2', '--epochs', '2',
            '-j', '0', '--lr', '0.01', '--warmup-epochs', '0', '--loss-balance-factor', '0', '--log-interval', '1',
            '--max-bad-images', '1', '--output', str(tmp_path), '--experiment', 'two']
    rc, out = _finish(_launch(2, argv))
    assert rc != 0, out[-3000:]
    assert out.count('more than --max-bad-images 1 images of the train split could not be read (2 across 2 '
                     'processes') == 2, out[-3000:]
    assert 'Best metric' not in out and not os.path.exists(tmp_path / 'two' / 'last.pth.tar')


# --- TensorBoard after a resume: one event per step ----------------------------------------------------------
def test_resume_with_tensorboard_has_one_event_per_step(env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root, data, _ = env
    argv = _argv(tmp_path, data, '--epochs', '2', '--checkpoint-hist', '3', exp='tb')
    assert train_kd.main(argv) == 0
    # resume from the first epoch's checkpoint: the second epoch's updates are trained (and logged) again
    assert train_kd.main(argv + ['--resume', str(tmp_path / 'tb' / 'checkpoint-0.pth.tar')]) == 0
    acc = EventAccumulator(str(tmp_path / 'tb' / 'tb'), size_guidance={'scalars': 0})
    acc.Reload()
    tags = [t for t in acc.Tags()['scalars'] if t.startswith('train/')]
    assert 'train/loss' in tags
    for tag in tags:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)) == list(range(1, 7)), (tag, steps)


# --- a teacher without a checkpoint: rank 0's weights on every rank -----------------------------------------
def _rank_teacher(rank, init_file, out):
    import torch.distributed as dist
    from runtime.distributed import broadcast_module
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    torch.manual_seed(rank)  # what seed + rank gives each rank before the teacher is created
    teacher = timm.create_model('scalekd_demo_vit', num_classes=3)
    broadcast_module(teacher)
    torch.save(teacher.state_dict(), f'{out}.{rank}')
    dist.destroy_process_group()


def test_teacher_without_checkpoint_is_rank_0s_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(_rank_teacher, args=(str(tmp_path / 'init'), str(tmp_path / 'teacher')), nprocs=2)
    a, b = (torch.load(tmp_path / f'teacher.{r}', weights_only=True) for r in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    ref = timm.create_model('scalekd_demo_vit', num_classes=3).state_dict()
    assert all(torch.equal(a[k], ref[k]) for k in a)


# --- names and files that failed only once the models were built (or after an epoch) ------------------------
@pytest.mark.parametrize('extra,expect', [
    (['--opt', 'adamq'], '--opt adamq is not an optimizer of timm'),
    (['--sched', 'cosin'], '--sched cosin is not one of cosine, tanh'),
    (['--eval-metric', 'top9'], '--eval-metric top9 is not one of top1, top5, loss'),
    (['--clip-grad', '1', '--clip-mode', 'l2'], '--clip-mode l2 is not one of norm, value, agc'),
    (['--class-map', 'no_such_map.txt'], "--class-map 'no_such_map.txt' does not exist"),
    (['--initial-checkpoint', 'no_such.pth'], "--initial-checkpoint 'no_such.pth' does not exist"),
    (['--model-kwargs', 'depthh=3'], 'student scalekd_demo_resnet cannot be built with --model-kwargs depthh=3'),
    (['--distiller', 'kd', '--teacher', 'scalekd_demo_vit', '--teacher-kwargs', 'heads=3'],
     'teacher scalekd_demo_vit cannot be built with --teacher-kwargs heads=3'),
    (['--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit', '--scalekd-heads-s3', '7'],
     'CAP width 96 is not divisible by 7 heads'),
    (['--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit', '--scalekd-tail-blocks', '9'],
     'teacher tail of 9 blocks is out of range for a 4-block teacher'),
    (['--scale', '0.9', '0.1'], '--scale 0.9 0.1: the first (smallest crop area) must not exceed the second'),
    (['--mean', '0.5', '--std', '0.5', '0.5'], '--mean has 1 values but --std 2'),
])
def test_names_and_files_refused_before_step_0(env, caplog, extra, expect):
    if '--teacher' in extra:
        extra = extra + ['--teacher-checkpoint', env[2]]
    _refused(env, caplog, extra, expect)
