"""export.py --hub-dir / --push-to-hub: timm's hub layout rebuilds the run's student exactly, with a model card."""
import argparse
import hashlib
import json
import os

import pytest
import timm
import torch
from huggingface_hub import constants

import export
import models  # noqa: F401  registers scalekd_demo_resnet, as a reader of the hub folder must
import train_kd
from conftest import make_image_folder
from runtime import hub

# the run's data settings differ from the demo models' pretrained_cfg (32 px, ImageNet mean/std, crop 1.0, bilinear)
RUN_DATA = dict(input_size=[3, 40, 40], mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], crop_pct=0.875,
                interpolation='bicubic')


@pytest.fixture(scope='module')
def run(tmp_path_factory, teacher_ckpt):
    """A ScaleKD student run with EMA (3 classes, 40 px, own mean/std/crop/interpolation), one tiny epoch."""
    root = tmp_path_factory.mktemp('hubrun')
    data = make_image_folder(root / 'data', classes=3, per_class=2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_kd.main([
            '--data-dir', data, '-b', '3', '--epochs', '1', '-j', '0', '--lr', '0.01', '--warmup-epochs', '0',
            '--output', str(root), '--experiment', 'student', '--log-interval', '10', '--model', 'scalekd_demo_resnet',
            '--model-ema', '--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit',
            '--teacher-checkpoint', teacher_ckpt, '--teacher-img-size', '32', '--img-size', '40',
            '--mean', '0.5', '0.4', '0.3', '--std', '0.2', '0.25', '0.3', '--crop-pct', '0.875',
            '--interpolation', 'bicubic']) == 0
    finally:
        torch.set_num_threads(n)
    return dict(data=data, ckpt=str(root / 'student' / 'model_best.pth.tar'), teacher=teacher_ckpt)


def _student(ckpt, key):
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(ckpt, map_location='cpu', weights_only=True)[key]
    model = timm.create_model('scalekd_demo_resnet', num_classes=3)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _same_logits(hub_dir, ckpt, key):
    x = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    rebuilt = timm.create_model(f'local-dir:{hub_dir}', pretrained=True).eval()
    with torch.no_grad():
        return torch.equal(rebuilt(x), _student(ckpt, key)(x))


def _no_partials(folder):
    return not [f for f in os.listdir(folder) if f.startswith('.partial')]


def test_hub_dir_rebuilds_the_student_with_the_run_preprocessing(run, tmp_path):
    hub_dir = tmp_path / 'student-hub'
    assert export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(hub_dir)]) == 0
    assert sorted(os.listdir(hub_dir)) == sorted(hub.HUB_FILES) and _no_partials(tmp_path)
    assert _same_logits(hub_dir, run['ckpt'], 'state_dict_ema')  # the EMA by default, as for --output
    assert not _same_logits(hub_dir, run['ckpt'], 'state_dict')
    cfg = json.loads((hub_dir / 'config.json').read_text())
    assert cfg['architecture'] == 'scalekd_demo_resnet' and cfg['num_classes'] == 3
    assert {k: cfg['pretrained_cfg'][k] for k in RUN_DATA} == RUN_DATA
    assert cfg['pretrained_cfg']['num_classes'] == 3
    model = timm.create_model(f'local-dir:{hub_dir}', pretrained=True)
    resolved = timm.data.resolve_data_config({}, model=model)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items() if k in RUN_DATA} == RUN_DATA
    card = (hub_dir / 'README.md').read_text()
    sha = hashlib.sha256(open(run['teacher'], 'rb').read()).hexdigest()  # args.yaml's teacher_sha256
    for text in ('**Teacher:** scalekd_demo_vit', '**Distiller:** scalekd', sha, '**Student:** scalekd_demo_resnet',
                 'import models', f"timm.create_model('local-dir:{hub_dir}', pretrained=True)", 'bicubic',
                 'EMA student of model_best.pth.tar, epoch 0 (counted from 0)', '**Mean:** 0.5, 0.4, 0.3',
                 '**Input size:** 3, 40, 40', '**Recipe:** none (command-line flags)'):
        assert text in card, text
    assert 'Top-1' not in card and os.path.dirname(run['teacher']) not in card  # no local paths in a public card


@pytest.mark.parametrize('with_output', [True, False])
def test_hub_dir_card_reports_the_validated_top1(run, tmp_path, monkeypatch, with_output):
    calls = []
    real = export.validate_main

    def counting(argv, settings=None):
        calls.append(argv[argv.index('--checkpoint') + 1])
        return real(argv, settings=settings)
    monkeypatch.setattr(export, 'validate_main', counting)
    hub_dir, out = tmp_path / 'hub', tmp_path / 'raw.safetensors'
    res = export.export_main(['--checkpoint', run['ckpt'], '--hub-dir', str(hub_dir), '--no-use-ema',
                              '--validate-data', run['data'], '-j', '0', '-b', '4', '--device', 'cpu',
                              *(['--output', str(out)] if with_output else [])])
    assert out.is_file() == with_output and _same_logits(hub_dir, run['ckpt'], 'state_dict')
    assert len(calls) == 2 and calls[1] == run['ckpt']  # one export validation, reused for the card
    assert ('.partial-' in calls[0]) and (calls[0].endswith('model.safetensors') != with_output)
    top1 = res['export']['top1']
    assert res['run']['top1'] == top1
    card = (hub_dir / 'README.md').read_text()
    assert f'**Top-1:** {top1:.2f} %' in card and '6 images' in card and 'student of model_best.pth.tar' in card


