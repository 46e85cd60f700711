"""validate.py and export.py on a tiny ScaleKD run: same logits and accuracy after export, safe loading, errors."""
import argparse
import csv
import json
import os

import pytest
import timm
import torch

import export
import models  # noqa: F401
import train_kd
import validate
from conftest import make_image_folder
from models.official import to_timm
from runtime.errors import FatalError


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))[-1]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """A teacher run (--distiller none) and a ScaleKD student run with EMA, one tiny epoch each."""
    root = tmp_path_factory.mktemp('runs')
    # 10 classes: the demo models' pretrained_cfg class count, so timm keeps the head when loading the file
    data = make_image_folder(root / 'data', classes=10, per_class=2)
    common = ['--data-dir', data, '-b', '4', '--epochs', '1', '-j', '0', '--lr', '0.01', '--warmup-epochs', '0',
              '--output', str(root), '--log-interval', '10']
    assert train_kd.main(common + ['--model', 'scalekd_demo_vit', '--experiment', 'teacher']) == 0
    teacher_ckpt = str(root / 'teacher' / 'last.pth.tar')
    assert train_kd.main(common + ['--model', 'scalekd_demo_resnet', '--experiment', 'student', '--model-ema',
                                   '--distiller', 'scalekd', '--teacher', 'scalekd_demo_vit',
                                   '--teacher-checkpoint', teacher_ckpt]) == 0
    return dict(root=root, data=data, teacher=teacher_ckpt, teacher_dir=str(root / 'teacher'),
                student_dir=str(root / 'student'), ckpt=str(root / 'student' / 'model_best.pth.tar'))


def _val(run, *argv, **kw):
    return validate.validate_main(['--data-dir', run['data'], '-j', '0', '-b', '4', '--device', 'cpu', *argv], **kw)


def _run_student(ckpt, key):
    model = timm.create_model('scalekd_demo_resnet', num_classes=10)
    model.load_state_dict(_load(ckpt)[key], strict=True)
    return model.eval()


def test_export_reloads_through_timm_with_identical_logits(run, tmp_path, caplog):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = {}
    for flag, key, name in (([], 'state_dict_ema', 'ema.safetensors'), (['--no-use-ema'], 'state_dict', 'raw.pth')):
        out = str(tmp_path / name)
        caplog.clear()
        assert export.main(['--checkpoint', run['ckpt'], '--output', out, *flag]) == 0
        assert ('EMA student (state_dict_ema)' if key == 'state_dict_ema' else 'student (state_dict)') in caplog.text
        model = timm.create_model('scalekd_demo_resnet', pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=out)).eval()
        with torch.no_grad():
            logits[key] = model(x)
            assert torch.equal(logits[key], _run_student(run['ckpt'], key)(x))
        assert set(timm.models.load_state_dict(out)) == set(model.state_dict())  # no projectors, no teacher
    assert not torch.equal(logits['state_dict'], logits['state_dict_ema'])  # the two exports really differ
    plain = torch.load(tmp_path / 'raw.pth', weights_only=True)  # weights only, no Namespace needed
    assert all(isinstance(v, torch.Tensor) for v in plain.values())
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.partial')]


def test_validate_export_matches_checkpoint_and_training_eval(run, tmp_path):
    ema_file, raw_file = str(tmp_path / 'ema.safetensors'), str(tmp_path / 'raw.pth')
    assert export.main(['--checkpoint', run['ckpt'], '--output', ema_file]) == 0
    assert export.main(['--checkpoint', run['ckpt'], '--output', raw_file, '--no-use-ema']) == 0
    row = _summary(run['student_dir'])
    recipe = tmp_path / 'recipe.yaml'  # training keys validate.py has no flag for are ignored
    recipe.write_text('model:\n  model: scalekd_demo_resnet\n  num_classes: 10\noptim:\n  lr: 0.3\n'
                      'teacher:\n  teacher: scalekd_demo_vit\n')
    for use_ema, exported, prefix in ((['--use-ema'], ema_file, 'eval_ema_'), ([], raw_file, 'eval_')):
        ref = _val(run, '--checkpoint', run['ckpt'], *use_ema, '--results-file', str(tmp_path / 'r.json'),
                   '--results-format', 'json')
        # the safetensors file carries the run's model settings; the plain .pth gets them from the recipe
        got = _val(run, '--checkpoint', exported, *(['--config', str(recipe)] if exported == raw_file else []))
        assert (got['top1'], got['top5'], got['loss']) == (ref['top1'], ref['top5'], ref['loss'])
        assert got['num_images'] == 20 and got['param_count'] == ref['param_count'] > 0
        assert ref['top1'] == pytest.approx(float(row[f'{prefix}top1']), abs=1e-3)
        assert ref['loss'] == pytest.approx(float(row[f'{prefix}loss']), abs=1e-4)
        with open(tmp_path / 'r.json') as f:
            assert json.load(f)['top5'] == ref['top5']
    _val(run, '--checkpoint', run['ckpt'], '--results-file', str(tmp_path / 'r.csv'))
    with open(tmp_path / 'r.csv') as f:
        assert float(next(csv.DictReader(f))['top1']) == pytest.approx(float(row['eval_top1']), abs=1e-3)


