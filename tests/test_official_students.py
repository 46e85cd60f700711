"""export.py --from-official against OpenMMLab's own model code: every released ScaleKD student family is built with
mmpretrain's classes as the official configs build it (random weights), saved in the official code's two checkpoint
layouts, converted, and its timm logits compared with mmpretrain's; the exported preprocessing against the configs'
test pipeline (as settings and pixel for pixel); bad input refused before anything is written."""
import json
import os
import warnings

import numpy as np
import pytest
import safetensors
import timm
import torch

import export
import models  # noqa: F401
from models import official

try:
    import mmpretrain.models  # noqa: F401  registers mmpretrain's classes
    from mmengine.config import Config
    from mmengine.logging import MessageHub
    from mmpretrain.registry import MODELS, TRANSFORMS
except ImportError as e:  # the test extra is part of CI: a missing package fails, never skips
    pytest.fail(f'tests/test_official_students.py needs the test extra ({e}); install it with '
                f'pip install -r requirements-test.txt (make test does)', pytrace=False)

warnings.filterwarnings('ignore', module='mmengine')
MAX_REL = 1e-5  # max |timm - mmpretrain| / max |mmpretrain| over the logits

# the official configs' model dicts (the fork's spelling: avg_token / output_cls_token are its ViT arguments)
HEAD = dict(type='LinearClsHead', num_classes=1000)
GAP = dict(type='GlobalAveragePooling')
MODEL = {
    'Swin-T': dict(backbone=dict(type='SwinTransformer', arch='tiny', img_size=224, drop_path_rate=0.05,
                                 out_indices=(0, 1, 2, 3)), neck=GAP, head=dict(HEAD, in_channels=768)),
    'ViT-S/16': dict(backbone=dict(type='VisionTransformer', arch='deit-small', with_cls_token=False,
                                   output_cls_token=False, img_size=224, patch_size=16),
                     neck=GAP, head=dict(HEAD, in_channels=384)),
    'ViT-B/16': dict(backbone=dict(type='VisionTransformer', arch='deit-base', with_cls_token=False,
                                   output_cls_token=False, img_size=224, patch_size=16),
                     neck=GAP, head=dict(HEAD, in_channels=768)),
    'ViT-B/14': dict(backbone=dict(type='VisionTransformer', arch='deit-base', with_cls_token=False,
                                   output_cls_token=False, avg_token=True, img_size=224, patch_size=14),
                     head=dict(HEAD, in_channels=768)),
    'ResNet-50 (ResNet-50-D)': dict(backbone=dict(type='ResNetV1d', depth=50, num_stages=4, out_indices=(2, 3),
                                                  style='pytorch'),
                                    neck=GAP, head=dict(type='MultiLabelLinearClsHead', num_classes=1000,
                                                        in_channels=2048)),
    'ConvNeXt-T': dict(backbone=dict(type='ConvNeXt', arch='tiny', drop_path_rate=0.1, out_indices=[-4, -3, -2, -1],
                                     gap_before_final_norm=False), neck=GAP, head=dict(HEAD, in_channels=768)),
    'Mixer-S/16': dict(backbone=dict(type='MlpMixer', arch='s', img_size=224, patch_size=16,
                                     out_indices=[-7, -5, -3, -1]), neck=GAP, head=dict(HEAD, in_channels=512)),
    'Mixer-B/16': dict(backbone=dict(type='MlpMixer', arch='b', img_size=224, patch_size=16, drop_path_rate=0.1,
                                     out_indices=[-7, -5, -3, -1]), neck=GAP, head=dict(HEAD, in_channels=768)),
    'Mixer-B/14': dict(backbone=dict(type='MlpMixer', arch='b', img_size=224, patch_size=14, drop_path_rate=0.1,
                                     out_indices=[-7, -5, -3, -1]), neck=GAP, head=dict(HEAD, in_channels=768)),
}
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _test_pipeline(scale):  # the official dataset configs' test pipelines (imagenet_bs32_swin_224: 224, others 256)
    return [dict(type='LoadImageFromFile'),
            dict(type='ResizeEdge', scale=scale, edge='short', backend='pillow', interpolation='bicubic'),
            dict(type='CenterCrop', crop_size=224), dict(type='PackClsInputs')]