def test_non_empty_or_bad_hub_dir_is_refused_before_writing(run, tmp_path, caplog):
    hub_dir = tmp_path / 'taken'
    hub_dir.mkdir()
    (hub_dir / 'notes.txt').write_text('mine')
    out = tmp_path / 'student.safetensors'
    assert export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(hub_dir), '--output', str(out)]) == 2
    assert f"--hub-dir '{hub_dir}' is not empty" in caplog.text and 'never overwritten' in caplog.text
    assert os.listdir(hub_dir) == ['notes.txt'] and (hub_dir / 'notes.txt').read_text() == 'mine'
    assert not out.exists() and _no_partials(tmp_path)
    caplog.clear()
    assert export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(hub_dir / 'notes.txt' / 'x')]) == 2
    assert 'not writable' in caplog.text
    empty = tmp_path / 'empty'  # an existing empty folder is fine, but not as the --output folder too
    empty.mkdir()
    assert export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(empty),
                        '--output', str(empty / 'f.safetensors')]) == 2
    assert 'is inside --hub-dir' in caplog.text and os.listdir(empty) == []
    assert export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(empty)]) == 0
    assert sorted(os.listdir(empty)) == sorted(hub.HUB_FILES)
    with pytest.raises(SystemExit) as e:
        export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(tmp_path / 'r'), '--hub-revision', 'v1'])
    assert e.value.code == 2


def test_push_to_hub_calls_timms_push_to_hf_hub(run, tmp_path, monkeypatch, caplog):
    pushed = []

    def fake_push(model, repo_id, **kw):  # records instead of uploading: no network in tests
        pushed.append(dict(kw, model=model, repo_id=repo_id))
        return 'https://huggingface.co/me/student/commit/0'
    monkeypatch.setattr(hub, 'push_to_hf_hub', fake_push)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    before = sorted(os.listdir(os.path.dirname(run['ckpt'])))
    assert export.main(['--checkpoint', run['ckpt'], '--push-to-hub', 'me/student', '--hub-revision', 'v1',
                        '--hub-private']) == 0
    (got,) = pushed
    assert got['repo_id'] == 'me/student' and got['revision'] == 'v1' and got['private'] is True
    assert got['model_card']['details']['Teacher'] == 'scalekd_demo_vit'
    assert "timm.create_model('hf-hub:me/student', pretrained=True)" in got['model_card']['usage']
    assert got['data_config']['input_size'] == (3, 40, 40) and got['data_config']['interpolation'] == 'bicubic'
    ema = _student(run['ckpt'], 'state_dict_ema').state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in got['model'].state_dict().items())
    assert sorted(os.listdir(os.path.dirname(run['ckpt']))) == before  # push alone writes no local file

    # the local folder is kept when the upload fails (exit 1); offline mode and bad ids stop before any work
    monkeypatch.setattr(hub, 'push_to_hf_hub', lambda *a, **k: (_ for _ in ()).throw(OSError('no route to host')))
    assert export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(tmp_path / 'h'), '--push-to-hub', 'me/s']) == 1
    assert "push to the hub repository 'me/s' failed" in caplog.text and (tmp_path / 'h' / 'README.md').is_file()
    caplog.clear()
    assert export.main(['--checkpoint', run['ckpt'], '--push-to-hub', 'me/bad name', '--hub-dir',
                        str(tmp_path / 'h2')]) == 2
    assert "is not a hub repository id" in caplog.text and not (tmp_path / 'h2').exists()
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    caplog.clear()
    assert export.main(['--checkpoint', run['ckpt'], '--push-to-hub', 'me/student']) == 2
    assert 'HF_HUB_OFFLINE is set' in caplog.text and len(pushed) == 1


def test_hub_dir_is_not_published_when_the_export_validates_differently(run, tmp_path, monkeypatch, caplog):
    real = export.validate_main

    def skewed(argv, settings=None):  # the weights in the hub folder score 0.5 points lower
        r = dict(real(argv, settings=settings))
        r['top1'] -= 0.5 * ('.partial-' in argv[argv.index('--checkpoint') + 1])
        return r
    monkeypatch.setattr(export, 'validate_main', skewed)
    hub_dir = tmp_path / 'hub'
    assert export.main(['--checkpoint', run['ckpt'], '--hub-dir', str(hub_dir), '--validate-data', run['data'],
                        '-j', '0', '--device', 'cpu']) == 1
    assert f"'{hub_dir}' was not written" in caplog.text
    assert os.listdir(tmp_path) == []  # neither the folder nor its hidden sibling