def test_validate_teacher_mode_matches_its_training_eval(run):
    got = _val(run, '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', run['teacher'])
    row = _summary(run['teacher_dir'])
    assert got['top1'] == pytest.approx(float(row['eval_top1']), abs=1e-3)
    assert got['loss'] == pytest.approx(float(row['eval_loss']), abs=1e-4)
    assert got['model'] == 'scalekd_demo_vit'


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_that_runs_code_is_refused_by_both_scripts(run, tmp_path, caplog):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {'fc.weight': _RunsCode(marker)}, 'args': argparse.Namespace(model='x')}, evil)
    assert validate.main(['--data-dir', run['data'], '-j', '0', '--checkpoint', str(evil)]) == 2
    assert 'was refused' in caplog.text and 'system' in caplog.text
    caplog.clear()
    assert export.main(['--checkpoint', str(evil), '--output', str(tmp_path / 'out.safetensors')]) == 2
    assert 'was refused' in caplog.text
    assert not marker.exists() and not (tmp_path / 'out.safetensors').exists()


def test_validate_errors(run, tmp_path):
    exported = str(tmp_path / 's.safetensors')
    assert export.main(['--checkpoint', run['ckpt'], '--output', exported]) == 0
    with pytest.raises(FatalError, match='does not exist'):
        validate.validate_main(['--data-dir', str(tmp_path / 'nope'), '--checkpoint', exported])
    with pytest.raises(FatalError, match=r'does not fit --model scalekd_demo_mixer.*missing keys: .*unexpected keys'):
        _val(run, '--checkpoint', exported, '--model', 'scalekd_demo_mixer')
    three = make_image_folder(tmp_path / 'three', classes=3, per_class=1, splits=('validation',))
    with pytest.raises(FatalError, match='has 10 classes but .* has 3 class folders'):
        validate.validate_main(['--data-dir', three, '-j', '0', '--checkpoint', exported])
    with pytest.raises(FatalError, match='has no EMA weights'):
        _val(run, '--checkpoint', run['teacher'], '--use-ema')
    broken = tmp_path / 'broken.pth.tar'
    broken.write_bytes(open(run['ckpt'], 'rb').read()[:5000])
    with pytest.raises(FatalError, match='cannot be read'):
        _val(run, '--checkpoint', str(broken))
    with pytest.raises(FatalError, match='does not exist'):
        _val(run, '--checkpoint', exported, '--config', str(tmp_path / 'missing.yaml'))
    (tmp_path / 'bad.yaml').write_text('model: [unclosed\n')
    with pytest.raises(FatalError, match='not valid YAML'):
        _val(run, '--checkpoint', exported, '--config', str(tmp_path / 'bad.yaml'))
    plain = tmp_path / 'plain.pth'
    torch.save(_load(run['ckpt'])['state_dict'], plain)
    with pytest.raises(FatalError, match='no model to validate'):
        _val(run, '--checkpoint', str(plain))
    assert _val(run, '--checkpoint', str(plain), '--model', 'scalekd_demo_resnet')['num_images'] == 20


