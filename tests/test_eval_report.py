"""What a run folder tells without TensorBoard: teacher agreement and KL at validation, curves.png, the teacher's
identity in args.yaml; and validate.py comparing a student with its teacher."""
import csv
import glob
import hashlib
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models  # noqa: F401
import train_kd
import validate
from config import parse_args_with_recipe
from distillers.teacher import teacher_identity
from runtime.plot import read_summary, write_curves
from runtime.resume import append_summary

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _rows(run):
    with open(run / 'summary.csv') as f:
        return list(csv.DictReader(f))


def _argv(data, out, exp, teacher, *extra):
    return ['--data-dir', data, '--model', 'scalekd_demo_resnet', '-b', '6', '--epochs', '2', '-j', '0',
            '--output', str(out), '--experiment', exp, '--lr', '0.01', '--warmup-epochs', '0', '--log-interval', '5',
            '--distiller', 'kd', '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher, *extra]


def test_agreement_and_kl_on_hand_made_logits():
    ln3 = math.log(3.)
    s = torch.tensor([[0., ln3], [1., 5.], [0., 1.]])
    t = torch.tensor([[ln3, 0.], [1., 5.], [0., 2.]])
    agree, kl = validate.agreement(s, t).tolist()
    assert agree == 2  # row 0: argmax 1 vs 0; rows 1, 2 agree
    # row 0: p_t = (3/4, 1/4), p_s = (1/4, 3/4): KL = 3/4 ln 3 + 1/4 ln(1/3) = ln(3) / 2; row 1: identical logits
    p_t = (1 / (1 + math.e ** 2), math.e ** 2 / (1 + math.e ** 2))
    p_s = (1 / (1 + math.e), math.e / (1 + math.e))
    row2 = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    assert kl == pytest.approx(ln3 / 2 + 0. + row2, rel=1e-6)
    same = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert validate.agreement(same, same + 3.).tolist() == pytest.approx([5., 0.], abs=1e-6)  # softmax shift-free
    # KL(teacher || student), not the reverse: torch's kl_div(input=log p_s, target=log p_t) is the same sum
    a, b = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(1))
    want = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction='sum')
    assert validate.agreement(a, b)[1].item() == pytest.approx(want.item(), rel=1e-5)
    assert validate.agreement(b, a)[1].item() != pytest.approx(want.item(), rel=1e-3)