def _distill_config(student):
    """mmengine's dump (``meta['cfg']``) of the official distillation config of ``student``."""
    scale = 224 if student.label == 'ViT-B/16' else 256
    return Config(dict(
        model=dict(type='ClassificationDistiller', use_logit=True, is_vit=student.label.endswith('/14'),
                   teacher_cfg='configs/swin_transformer/swin-large_16xb64_in1k.py', student_cfg=student.config,
                   distill_cfg=[dict(methods=[dict(type='FreqMaskingDistillLoss', name='loss_fmd_s3', alpha=[0.08, 0.06],
                                                   query_hw=(14, 14), softmax_scale=[5.0, 5.0])])]),
        data_preprocessor=dict(num_classes=1000, mean=MEAN, std=STD, to_rgb=True),
        bgr_mean=MEAN[::-1], test_pipeline=_test_pipeline(scale),
        test_dataloader=dict(batch_size=64, dataset=dict(type='ImageNet', data_root='data/imagenet',
                                                         pipeline=_test_pipeline(scale))),
        find_unused_parameters=True)).pretty_text


def _mmpretrain(label):
    """mmpretrain's ImageClassifier as the official config builds it; the fork's ViT arguments in mmpretrain's terms."""
    cfg = {k: dict(v) for k, v in MODEL[label].items()}
    backbone = cfg['backbone']
    if backbone['type'] == 'MlpMixer':  # mmpretrain's Mixer gives (B, C, N) where the fork's gives (B, C, H, W)
        cfg['neck'] = dict(type='GlobalAveragePooling', dim=1)
    if backbone['type'] == 'VisionTransformer':
        backbone.pop('output_cls_token')
        backbone['out_type'] = 'avg_featmap' if backbone.pop('avg_token', False) else 'featmap'
    model = MODELS.build(dict(type='ImageClassifier', **cfg)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor matters: norms, biases, layer scales, position tables, BN statistics
        for name, p in model.named_parameters():
            if p.ndim == 1 or 'pos_embed' in name or 'bias_table' in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith('running_var'):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def _fork_state(model, label):
    """The student's state as the official fork saves it: its ViT keeps the class token and its position."""
    state = dict(model.state_dict())
    if label.startswith('ViT'):
        g = torch.Generator().manual_seed(1)
        dim = state['backbone.pos_embed'].shape[-1]
        state['backbone.cls_token'] = torch.randn(1, 1, dim, generator=g)
        state['backbone.pos_embed'] = torch.cat([torch.randn(1, 1, dim, generator=g), state['backbone.pos_embed']], 1)
    return state


def _message_hub():
    hub = MessageHub.get_instance('official-test')
    hub.update_scalar('train/loss', np.float64(1.5))
    hub.update_info('iter', 1000)
    return hub.state_dict()


def _distill_ckpt(student, state):
    sd = {f'student.{k}': v for k, v in state.items()}
    sd.update({'teacher.backbone.patch_embed.projection.weight': torch.zeros(4, 3, 4, 4),
               'teacher.head.fc.weight': torch.zeros(1000, 4),
               'distill_losses.loss_fmd_s3.projector_0.query.weight': torch.zeros(196, 8),
               'distill_losses.loss_fmd_s4.projector_0.pos_embed': torch.zeros(1, 8, 7, 7)})
    meta = dict(cfg=_distill_config(student), epoch=300, iter=187800, mmengine_version='0.7.3',
                dataset_meta=dict(classes=('tench', 'goldfish')))
    return dict(meta=meta, state_dict=sd, message_hub=_message_hub(), optimizer=dict(state={}, param_groups=[]),
                param_schedulers=[dict(last_epoch=300)])


def _transfer_ckpt(ckpt):
    """What the official pth_transfer.py makes of a distillation checkpoint: student.* stripped, optimizer dropped."""
    out = {k: v for k, v in ckpt.items() if k != 'optimizer'}
    out['state_dict'] = {k[len('student.'):]: v for k, v in ckpt['state_dict'].items() if k.startswith('student.')}
    out['ema_state_dict'] = {'teacher.head.fc.weight': torch.zeros(1000, 4)}
    return out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))  # normalised input, as both models see it