def test_export_errors(run, tmp_path, caplog, monkeypatch):
    plain = tmp_path / 'plain.pth'  # a bare state dict is not a distillation run
    torch.save(_load(run['ckpt'])['state_dict'], plain)
    assert export.main(['--checkpoint', str(plain), '--output', str(tmp_path / 'a.safetensors')]) == 2
    assert 'not a checkpoint of a train_kd.py run' in caplog.text
    caplog.clear()
    broken = tmp_path / 'broken.pth.tar'
    broken.write_bytes(open(run['ckpt'], 'rb').read()[:5000])
    assert export.main(['--checkpoint', str(broken), '--output', str(tmp_path / 'b.safetensors')]) == 2
    assert 'cannot be read' in caplog.text
    caplog.clear()
    assert export.main(['--checkpoint', run['teacher'], '--output', str(tmp_path / 'c.pth'), '--use-ema']) == 2
    assert 'has no EMA student' in caplog.text

    # --validate-data passes on a faithful export and fails, naming both numbers, when the numbers differ
    out = tmp_path / 'checked.safetensors'
    res = export.export_main(['--checkpoint', run['ckpt'], '--output', str(out), '--validate-data', run['data'],
                              '-j', '0', '--device', 'cpu'])
    assert out.is_file() and res['export']['top1'] == res['run']['top1']
    real = validate.validate_main

    def skewed(argv, settings=None):  # pretend the exported file scores 0.5 points lower
        r = dict(real(argv, settings=settings))
        if '.partial-' in argv[argv.index('--checkpoint') + 1]:
            r['top1'] -= 0.5
        return r
    monkeypatch.setattr(export, 'validate_main', skewed)
    caplog.clear()
    bad = tmp_path / 'skewed.safetensors'
    assert export.main(['--checkpoint', run['ckpt'], '--output', str(bad), '--validate-data', run['data'],
                        '-j', '0', '--device', 'cpu']) == 1
    top1 = res['run']['top1']
    assert f'top-1 {top1 - 0.5:.4f}' in caplog.text and f'{top1:.4f}' in caplog.text
    assert not bad.exists() and not [f for f in os.listdir(tmp_path) if f.startswith('.partial')]


# mmcls ResNet names as the official ScaleKD code saves them; stems of a deep-stem (v1d) ResNet are ConvModules
_MMCLS_DEEP_STEM = {'conv1.0': 'stem.0.conv', 'conv1.1': 'stem.0.bn', 'conv1.3': 'stem.1.conv',
                    'conv1.4': 'stem.1.bn', 'conv1.6': 'stem.2.conv', 'bn1': 'stem.2.bn'}


def _to_mmcls(key, norm='norm', deep=False):
    if key.startswith('fc.'):
        return 'head.' + key
    module, _, leaf = key.rpartition('.')
    parts = module.split('.')
    if deep and module in _MMCLS_DEEP_STEM:
        module = _MMCLS_DEEP_STEM[module]
    elif module == 'bn1':
        module = f'{norm}1'
    elif len(parts) == 3 and parts[2].startswith('bn'):
        module = f'{parts[0]}.{parts[1]}.{norm}{parts[2][2:]}'
    return f'backbone.{module}.{leaf}'


@pytest.mark.parametrize('norm', ['norm', 'bn'])  # the brief's spelling and mmcv's build_norm_layer abbreviation
def test_export_from_official_checkpoint(tmp_path, norm):
    torch.manual_seed(0)
    src = timm.create_model('scalekd_demo_resnet', num_classes=10).eval()
    for m in src.modules():  # non-trivial BN statistics, so a swapped norm would show in the logits
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    state = {f'student.{_to_mmcls(k, norm)}': v for k, v in src.state_dict().items()}
    state.update({'teacher.backbone.patch_embed.proj.weight': torch.zeros(2),
                  'distill_losses.loss_s4.w': torch.ones(1)})
    path = tmp_path / 'official.pth'
    torch.save({'meta': {'epoch': 300}, 'state_dict': state, 'optimizer': {}}, path)
    out = str(tmp_path / 'r.safetensors')
    assert export.main(['--checkpoint', str(path), '--output', out, '--from-official',
                        '--model', 'scalekd_demo_resnet']) == 0
    model = timm.create_model('scalekd_demo_resnet', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=out)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_official_mapping_covers_resnet50d_and_refuses_other_families(tmp_path, caplog):
    with torch.device('meta'):
        target = timm.create_model('resnet50d')
    mmcls = {_to_mmcls(k, 'bn', deep=True): v for k, v in target.state_dict().items()}
    assert any(k.startswith('backbone.stem.2.bn.') for k in mmcls)
    assert set(to_timm('resnet', mmcls, target, 'mem')[0]) == set(target.state_dict())
    path = tmp_path / 'official_vit.pth'
    torch.save({'state_dict': {'student.backbone.cls_token': torch.zeros(1, 1, 8)}}, path)
    assert export.main(['--checkpoint', str(path), '--output', str(tmp_path / 'v.safetensors'), '--from-official',
                        '--model', 'scalekd_demo_vit']) == 2
    assert 'is of no family the converter knows' in caplog.text and not (tmp_path / 'v.safetensors').exists()
