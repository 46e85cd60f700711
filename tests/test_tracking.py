"""--log-wandb (timm's tracking flags): a real offline run holds every loss term, img/s, the eval top-1, teacher
agreement and KL and the teacher's identity; a run stopped by a signal and resumed with --resume auto continues the
same wandb run id; a missing wandb stops before anything is written. The offline run file is read back with the
protobuf records of wandb itself (its LevelDB-style log: 32 KiB blocks, 7-byte record headers)."""
import ast
import glob
import json
import os
import signal
import struct
import sys
import time

import pytest

import train_kd
from runtime.tracking import RUN_ID_FILE, check_tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures('one_thread')


def _records(path):
    """Every wandb Record of an offline run file (``run-<id>.wandb``)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, 'rb') as f:
        data = f.read()
    assert struct.unpack('<4sHB', data[:7])[:2] == (b':W&B', 0xBEE1), path
    pos, buf, out = 7, b'', []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b''
    return out


def _offline_runs(run_dir, run_id):
    """[(run record, config, history rows)] of every offline run folder of ``run_id`` in ``run_dir``/wandb, oldest
    first (one folder per process: a resumed run writes a new folder under the same id)."""
    out = []
    for folder in sorted(glob.glob(os.path.join(run_dir, 'wandb', f'offline-run-*-{run_id}'))):  # start time first
        run, config, history = None, {}, []
        path, deadline = os.path.join(folder, f'run-{run_id}.wandb'), time.time() + 30
        records = _records(path)
        while not [r for r in records if r.WhichOneof('record_type') == 'exit'] and time.time() < deadline:
            time.sleep(0.2)  # wandb's service process may still be writing the file when finish() returns
            records = _records(path)
        for r in records:
            kind = r.WhichOneof('record_type')
            if kind == 'run':
                run = r.run
            if kind in ('run', 'config'):
                updates = r.run.config.update if kind == 'run' else r.config.update
                config.update({u.key: json.loads(u.value_json) for u in updates})
            elif kind == 'history':
                history.append({i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        out.append((run, config, history))
    return out


def _argv(data, out, teacher_ckpt, *extra):
    return ['--data-dir', data, '--model', 'scalekd_demo_resnet', '-b', '6', '-j', '0', '--output', str(out),
            '--experiment', 'run', '--lr', '0.01', '--warmup-epochs', '0', '--log-interval', '1',
            '--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt,
            '--log-wandb', '--wandb-project', 'scalekd-tests', '--wandb-tags', 'demo', 'offline', *extra]


def test_offline_run_holds_every_term_and_resume_auto_continues_the_same_run(
        image_folder, teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    calls = []
    real = train_kd.stop_requested

    def stop_in_epoch_1(distributed, device):  # 2 updates per epoch: the 3rd check is epoch 1's first update
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(distributed, device)

    monkeypatch.setattr(train_kd, 'stop_requested', stop_in_epoch_1)
    assert train_kd.main(_argv(image_folder, tmp_path, teacher_ckpt, '--epochs', '2')) == 75
    run_dir = tmp_path / 'run'
    assert os.path.isfile(run_dir / 'recovery-1-0.pth.tar')
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert len(glob.glob(str(run_dir / 'wandb' / 'offline-run-*'))) == 1
    [(run, config, history)] = _offline_runs(run_dir, run_id)
    assert run.run_id == run_id and run.project == 'scalekd-tests' and list(run.tags) == ['demo', 'offline']
    # the teacher's identity (args.yaml's lines) and the settings
    assert len(config['teacher_sha256']) == 64 and config['teacher_source'] == teacher_ckpt
    assert config['distiller'] == 'scalekd' and config['model'] == 'scalekd_demo_resnet'
    train = [h for h in history if 'train/step' in h]
    assert [h['train/step'] for h in train] == [1, 2, 3]
    for term in ('loss', 'loss_cls', 'loss_kd', 'loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt', 'img_per_s',
                 'teacher_ms', 'lr', 'grad_norm'):
        assert all(f'train/{term}' in h for h in train), term
    assert all(h['train/loss_s4'] > 0 and h['train/img_per_s'] > 0 for h in train)
    evals = [h for h in history if 'epoch' in h]
    assert [h['epoch'] for h in evals] == [0]  # epoch 1 was stopped before its validation
    assert {'eval/top1', 'eval/top5', 'eval/agree_top1', 'eval/kl_teacher'} <= set(evals[0])
    # the values are the run's: the epoch's eval top-1 of summary.csv
    with open(run_dir / 'summary.csv') as f:
        header, row = f.readline().strip().split(','), f.readline().strip().split(',')
    assert evals[0]['eval/top1'] == pytest.approx(float(row[header.index('eval_top1')]))

    # the requeue: the same command with --resume auto continues the same wandb run
    monkeypatch.setattr(train_kd, 'stop_requested', real)
    assert train_kd.main(_argv(image_folder, tmp_path, teacher_ckpt, '--epochs', '2', '--resume', 'auto')) == 0
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    assert len(glob.glob(str(run_dir / 'wandb' / 'offline-run-*'))) == 2  # one folder per process, one id
    first, (run2, _, history2) = _offline_runs(run_dir, run_id)
    assert first[2] == history and run2.run_id == run_id
    assert [h['train/step'] for h in history2 if 'train/step' in h] == [4]  # the update after the recovery point
    assert [h['epoch'] for h in history2 if 'epoch' in h] == [1]
    assert {'train/loss_s3_alt', 'train/img_per_s'} <= set(history2[0])


@pytest.mark.parametrize('extra, message', [
    ([], 'pip install wandb'),
    (['--wandb-resume-id', 'abc123'], 'needs --resume'),
])
def test_refused_before_anything_is_written(image_folder, teacher_ckpt, tmp_path, monkeypatch, caplog, extra,
                                            message):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    if not extra:
        monkeypatch.setitem(sys.modules, 'wandb', None)  # as if it were not installed
    assert train_kd.main(_argv(image_folder, tmp_path, teacher_ckpt, '--epochs', '1', *extra)) == 2
    assert message in [r.getMessage() for r in caplog.records if r.levelname == 'ERROR'][-1]
    assert not os.path.exists(tmp_path / 'run')


def test_flags_parse_as_timm_and_wandb_is_imported_only_when_asked(monkeypatch):
    args = train_kd.build_parser().parse_args(['--log-wandb', '--wandb-project', 'p', '--wandb-tags', 'a', 'b',
                                               '--wandb-resume-id', 'x1'])
    assert (args.log_wandb, args.wandb_project, args.wandb_tags, args.wandb_resume_id) == (True, 'p', ['a', 'b'], 'x1')
    defaults = train_kd.build_parser().parse_args([])
    assert (defaults.log_wandb, defaults.wandb_project, defaults.wandb_tags, defaults.wandb_resume_id) == \
        (False, None, [], '')
    assert {'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id'} <= train_kd.RESUME_FREE_KEYS
    # without wandb (timm's own `import wandb` is guarded too) a run without --log-wandb passes the check
    monkeypatch.setitem(sys.modules, 'wandb', None)
    check_tracking(defaults)
    # and the project imports wandb only inside the functions --log-wandb calls
    for path in glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, '*', '*.py')):
        with open(path) as f:
            tree = ast.parse(f.read())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not [n for n in top if 'wandb' in ast.dump(n)], path


def test_a_joint_run_tracks_each_student_in_its_own_run(image_folder, teacher_ckpt, tmp_path, monkeypatch):
    """--log-wandb with several students: one tracking run per student's folder, each holding that student's terms."""
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_SILENT', 'true')
    argv = _argv(image_folder, tmp_path, teacher_ckpt, '--epochs', '1', '--loss-balance-factor', '0')
    argv[argv.index('--model') + 1], argv[argv.index('--distiller') + 1] = \
        'scalekd_demo_resnet,scalekd_demo_resnet', 'scalekd,kd'
    assert train_kd.main(argv) == 0
    ids = {}
    for sub, own, other in (('scalekd_demo_resnet-scalekd', 'loss_s3', None), ('scalekd_demo_resnet-kd', 'loss_kd',
                                                                              'loss_s3')):
        run_dir = tmp_path / 'run' / sub
        ids[sub] = (run_dir / RUN_ID_FILE).read_text().strip()
        [(run, config, history)] = _offline_runs(run_dir, ids[sub])
        train = [h for h in history if 'train/step' in h]
        assert run.run_id == ids[sub] and config['distiller'] == sub.rsplit('-', 1)[1] and len(train) == 2
        assert all(f'train/{own}' in h for h in train) and not (other and any(f'train/{other}' in h for h in train))
    assert len(set(ids.values())) == 2