@pytest.mark.parametrize('student', official.STUDENTS, ids=[s.label for s in official.STUDENTS])
def test_released_student_converts_exactly_from_both_layouts(student, tmp_path, caplog):
    caplog.set_level('INFO')
    mm = _mmpretrain(student.label)
    with torch.no_grad():
        ref = mm(X, mode='tensor')
    ckpt = _distill_ckpt(student, _fork_state(mm, student.label))
    del mm
    path, out = tmp_path / 'distill.pth', tmp_path / 'student.safetensors'
    torch.save(ckpt, path)
    assert export.main(['--checkpoint', str(path), '--output', str(out), '--from-official']) == 0  # config in meta
    assert 'dropped 2 distill_losses.* tensors (the distillation modules)' in caplog.text
    assert 'dropped 2 teacher.* tensors' in caplog.text
    with safetensors.safe_open(str(out), 'pt') as f:
        settings = json.loads(f.metadata()['scalekd'])
    assert settings['model'] == student.name
    assert dict(settings.get('model_kwargs', {}), **({'global_pool': settings['gp']} if 'gp' in settings else {})) \
        == student.kwargs
    # the pth_transfer.py layout (config kept in meta) converts to the same tensors as the exported file
    exported = safetensors.torch.load_file(str(out))
    state, settings2, model = official.convert(_transfer_ckpt(ckpt), 'transfer.pth')
    assert state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in state)
    assert settings2 == settings
    model.load_state_dict(exported)
    with torch.no_grad():
        got = model.eval()(X)
    rel = _rel(got, ref)
    print(f'{student.label}: max |timm - mmpretrain| / max |mmpretrain| = {rel:.2e} '
          f'(max abs {(got - ref).abs().max().item():.2e})')
    assert rel <= MAX_REL

    # the exported preprocessing is the official test pipeline of this config
    scale = 224 if student.label == 'ViT-B/16' else 256
    assert settings['input_size'] == [3, 224, 224] and settings['interpolation'] == 'bicubic'
    assert settings['crop_pct'] == pytest.approx(224 / scale)
    assert [m * 255 for m in settings['mean']] == pytest.approx(MEAN) and [s * 255 for s in settings['std']] == \
        pytest.approx(STD)


def test_transfer_layout_through_export_needs_model_without_config(tmp_path, caplog):
    student = next(s for s in official.STUDENTS if s.label == 'Swin-T')
    mm = _mmpretrain('Swin-T')
    path, out = tmp_path / 'swin_t.pth', tmp_path / 'swin_t.safetensors'
    torch.save({'state_dict': mm.state_dict(), 'meta': {'epoch': 300}}, path)  # no config: shapes and --model decide
    assert export.main(['--checkpoint', str(path), '--output', str(out), '--from-official']) == 2
    assert '--model NAME' in caplog.text and '--model swin_tiny_patch4_window7_224' in caplog.text
    assert not out.exists()
    hub = tmp_path / 'hub'
    assert export.main(['--checkpoint', str(path), '--hub-dir', str(hub), '--from-official',
                        '--model', student.name]) == 0
    cfg = json.loads((hub / 'config.json').read_text())
    assert cfg['architecture'] == student.name
    assert cfg['pretrained_cfg']['crop_pct'] == pytest.approx(0.875)
    assert cfg['pretrained_cfg']['interpolation'] == 'bicubic'
    back = timm.create_model(f'local-dir:{hub}', pretrained=True).eval()
    with torch.no_grad():
        assert _rel(back(X), mm(X, mode='tensor')) <= MAX_REL


