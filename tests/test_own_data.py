"""Distil on your own data (README): a teacher from a local-dir:/hf-hub: name whose head was trained on other classes
is refused before anything is written; fine-tuned on the data with train_kd.py --distiller none, its run folder is
the teacher checkpoint of the distillation run; the run record names every weight source."""
import argparse
import csv
import logging
import os

import pytest
import torch
import yaml

import timm
from timm.models import save_for_hf

import models  # noqa: F401  (registers the demo models)
import train_kd
from distillers.teacher import check_model_name, teacher_head, weights_identity
from conftest import make_image_folder  # (a test-extra dependency ships a top-level "tests" package)


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _tree(path):
    """{relative path: bytes} of every file under ``path`` ({} when it does not exist)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def own_data(tmp_path_factory):
    """4 classes of 32 px images (a class is a brightness band) and a 'pretrained' demo ViT saved by timm's
    save_for_hf with a 10-class head, as a hub or a colleague would hand it over."""
    root = tmp_path_factory.mktemp('own')
    data = make_image_folder(root / 'data', classes=4, per_class=24, seed=1)
    torch.manual_seed(0)
    hub = root / 'hub_teacher'
    save_for_hf(timm.create_model('scalekd_demo_vit', num_classes=10), str(hub), safe_serialization=True)
    return data, str(hub), root


def _argv(data, out, exp, *extra):
    return ['--data-dir', data, '-b', '16', '-j', '0', '--output', str(out), '--experiment', exp, '--lr', '0.02',
            '--warmup-epochs', '0', '--log-interval', '5', '--no-plot', '--loss-balance-factor', '0', *extra]


def test_names_timm_takes_pass_the_name_check(own_data, tmp_path):
    _, hub, _ = own_data
    for name in ('resnet18', 'resnet18.a1_in1k', 'hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k',
                 f'local-dir:{hub}'):
        assert check_model_name(name, '--teacher') is None, name
    assert 'does not exist' in check_model_name(f'local-dir:{tmp_path}', '--model')
    assert 'unknown --model' in check_model_name('resnet_nonexistent', '--model')
    assert 'source prefix' in check_model_name('timm/resnet18', '--teacher')  # timm: hf-hub: or local-dir: needed
    assert teacher_head(f'local-dir:{hub}') == (10, f"the pretrained weights of 'local-dir:{hub}'")
    assert teacher_head('scalekd_demo_vit')[0] is None  # no pretrained weights: no head to keep
    ident = weights_identity(f'local-dir:{hub}')
    assert ident['teacher_source'] == f'local-dir {os.path.abspath(hub)} (model.safetensors)'
    assert len(ident['teacher_sha256']) == 64 and ident['teacher_bytes'] == os.path.getsize(
        os.path.join(hub, 'model.safetensors'))
    assert weights_identity('hf-hub:timm/resnet18.a1_in1k@abc123')['teacher_revision'] == 'abc123'


def test_hub_teacher_offline_stops_with_the_cause(own_data, tmp_path, one_thread):
    """A hf-hub: name passes the name check; offline, creating it stops with exit 2 naming the teacher."""
    data, _, _ = own_data
    rc = train_kd.main(_argv(data, tmp_path, 'hub', '--model', 'scalekd_demo_resnet', '--epochs', '1',
                             '--distiller', 'kd', '--teacher', 'hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k'))
    assert rc == 2 and not (tmp_path / 'hub').exists()


def test_own_data_refuse_finetune_distil(own_data, tmp_path, one_thread, caplog):
    data, hub, _ = own_data
    teacher = f'local-dir:{hub}'
    # 1. the 10-class teacher head on 4-class data: refused before anything is written
    out = tmp_path / 'runs'
    for distiller in ('kd', 'scalekd', 'dist'):
        caplog.clear()
        rc = train_kd.main(_argv(data, out, 'refused', '--model', 'scalekd_demo_resnet', '--epochs', '1',
                                 '--distiller', distiller, '--teacher', teacher))
        assert rc == 2
        msg = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR'][-1]
        assert "the teacher's head has 10 classes" in msg and 'the data has 4' in msg, msg
        assert f'--distiller none --model {teacher} --pretrained' in msg and '--teacher-checkpoint' in msg
        assert '--teacher-features-only' in msg
    assert _tree(out) == {}

    # 2. fine-tune the teacher on the data (the README's command): its head now has 4 classes
    caplog.set_level(logging.INFO)
    assert train_kd.main(_argv(data, out, 'teacher-ft', '--model', teacher, '--pretrained', '--distiller', 'none',
                               '--epochs', '6', '--model-ema', '--model-ema-decay', '0.5', '--opt', 'adamw',
                               '--lr', '1e-3', '--weight-decay', '0.01')) == 0
    ft = out / 'teacher-ft'
    assert 'its pretrained head had 10 classes: re-initialised for 4' in ' '.join(r.getMessage() for r in caplog.records)
    ckpt = _load(ft / 'model_best.pth.tar')
    assert ckpt['state_dict']['head.weight'].shape == (4, 96)
    assert ckpt['state_dict_ema']['head.weight'].shape == (4, 96)
    ft_top1 = float(_rows(ft / 'summary.csv')[-1]['eval_ema_top1'])
    assert 'model_source: local-dir' in (ft / 'args.yaml').read_text()

    # 3. distil with the run folder as the teacher checkpoint: its EMA weights, logged and recorded
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert train_kd.main(_argv(data, out, 'distil', '--model', 'scalekd_demo_resnet', '--epochs', '1',
                               '--distiller', 'kd', '--teacher', teacher, '--teacher-checkpoint', str(ft))) == 0
    logged = ' '.join(r.getMessage() for r in caplog.records)
    assert f"loaded from '{ft / 'model_best.pth.tar'}' (EMA weights)" in logged
    record = yaml.safe_load((out / 'distil' / 'args.yaml').read_text())
    assert record['teacher_source'] == str(ft / 'model_best.pth.tar')
    assert record['teacher_weights'] == 'EMA when the run has one, else student'
    row = _rows(out / 'distil' / 'summary.csv')[0]
    agree = float(row['eval_agree_top1'])
    print(f'fine-tuned teacher EMA top-1 {ft_top1:.2f}; distilled student top-1 {float(row["eval_top1"]):.2f}, '
          f'teacher agreement {agree:.2f} % at the first validation (chance 25 %)')
    assert agree > 25.0


def test_features_only_keeps_the_teacher_head_and_drops_logits(own_data, tmp_path, one_thread):
    """(b): --teacher-features-only distils ScaleKD's feature terms from the 10-class teacher; no KD term, no
    agreement columns (the heads do not compare); the teacher keeps its own head (no re-initialisation)."""
    data, hub, _ = own_data
    assert train_kd.main(_argv(data, tmp_path, 'feat', '--model', 'scalekd_demo_resnet', '--epochs', '1',
                               '--distiller', 'scalekd', '--teacher', f'local-dir:{hub}',
                               '--teacher-features-only', '--scalekd-allow-degenerate')) == 0
    row = _rows(tmp_path / 'feat' / 'summary.csv')[0]
    assert 'train_loss_kd' not in row and 'eval_agree_top1' not in row
    assert float(row['train_loss_s4']) > 0
    for distiller in ('kd', 'dist', 'token'):
        with pytest.raises(SystemExit) as e:
            train_kd.main(_argv(data, tmp_path, 'x', '--model', 'scalekd_demo_resnet', '--distiller', distiller,
                                '--teacher', f'local-dir:{hub}', '--teacher-features-only'))
        assert e.value.code == 2
