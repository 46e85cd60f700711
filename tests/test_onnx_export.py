"""export.py --onnx: timm's onnx_export of a tiny run's student, checked with onnxruntime against the PyTorch student
on the validation images (or random input); a graph whose logits differ by more than --onnx-atol is not written."""
import argparse
import glob
import logging
import os
import sys

import numpy as np
import pytest
import timm
import torch

import export
import models  # noqa: F401
import train_kd

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def run(tmp_path_factory, teacher_ckpt):
    """A one-epoch logit-KD run of the demo ResNet (3 classes, 12 validation images) with an EMA."""
    from conftest import make_image_folder
    root = tmp_path_factory.mktemp('onnx')
    data = make_image_folder(root / 'data', classes=3, per_class=4)
    assert train_kd.main(['--data-dir', data, '--model', 'scalekd_demo_resnet', '-b', '6', '--epochs', '1', '-j', '0',
                          '--lr', '0.01', '--warmup-epochs', '0', '--output', str(root), '--experiment', 'kd',
                          '--model-ema', '--distiller', 'kd', '--teacher', 'scalekd_demo_vit',
                          '--teacher-checkpoint', teacher_ckpt]) == 0
    return dict(data=data, ckpt=str(root / 'kd' / 'last.pth.tar'))


def _student(ckpt):
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict_ema']
    model = timm.create_model('scalekd_demo_resnet', num_classes=3)
    model.load_state_dict(state)
    return model.eval()


def _onnx_logits(path, x):
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.get_inputs()[0].shape, session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_onnx_export_on_validation_images_matches_the_student(run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = str(tmp_path / 'student.onnx')
    res = export.export_main(['--checkpoint', run['ckpt'], '--onnx', path, '--validate-data', run['data'],
                              '-b', '5', '-j', '0', '--device', 'cpu'])
    check = res['onnx']
    assert res['output'] == '' and not glob.glob(str(tmp_path / '*.safetensors'))  # --onnx alone writes the graph
    assert check['images'] == 12 and check['batch_sizes'] == [1] and not check['dynamic_batch']
    assert 0 <= check['max_abs_diff'] < 1e-4 and check['top1_agreement'] == 100.0
    assert f"max |diff| {check['max_abs_diff']:.3g}" in caplog.text and 'validation images' in caplog.text
    # the file, read back independently: batch axis fixed to 1, the EMA student's logits
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    shape, out = _onnx_logits(path, x)
    assert shape == [1, 3, 32, 32]
    with torch.no_grad():
        ref = _student(run['ckpt'])(x).numpy()
    assert np.abs(out - ref).max() < 1e-4
    assert sorted(os.listdir(tmp_path)) == ['student.onnx']  # no temporary file left


def test_dynamic_batch_on_random_input(run, tmp_path):
    path = str(tmp_path / 'dyn.onnx')
    check = export.export_main(['--checkpoint', run['ckpt'], '--onnx', path, '--dynamic-batch',
                                '--onnx-batch-size', '2'])['onnx']
    assert check['dynamic_batch'] and check['batch_sizes'] == [2, 3] and check['images'] == 5
    assert check['source'] == 'random input (seed 0)' and check['max_abs_diff'] < 1e-4
    x = torch.randn(7, 3, 32, 32)
    shape, out = _onnx_logits(path, x)
    assert shape[0] == 'batch' and out.shape == (7, 3)
    with torch.no_grad():
        assert np.abs(out - _student(run['ckpt'])(x).numpy()).max() < 1e-4


def test_a_tolerance_below_the_difference_refuses_and_leaves_no_file(run, tmp_path, caplog):
    path = tmp_path / 'tight.onnx'
    assert export.main(['--checkpoint', run['ckpt'], '--onnx', str(path), '--validate-data', run['data'],
                        '-j', '0', '--device', 'cpu', '--onnx-atol', '1e-12']) == 1
    msg = [r.getMessage() for r in caplog.records if r.levelname == 'ERROR'][-1]
    assert 'max |diff|' in msg and 'above --onnx-atol 1e-12' in msg and 'was not written' in msg
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('argv, message', [
    (['--onnx', 'x.onnx'], 'pip install onnx onnxruntime'),
    (['--onnx', 'x.pt'], 'must end in .onnx'),
    (['--onnx', 'x.onnx', '--onnx-atol', '0'], '--onnx-atol 0'),
    (['--dynamic-batch'], '--dynamic-batch goes with --onnx'),
])
def test_refused_before_anything_is_written(run, tmp_path, monkeypatch, caplog, argv, message):
    if message.startswith('pip'):
        monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # as if it were not installed
    monkeypatch.chdir(tmp_path)
    assert export.main(['--checkpoint', run['ckpt'], '--output', 'student.safetensors', *argv]) == 2
    assert message in [r.getMessage() for r in caplog.records if r.levelname == 'ERROR'][-1]
    assert os.listdir(tmp_path) == []