@pytest.mark.parametrize('size', [(500, 375), (333, 500), (640, 427)])
@pytest.mark.parametrize('scale', [256, 224])
def test_exported_preprocessing_equals_the_official_pipeline_pixel_for_pixel(tmp_path, size, scale):
    """mmpretrain's test pipeline (mmcv load, ResizeEdge, CenterCrop, data preprocessor) and timm's eval transform
    built from the exported settings give the same input tensor (a lossless image: no JPEG decoder difference)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    rgb = np.random.default_rng(size[0] + scale).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = str(tmp_path / 'img.png')
    Image.fromarray(rgb).save(path)
    steps = [TRANSFORMS.build(dict(t, type='PackInputs') if t['type'] == 'PackClsInputs' else t)
             for t in _test_pipeline(scale)]
    data = dict(img_path=path)
    for step in steps:
        data = step(data)
    bgr = data['inputs'].float()  # (3, 224, 224), BGR as mmcv loads it
    ref = (bgr.flip(0) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)  # to_rgb, normalise
    settings = official.config_preprocessing(official.read_config(Config(dict(
        test_pipeline=_test_pipeline(scale), data_preprocessor=dict(mean=MEAN, std=STD, to_rgb=True))).pretty_text))
    model = timm.create_model('resnet18', pretrained=False)
    transform = create_transform(**resolve_data_config(settings, model=model))
    got = transform(Image.open(path).convert('RGB'))
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5


def _resnet_ckpt(**extra):
    mm = MODELS.build(dict(type='ImageClassifier', **MODEL['ResNet-50 (ResNet-50-D)']))
    return dict(state_dict={f'student.{k}': v for k, v in mm.state_dict().items()}, **extra)


@pytest.mark.parametrize('case', ['other family', 'mismatched --model', 'model vs config', 'teacher only',
                                  'empty', 'no tensors', 'mmcls 0.x', 'class count'])
def test_bad_input_is_refused_before_anything_is_written(case, tmp_path, caplog):
    path, out = tmp_path / 'in.pth', tmp_path / 'out.safetensors'
    args = []
    if case == 'other family':  # a ResNet-50-D checkpoint converted as a Swin
        ckpt, args, expect = _resnet_ckpt(), ['--model', 'swin_tiny_patch4_window7_224'], \
            'it holds the official ResNet-50 (ResNet-50-D) student (by its shapes), timm\'s resnet50d'
    elif case == 'mismatched --model':  # plain ResNet-50 is not the released ResNet-50-D
        ckpt, args, expect = _resnet_ckpt(), ['--model', 'resnet50'], '--model resnet50 does not match the checkpoint'
    elif case == 'model vs config':
        student = next(s for s in official.STUDENTS if s.label == 'ResNet-50 (ResNet-50-D)')
        ckpt = _resnet_ckpt(meta=dict(cfg=_distill_config(student)))
        args, expect = ['--model', 'vit_base_patch16_224'], "student_cfg 'configs/resnet/resnet50_8xb32_in1k_strong"
    elif case == 'teacher only':
        ckpt, expect = dict(state_dict={'teacher.backbone.layer1.0.conv1.weight': torch.zeros(2)}), 'teacher.* weights only'
    elif case == 'empty':
        ckpt, expect = dict(state_dict={}, meta={}), 'holds no tensors'
    elif case == 'no tensors':
        ckpt, expect = dict(meta=dict(epoch=1)), 'holds no tensors'
    elif case == 'mmcls 0.x':
        ckpt = dict(meta=dict(mmcls_version='0.25.0', config='model = dict()'),
                    state_dict={'backbone.layers.0.attn.qkv.weight': torch.zeros(2),
                                'head.layers.head.weight': torch.zeros(2)})
        expect = 'mmcls 0.x checkpoint (mmcls_version 0.25.0)'
    else:
        ckpt, args, expect = _resnet_ckpt(), ['--model', 'resnet50d', '--num-classes', '10'], '--num-classes 10 does not match'
    torch.save(ckpt, path)
    assert export.main(['--checkpoint', str(path), '--output', str(out), '--from-official'] + args) == 2
    assert expect in caplog.text
    assert sorted(os.listdir(tmp_path)) == ['in.pth']


def test_config_reader_takes_literals_only():
    text = "model = dict(type='ImageClassifier', backbone=dict(type='ConvNeXt', arch='tiny', " \
           "gap_before_final_norm=False))\nx = __import__('os').system('false')\nsize = -3\n"
    cfg = official.read_config(text)
    assert cfg == {'model': {'type': 'ImageClassifier', 'backbone': {'type': 'ConvNeXt', 'arch': 'tiny',
                                                                      'gap_before_final_norm': False}}, 'size': -3}
    assert official.config_student(cfg)[0].label == 'ConvNeXt-T'