def test_run_reports_agreement_draws_curves_and_names_its_teacher(image_folder, teacher_ckpt, tmp_path, caplog,
                                                                  one_thread):
    caplog.set_level(logging.INFO)
    argv = _argv(image_folder, tmp_path, 'kd', teacher_ckpt, '--model-ema', '--model-ema-decay', '0.5')
    assert train_kd.main(argv) == 0
    run = tmp_path / 'kd'

    rows = _rows(run)
    assert [r['epoch'] for r in rows] == ['0', '1']
    for r in rows:
        for prefix in ('eval_', 'eval_ema_'):
            assert 0. <= float(r[f'{prefix}agree_top1']) <= 100.
            assert float(r[f'{prefix}kl_teacher']) >= 0.
            # agreement counts whole images: a multiple of 100 / 12 (12 validation images)
            assert float(r[f'{prefix}agree_top1']) * 12 / 100 == pytest.approx(
                round(float(r[f'{prefix}agree_top1']) * 12 / 100), abs=1e-6)
    assert float(rows[1]['eval_kl_teacher']) > 0  # a random student does not match the teacher
    assert 'Agree@1 (teacher)' in caplog.text and 'KL(teacher||student)' in caplog.text

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(glob.glob(str(run / 'tb' / 'events.out.tfevents.*'))[0])
    acc.Reload()
    assert {'eval/agree_top1', 'eval/kl_teacher', 'eval/ema_agree_top1'} <= set(acc.Tags()['scalars'])
    assert acc.Scalars('eval/kl_teacher')[-1].value == pytest.approx(float(rows[1]['eval_kl_teacher']), rel=1e-5)

    png = run / 'curves.png'
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as im:
        im.load()
        assert im.size[0] > 500 and im.size[1] > 300
    assert not glob.glob(str(run / '*.partial.*'))

    # args.yaml and the start-up log name the teacher file, its sha256 and size
    with open(teacher_ckpt, 'rb') as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    text = (run / 'args.yaml').read_text()
    assert f'teacher_source: {os.path.abspath(teacher_ckpt)}\n' in text
    assert f'teacher_sha256: {sha}\n' in text and f'teacher_bytes: {os.path.getsize(teacher_ckpt)}\n' in text
    assert f'teacher_sha256: {sha}' in caplog.text
    # ... and args.yaml still loads as a recipe (the identity keys are no flags)
    args, _ = parse_args_with_recipe(train_kd.build_parser(), ['--config', str(run / 'args.yaml')])
    assert args.teacher_checkpoint == teacher_ckpt and not hasattr(args, 'teacher_sha256')

    # resume (the identity is no run setting) adds a row and redraws the picture
    before = png.stat().st_mtime_ns
    assert train_kd.main(argv[:argv.index('--epochs') + 1] + ['3'] + argv[argv.index('--epochs') + 2:] +
                         ['--resume', 'auto']) == 0
    rows = _rows(run)
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert png.stat().st_mtime_ns > before
    assert read_summary(str(run / 'summary.csv'))['eval_agree_top1'][0] == [0., 1., 2.]

    # validate.py --teacher with --checkpoint: both accuracies, the agreement and KL the run logged
    caplog.clear()
    got = validate.validate_main(['--data-dir', image_folder, '-j', '0', '-b', '4', '--device', 'cpu',
                                  '--checkpoint', str(run / 'last.pth.tar'), '--teacher', 'scalekd_demo_vit',
                                  '--teacher-checkpoint', teacher_ckpt])
    last = rows[-1]
    assert got['top1'] == pytest.approx(float(last['eval_top1']), abs=1e-3)
    assert got['agree_top1'] == pytest.approx(float(last['eval_agree_top1']), abs=1e-3)
    assert got['kl_teacher'] == pytest.approx(float(last['eval_kl_teacher']), rel=1e-4, abs=1e-6)
    assert 0. <= got['teacher_top1'] <= 100. and got['teacher'] == 'scalekd_demo_vit'
    teacher_alone = validate.validate_main(['--data-dir', image_folder, '-j', '0', '-b', '4', '--device', 'cpu',
                                            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt])
    assert got['teacher_top1'] == pytest.approx(teacher_alone['top1'], abs=1e-3)  # same size and normalisation here
    assert ' * Teacher scalekd_demo_vit: Acc@1' in caplog.text and 'top-1 agreement with the student' in caplog.text


def test_no_plot_and_epochs_without_validation(image_folder, teacher_ckpt, tmp_path, one_thread):
    assert train_kd.main(_argv(image_folder, tmp_path, 'np', teacher_ckpt, '--no-plot', '--val-interval', '2')) == 0
    run = tmp_path / 'np'
    assert not (run / 'curves.png').exists() and (run / 'summary.csv').is_file()
    rows = _rows(run)  # the epoch without validation keeps the agreement columns, empty
    assert rows[0]['eval_agree_top1'] == '' and rows[0]['eval_kl_teacher'] == ''
    assert 0. <= float(rows[1]['eval_agree_top1']) <= 100. and float(rows[1]['eval_kl_teacher']) >= 0.
    # drawn afterwards from that csv: the empty cells are skipped
    assert write_curves(str(run / 'summary.csv'), str(run / 'curves.png'))
    assert read_summary(str(run / 'summary.csv'))['eval_top1'][0] == [1.]
    # no teacher: no agreement columns, no teacher in args.yaml
    assert train_kd.main(['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '-b', '6', '--epochs', '1',
                          '-j', '0', '--output', str(tmp_path), '--experiment', 'none', '--lr', '0.01',
                          '--warmup-epochs', '0']) == 0
    assert not any('agree' in k or 'kl_' in k for k in _rows(tmp_path / 'none')[0])
    assert 'teacher_source' not in (tmp_path / 'none' / 'args.yaml').read_text()
    assert (tmp_path / 'none' / 'curves.png').is_file()


def test_a_bad_summary_is_a_warning_not_a_crash(tmp_path, caplog):
    bad = tmp_path / 'summary.csv'
    bad.write_bytes(b'\x00\xff garbage\nno,epoch\n')
    assert write_curves(str(bad), str(tmp_path / 'curves.png')) is False  # nothing numeric to draw
    assert write_curves(str(tmp_path / 'missing.csv'), str(tmp_path / 'curves.png')) is False
    assert 'could not draw' in caplog.text
    assert not (tmp_path / 'curves.png').exists()
    odd = tmp_path / 'odd.csv'  # non-finite and non-numeric cells are dropped
    odd.write_text('epoch,train_loss,lr\n0,nan,0.1\n1,2.5,x\nx,1,1\n2,inf,0.05\n')
    assert read_summary(str(odd)) == {'train_loss': ([1.], [2.5]), 'lr': ([0., 2.], [0.1, 0.05])}
    assert write_curves(str(odd), str(tmp_path / 'curves.png'))
    assert (tmp_path / 'curves.png').read_bytes()[:8] == PNG_MAGIC


def test_hub_teacher_identity_names_its_tag():
    got = teacher_identity('swin_large_patch4_window7_224.ms_in22k_ft_in1k')
    assert got == {'teacher_source': 'hub swin_large_patch4_window7_224.ms_in22k_ft_in1k '
                                     '(hf-hub:timm/swin_large_patch4_window7_224.ms_in22k_ft_in1k)'}
    assert teacher_identity('resnet50')['teacher_source'].startswith('hub resnet50.a1_in1k (')  # the default tag


def test_summary_of_an_older_run_is_widened_not_shifted(tmp_path):
    path = str(tmp_path / 'summary.csv')  # written by a version without the agreement columns
    append_summary(path, 0, {'loss': 2.0}, {'loss': 1.5, 'top1': 10.0}, lr=0.1)
    append_summary(path, 1, {'loss': 1.0}, {'loss': 1.2, 'top1': 20.0, 'agree_top1': 50.0, 'kl_teacher': 0.3}, lr=0.05)
    append_summary(path, 2, {'loss': 0.5}, {'loss': 1.1, 'top1': 30.0, 'agree_top1': 60.0, 'kl_teacher': 0.2}, lr=0.01)
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'lr', 'eval_agree_top1',
                             'eval_kl_teacher']
    assert [r['eval_top1'] for r in rows] == ['10.0', '20.0', '30.0']
    assert [r['lr'] for r in rows] == ['0.1', '0.05', '0.01']
    assert [r['eval_agree_top1'] for r in rows] == ['', '50.0', '60.0']
    assert read_summary(path)['eval_kl_teacher'] == ([1., 2.], [0.3, 0.2])


def test_two_processes_reduce_the_agreement_over_ranks(tmp_path, teacher_ckpt):
    """Each rank validates half of the 12 images; the logged agreement and KL are those of all 12 (validate.py on
    the saved student, one process, gives the same)."""
    import socket
    import subprocess
    import sys
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / 'data', classes=3, per_class=4)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'NNODES', 'NODE_RANK')}
    env.update(OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHON=sys.executable, MASTER_PORT=str(port))
    argv = _argv(data, tmp_path, 'ddp', teacher_ckpt, '--epochs', '1', '-b', '3', '--no-plot')
    proc = subprocess.run([os.path.join(root, 'distributed_train.sh'), '2', *argv], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert 'Training in distributed mode with 2 processes' in proc.stdout + proc.stderr
    assert '(12 images' in proc.stdout + proc.stderr  # the reduced count, not one rank's 6
    row = _rows(tmp_path / 'ddp')[-1]
    got = validate.validate_main(['--data-dir', data, '-j', '0', '-b', '4', '--device', 'cpu',
                                  '--checkpoint', str(tmp_path / 'ddp' / 'last.pth.tar'),
                                  '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt])
    assert got['top1'] == pytest.approx(float(row['eval_top1']), abs=1e-3)
    assert got['agree_top1'] == pytest.approx(float(row['eval_agree_top1']), abs=1e-3)
    assert got['kl_teacher'] == pytest.approx(float(row['eval_kl_teacher']), rel=1e-4, abs=1e-6)
