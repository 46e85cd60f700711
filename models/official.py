"""Checkpoints of the official ScaleKD code (OpenMMLab mmcls 1.x, today mmpretrain) as timm students.

The official code writes two layouts, both read here:

* the distillation checkpoint: ``state_dict`` holds the student (``student.backbone.*``, ``student.head.*``) next to
  the teacher (``teacher.*``) and the distillation modules (``distill_losses.*``: the projectors), plus mmengine's
  ``meta`` (the config text in ``meta['cfg']``), ``optimizer``, ``message_hub``, ``param_schedulers``;
* the output of its ``pth_transfer.py``: the student alone (prefix stripped), ``optimizer`` dropped, the rest kept.

``STUDENTS`` lists the released students' architectures (the official student config, the timm name and the kwargs
that rebuild it exactly, the official test pipeline). ``convert`` finds the layout, the family and the architecture
(from the config in ``meta`` when the checkpoint has one, else from ``--model`` and every tensor's shape), maps every
student tensor once onto the timm model's names (a tensor that maps nowhere, or twice, stops the conversion) and
returns the timm state dict with the settings that validate.py and the hub config need. Nothing here runs the
config text: it is parsed for literals only.
"""
import ast
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from timm.models import create_model
from timm.models.convnext import ConvNeXt
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from runtime.errors import FatalError

_logger = logging.getLogger(__name__)

# globals of an mmengine checkpoint outside the weights (log history, numpy scalars): read as inert stand-ins
PICKLE_STAND_INS = ('mmengine.', 'numpy.', 'builtins.getattr', 'mmcls.', 'mmpretrain.')
IMAGENET_MEAN_255, IMAGENET_STD_255 = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
GAP = dict(class_token=False, global_pool='avg', fc_norm=False)  # LN on every token, then the average


@dataclass(frozen=True)
class Student:
    label: str  # the paper's name
    config: str  # the official student config (``student_cfg`` of the distillation config)
    backbone: Dict[str, Any]  # what of the config's backbone dict identifies it
    family: str
    signature: Tuple  # what the weights' shapes say (see _signature)
    name: str  # timm name
    kwargs: Dict[str, Any] = field(default_factory=dict)
    resize: int = 256  # official test pipeline: ResizeEdge(short side, bicubic, pillow), CenterCrop(224)


STUDENTS = (
    Student('Swin-T', 'configs/swin_transformer/swin-tiny_16xb64_in1k.py', dict(type='SwinTransformer', arch='tiny'),
            'swin', ('swin', 96, (2, 2, 6, 2)), 'swin_tiny_patch4_window7_224'),
    Student('ViT-S/16', 'configs/deit/deit-small_pt-4xb256_in1k.py',
            dict(type='VisionTransformer', arch='deit-small', patch_size=16, with_cls_token=False, avg_token=False),
            'vit', ('vit', 384, 16, 12, False), 'vit_small_patch16_224', GAP),
    Student('ViT-B/16', 'configs/deit/deit-base_pt-4xb256_in1k.py',
            dict(type='VisionTransformer', arch='deit-base', patch_size=16, with_cls_token=False, avg_token=False),
            'vit', ('vit', 768, 16, 12, False), 'vit_base_patch16_224', GAP, resize=224),
    Student('ViT-B/14', 'configs/deit/deit-base_pt-4xb256_p14_in1k.py',
            dict(type='VisionTransformer', arch='deit-base', patch_size=14, with_cls_token=False, avg_token=True),
            'vit', ('vit', 768, 14, 12, True), 'vit_base_patch14_224_mmcls'),
    Student('ResNet-50 (ResNet-50-D)', 'configs/resnet/resnet50_8xb32_in1k_strong_aug_coslr_300.py',
            dict(type='ResNetV1d', depth=50), 'resnet', ('resnet', True, (3, 4, 6, 3)), 'resnet50d'),
    Student('ConvNeXt-T', 'configs/convnext/convnext-tiny_32xb128_in1k.py',
            dict(type='ConvNeXt', arch='tiny', gap_before_final_norm=False), 'convnext',
            ('convnext', 96, (3, 3, 9, 3)), 'convnext_tiny', dict(head_norm_first=True)),
    Student('Mixer-S/16', 'configs/mlp_mixer/mlp-mixer-small-p16_64xb64_in1k.py',
            dict(type='MlpMixer', arch='s', patch_size=16), 'mixer', ('mixer', 512, 16, 8), 'mixer_s16_224_mmcls'),
    Student('Mixer-B/16', 'configs/mlp_mixer/mlp-mixer-base-p16_64xb64_in1k.py',
            dict(type='MlpMixer', arch='b', patch_size=16), 'mixer', ('mixer', 768, 16, 12), 'mixer_b16_224_mmcls'),
    Student('Mixer-B/14', 'configs/mlp_mixer/mlp-mixer-base-p14_64xb64_in1k.py',
            dict(type='MlpMixer', arch='b', patch_size=14), 'mixer', ('mixer', 768, 14, 12), 'mixer_b14_224_mmcls'),
)

# family: (a key only its checkpoints hold, its timm class, what it is called, kwargs for a --model of the family)
FAMILIES = {
    'resnet': ('backbone.layer1.0.conv1.weight', ResNet, 'ResNet', {}),
    'vit': ('backbone.layers.0.attn.qkv.weight', VisionTransformer, 'VisionTransformer', GAP),
    'swin': ('backbone.stages.0.blocks.0.attn.w_msa.qkv.weight', SwinTransformer, 'SwinTransformer', {}),
    'convnext': ('backbone.stages.0.0.depthwise_conv.weight', ConvNeXt, 'ConvNeXt', dict(head_norm_first=True)),
    'mixer': ('backbone.layers.0.token_mix.layers.0.0.weight', MlpMixer, 'MlpMixer', {}),
}


# ---------------------------------------------------------------- the config text of ``meta`` (literals only)

def _literal(node: ast.AST) -> Any:
    """The value of a literal expression (``dict(...)`` calls included); ValueError for anything else."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args:
        return {k.arg: _literal(k.value) for k in node.keywords if k.arg}
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand)
    return ast.literal_eval(node)


def read_config(text: str) -> Dict[str, Any]:
    """Top-level assignments of an mmengine config dump whose values are literals (others are left out)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = _literal(node.value)
            except (ValueError, TypeError, SyntaxError):
                pass
    return out


def config_student(cfg: Dict[str, Any]) -> Tuple[Optional[Student], str]:
    """(the released student the config builds, how the config names it); (None, name) for another student."""
    model = cfg.get('model') if isinstance(cfg.get('model'), dict) else {}
    if isinstance(model.get('student_cfg'), str):  # the distillation config names its student's config file
        path = model['student_cfg']
        found = [s for s in STUDENTS if path.replace('\\', '/').endswith(s.config.split('/', 1)[1])]
        return (found[0] if found else None), f"student_cfg '{path}'"
    backbone = dict(model.get('backbone') or {})
    if not backbone:
        return None, 'no model'
    if backbone.get('out_type') == 'avg_featmap':  # mmpretrain's spelling of the fork's avg_token=True
        backbone['avg_token'] = True
    backbone.setdefault('avg_token', False)
    backbone.setdefault('with_cls_token', True)
    found = [s for s in STUDENTS if all(backbone.get(k) == v for k, v in s.backbone.items())]
    desc = ', '.join(f'{k}={v!r}' for k, v in backbone.items() if k in ('type', 'arch', 'depth', 'patch_size'))
    return (found[0] if found else None), f'backbone {desc}'


def config_preprocessing(cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """timm data settings of the config's test pipeline and data preprocessor; None when the config has none;
    FatalError for a pipeline timm's eval transform cannot reproduce."""
    pipeline = cfg.get('test_pipeline')
    for loader in (cfg.get('test_dataloader'), cfg.get('val_dataloader')):
        if pipeline is None and isinstance(loader, dict) and isinstance(loader.get('dataset'), dict):
            pipeline = loader['dataset'].get('pipeline')
    if not isinstance(pipeline, list):
        return None
    steps = {s.get('type'): s for s in pipeline if isinstance(s, dict)}
    resize, crop = steps.get('ResizeEdge'), steps.get('CenterCrop')
    if resize is None or crop is None or resize.get('edge', 'short') != 'short':
        raise FatalError(f"the checkpoint's test pipeline ({[s.get('type') for s in pipeline if isinstance(s, dict)]})"
                         f" is not ResizeEdge(short side) + CenterCrop, which timm's eval transform reproduces")
    size = crop.get('crop_size')
    size = size[0] if isinstance(size, (list, tuple)) else size
    if resize.get('backend', 'cv2') != 'pillow':
        _logger.warning(f"the official test pipeline resizes with {resize.get('backend', 'cv2')} (no antialiasing); "
                        f"timm resizes with PIL: expect top-1 to differ slightly")
    prep = cfg.get('data_preprocessor') or (cfg.get('model') or {}).get('data_preprocessor') or {}
    mean, std = prep.get('mean', IMAGENET_MEAN_255), prep.get('std', IMAGENET_STD_255)
    if prep.get('to_rgb', True) is False and len(set(mean)) > 1:
        raise FatalError("the checkpoint's data preprocessor keeps BGR order (to_rgb=False); timm feeds RGB")
    return dict(input_size=[3, int(size), int(size)], crop_pct=round(int(size) / int(resize['scale']), 6),
                interpolation=resize.get('interpolation', 'bilinear'),
                mean=[round(m / 255, 6) for m in mean], std=[round(s / 255, 6) for s in std])


def student_preprocessing(student: Student) -> Dict[str, Any]:
    """The official test pipeline of a released student (ResizeEdge short side bicubic, CenterCrop 224)."""
    return dict(input_size=[3, 224, 224], crop_pct=round(224 / student.resize, 6), interpolation='bicubic',
                mean=[round(m / 255, 6) for m in IMAGENET_MEAN_255], std=[round(s / 255, 6) for s in IMAGENET_STD_255])


# ---------------------------------------------------------------- layouts

def student_state(ckpt: Any, path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], List[str]]:
    """(the student's tensors with mmcls names, the config in ``meta``, log lines on what was dropped)."""
    if not isinstance(ckpt, dict):
        raise FatalError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint of the official ScaleKD code")
    meta = ckpt.get('meta') if isinstance(ckpt.get('meta'), dict) else {}
    version = str(meta.get('mmcls_version', ''))
    state = ckpt.get('state_dict') if isinstance(ckpt.get('state_dict'), dict) else ckpt
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if version.startswith('0.') or 'head.layers.head.weight' in tensors or 'student.head.layers.head.weight' in tensors:
        raise FatalError(f"'{path}' is an mmcls 0.x checkpoint (mmcls_version {version or '0.x: 0.x head names'}); "
                         f"--from-official reads the mmcls 1.x / mmpretrain layout that the official ScaleKD code "
                         f"writes (student.backbone.*, student.head.fc.*, or those without 'student.')")
    if not tensors:
        raise FatalError(f"'{path}' holds no tensors (keys: {', '.join(map(str, list(ckpt)[:8])) or 'none'}); "
                         f"expected a checkpoint of the official ScaleKD code with student.* (distillation) or "
                         f"backbone.* / head.* (pth_transfer.py) weights")
    others = [k for k in ckpt if k not in ('state_dict', 'meta')] if state is not ckpt else []
    notes = []
    if any(k.startswith('student.') for k in tensors):
        student = {k[len('student.'):]: v for k, v in tensors.items()
                   if k.startswith('student.') and not k.startswith('student.data_preprocessor.')}
        groups: Dict[str, int] = {}
        for k in tensors:
            if not k.startswith('student.') or k.startswith('student.data_preprocessor.'):
                groups[k.split('.')[0]] = groups.get(k.split('.')[0], 0) + 1
        notes.append('distillation checkpoint: ' + (', '.join(f'dropped {n} {g}.* tensors' + (
            ' (the distillation modules)' if g == 'distill_losses' else '') for g, n in sorted(groups.items()))
            or 'no distillation modules'))
    elif any(k.startswith(('backbone.', 'head.')) for k in tensors):
        student = {k: v for k, v in tensors.items() if not k.startswith('data_preprocessor.')}
        notes.append("pth_transfer.py layout (the student alone)")
    elif any(k.startswith('teacher.') for k in tensors):
        raise FatalError(f"'{path}' holds teacher.* weights only ({len(tensors)} tensors): a teacher, not a student. "
                         f"Pass the student's checkpoint: the distillation checkpoint (student.* keys) or its "
                         f"pth_transfer.py output (backbone.*, head.*)")
    else:
        raise FatalError(f"'{path}' has no student.* or backbone.* / head.* weights (first keys: "
                         f"{', '.join(list(tensors)[:5])}): not a checkpoint of the official ScaleKD code")
    if others:
        notes.append(f"dropped the checkpoint entries {', '.join(map(str, others))}")
    text = meta.get('cfg') if isinstance(meta.get('cfg'), str) else ''
    return student, read_config(text) if text else {}, notes


def family_of(state: Dict[str, torch.Tensor], path: str) -> str:
    for name, (key, *_rest) in FAMILIES.items():
        if key in state:
            return name
    known = ', '.join(f'{label} ({key})' for key, _cls, label, _kw in FAMILIES.values())
    raise FatalError(f"the student in '{path}' is of no family the converter knows (first keys: "
                     f"{', '.join(list(state)[:4])}); it maps {known}")


def _count(state: Dict[str, torch.Tensor], pattern: str) -> Tuple[int, ...]:
    """How many indices each group of ``pattern`` (one stage index, one block index) takes."""
    seen: Dict[int, set] = {}
    for k in state:
        m = re.match(pattern, k)
        if m:
            seen.setdefault(int(m[1]), set()).add(int(m[2]) if m.lastindex > 1 else 0)
    return tuple(len(seen[i]) for i in sorted(seen))


def _depth(state: Dict[str, torch.Tensor]) -> int:
    return len({k.split('.')[2] for k in state if k.startswith('backbone.layers.')})


def _signature(family: str, s: Dict[str, torch.Tensor]) -> Tuple:
    """What the weights say about the architecture, in STUDENTS' terms."""
    if family == 'vit':
        w = s['backbone.patch_embed.projection.weight']
        return ('vit', w.shape[0], w.shape[-1], _depth(s), 'backbone.ln2.weight' in s)
    if family == 'swin':
        return ('swin', s['backbone.patch_embed.projection.weight'].shape[0],
                _count(s, r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.'))
    if family == 'convnext':
        return ('convnext', s['backbone.downsample_layers.0.0.weight'].shape[0],
                _count(s, r'backbone\.stages\.(\d+)\.(\d+)\.'))
    if family == 'mixer':
        w = s['backbone.patch_embed.projection.weight']
        return ('mixer', w.shape[0], w.shape[-1], _depth(s))
    return ('resnet', 'backbone.stem.0.conv.weight' in s, _count(s, r'backbone\.layer(\d+)\.(\d+)\.'))


# ---------------------------------------------------------------- mmcls names -> timm names, one family each

Rule = Tuple[str, Any]  # (regex matched at the key's start, replacement template or function of the match)
_FFN = [(r'ffn\.layers\.0\.0\.', 'mlp.fc1.'), (r'ffn\.layers\.1\.', 'mlp.fc2.')]
RULES: Dict[str, List[Rule]] = {
    'vit': [(r'backbone\.patch_embed\.projection\.', 'patch_embed.proj.'), (r'backbone\.pos_embed$', 'pos_embed'),
            (r'backbone\.layers\.(\d+)\.ln(\d)\.', r'blocks.\1.norm\2.'),
            (r'backbone\.layers\.(\d+)\.attn\.', r'blocks.\1.attn.'),
            (r'backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.', r'blocks.\1.mlp.fc1.'),
            (r'backbone\.layers\.(\d+)\.ffn\.layers\.1\.', r'blocks.\1.mlp.fc2.'),
            (r'backbone\.ln1\.', 'norm.'), (r'backbone\.ln2\.', 'fc_norm.'), (r'head\.fc\.', 'head.')],
    'swin': [(r'backbone\.patch_embed\.projection\.', 'patch_embed.proj.'),
             (r'backbone\.patch_embed\.norm\.', 'patch_embed.norm.'),
             (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.', r'layers.\1.blocks.\2.attn.'),
             (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.', r'layers.\1.blocks.\2.mlp.fc1.'),
             (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.', r'layers.\1.blocks.\2.mlp.fc2.'),
             (r'backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm(\d)\.', r'layers.\1.blocks.\2.norm\3.'),
             # mmcls merges patches at the end of a stage, timm at the start of the next
             (r'backbone\.stages\.(\d+)\.downsample\.', lambda m: f'layers.{int(m[1]) + 1}.downsample.'),
             (r'head\.fc\.', 'head.fc.')],
    'convnext': [(r'backbone\.downsample_layers\.0\.(\d)\.', r'stem.\1.'),
                 (r'backbone\.downsample_layers\.(\d+)\.', r'stages.\1.downsample.'),
                 (r'backbone\.stages\.(\d+)\.(\d+)\.depthwise_conv\.', r'stages.\1.blocks.\2.conv_dw.'),
                 (r'backbone\.stages\.(\d+)\.(\d+)\.pointwise_conv(\d)\.', r'stages.\1.blocks.\2.mlp.fc\3.'),
                 (r'backbone\.stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'), (r'head\.fc\.', 'head.fc.')],
    'mixer': [(r'backbone\.patch_embed\.projection\.', 'stem.proj.'),
              (r'backbone\.layers\.(\d+)\.ln(\d)\.', r'blocks.\1.norm\2.'),
              (r'backbone\.layers\.(\d+)\.token_mix\.layers\.0\.0\.', r'blocks.\1.mlp_tokens.fc1.'),
              (r'backbone\.layers\.(\d+)\.token_mix\.layers\.1\.', r'blocks.\1.mlp_tokens.fc2.'),
              (r'backbone\.layers\.(\d+)\.channel_mix\.layers\.0\.0\.', r'blocks.\1.mlp_channels.fc1.'),
              (r'backbone\.layers\.(\d+)\.channel_mix\.layers\.1\.', r'blocks.\1.mlp_channels.fc2.'),
              (r'backbone\.ln1\.', 'norm.'), (r'head\.fc\.', 'head.')],
    'resnet': [(r'backbone\.(conv1)\.', r'\1.'), (r'backbone\.(?:norm|bn)1\.', 'bn1.'),
               (r'backbone\.(layer\d+\.\d+)\.(?:norm|bn)(\d)\.', r'\1.bn\2.'),
               (r'backbone\.(layer\d+\.\d+\.conv\d)\.', r'\1.'), (r'head\.fc\.', 'fc.')],
}


def _rename(key: str, rules: List[Rule]) -> Optional[str]:
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return (repl(m) if callable(repl) else m.expand(repl)) + key[m.end():]
    return None


def _swin_merge(value: torch.Tensor) -> torch.Tensor:
    """Patch-merging input order: mmcls unfolds (channel, row, column), timm concatenates (column, row, channel)."""
    c = value.shape[-1] // 4
    return value.reshape(*value.shape[:-1], c, 2, 2).movedim(-3, -1).transpose(-3, -2).reshape(value.shape)


def _special(family: str, state: Dict[str, torch.Tensor], model: nn.Module) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Keys the rules do not cover: {mmcls key: timm key or (timm key, tensor)}, {mmcls key: why it is dropped}."""
    own = model.state_dict()
    mapped: Dict[str, Any] = {}
    dropped: Dict[str, str] = {}
    norms = sorted(int(m[1]) for k in state for m in [re.match(r'backbone\.norm(\d)\.weight$', k)] if m)
    if family in ('swin', 'convnext') and norms:  # out_indices norms: the last feeds the head, the others the taps
        final = 'norm.' if family == 'swin' else 'norm_pre.'
        for k in state:
            m = re.match(r'backbone\.norm(\d)\.', k)
            if m:
                if int(m[1]) == norms[-1]:
                    mapped[k] = final + k[m.end():]
                else:
                    dropped[k] = 'a stage-output norm of the distillation taps, not on the classification path'
    if family == 'swin':
        for k, v in state.items():
            if k.endswith('relative_position_index'):
                ref = model.get_buffer(_rename(k, RULES['swin']))
                if not torch.equal(v.to(ref.dtype), ref):
                    raise FatalError(f"{k} differs from timm's relative position index: not a Swin the converter "
                                     f"knows")
                dropped[k] = 'a constant index buffer that timm computes itself (checked equal)'
            elif '.downsample.' in k:
                mapped[k] = (_rename(k, RULES['swin']), _swin_merge(v))
    if family == 'vit':
        pos = state.get('backbone.pos_embed')
        if 'backbone.cls_token' in state:  # the fork keeps the class token and its position, and drops them in forward
            dropped['backbone.cls_token'] = 'the class token, unused (with_cls_token=False)'
            if pos is not None and pos.shape[1] == own['pos_embed'].shape[1] + 1:
                mapped['backbone.pos_embed'] = ('pos_embed', pos[:, 1:])
    if family == 'resnet':  # the deep stem (v1d) and the downsample branches, by the order of their layers
        stem = [n for n, m in model.named_modules() if n.startswith('conv1') and isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        stem = [n for n in stem if n != 'conv1'] + ['bn1'] if isinstance(model.conv1, nn.Sequential) else []
        mm_stem = [f'backbone.stem.{j}.{kind}' for j in range(len(stem) // 2) for kind in ('conv', 'bn')]
        for k in state:
            m = re.match(r'(backbone\.stem\.\d+\.(?:conv|bn))\.', k)
            if m and m[1] in mm_stem:
                mapped[k] = stem[mm_stem.index(m[1])] + '.' + k[m.end():]
            m = re.match(r'backbone\.(layer\d+\.\d+\.downsample)\.(\d+)\.', k)
            if m:
                prefix = f'backbone.{m[1]}.'
                mine = sorted({int(x[len(prefix):].split('.')[0]) for x in state if x.startswith(prefix)})
                theirs = [i for i, layer in enumerate(model.get_submodule(m[1]))
                          if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d))]
                if len(mine) == len(theirs):
                    mapped[k] = f'{m[1]}.{theirs[mine.index(int(m[2]))]}.{k[m.end():]}'
    return mapped, dropped


def to_timm(family: str, state: Dict[str, torch.Tensor], model: nn.Module, path: str
            ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Every student tensor mapped once onto ``model``'s names (or dropped for a stated reason); shapes checked."""
    special, dropped = _special(family, state, model)
    own = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}
    unmapped = []
    for k, v in state.items():
        if k in dropped:
            continue
        target = special.get(k) or _rename(k, RULES[family])
        if isinstance(target, tuple):
            target, v = target
        if target is None or target not in own:
            unmapped.append(f'{k} -> {target}' if target else k)
            continue
        if target in out:
            raise FatalError(f"'{path}': {k} and {source[target]} both map to timm's {target}")
        if v.shape != own[target].shape:
            raise FatalError(f"'{path}': {k} {tuple(v.shape)} does not fit timm's {target} {tuple(own[target].shape)} "
                             f"of {type(model).__name__}: the weights are of another architecture than the one built")
        out[target], source[target] = v, k
    missing = [k for k in own if k not in out]
    if unmapped or missing:
        raise FatalError(f"'{path}' does not map onto {type(model).__name__} one to one: "
                         f"{len(unmapped)} student tensors without a place ({', '.join(unmapped[:5])}), "
                         f"{len(missing)} timm tensors without a source ({', '.join(missing[:5])})")
    return out, dropped


# ---------------------------------------------------------------- the whole conversion

def convert(ckpt: Any, path: str, model_name: str = '', num_classes: Optional[int] = None
            ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], nn.Module]:
    """(timm state dict, settings for validate.py / the hub config, the timm model it loads into strictly)."""
    state, cfg, notes = student_state(ckpt, path)
    family = family_of(state, path)
    by_weights = next((s for s in STUDENTS if s.signature == _signature(family, state)), None)
    by_config, how = config_student(cfg) if cfg else (None, '')
    if cfg and by_config is None:
        _logger.warning(f"the config in '{path}' builds a student the converter does not list ({how}); "
                        f"the architecture comes from --model")
    if by_config and by_weights is not by_config:
        raise FatalError(f"the config in '{path}' builds {by_config.label} ({how}) but the weights are "
                         f"{by_weights.label if by_weights else 'of another shape'}: the file is inconsistent")
    expected = by_config or by_weights
    _cls, cls, label, family_kwargs = FAMILIES[family]
    if not model_name and not by_config:
        hint = f' (the weights match {expected.label}: --model {expected.name})' if expected else ''
        raise FatalError(f"'{path}' carries no config that names its student: pass --model NAME, the timm name of "
                         f"the student{hint}")
    if model_name and expected and model_name != expected.name:
        raise FatalError(f"--model {model_name} does not match the checkpoint: it holds the official {expected.label} "
                         f"student ({how or 'by its shapes'}), timm's {expected.name}"
                         f"{' with ' + repr(expected.kwargs) if expected.kwargs else ''}; pass --model {expected.name}"
                         f" or leave --model out")
    name = expected.name if expected else model_name
    kwargs = dict(expected.kwargs) if expected else dict(family_kwargs)
    head = state.get('head.fc.weight')
    if head is None:
        raise FatalError(f"'{path}' has no classification head (head.fc.weight): not a released student")
    if num_classes is not None and num_classes != head.shape[0]:
        raise FatalError(f"--num-classes {num_classes} does not match the checkpoint's head ({head.shape[0]} classes); "
                         f"leave --num-classes out")
    try:
        model = create_model(name, num_classes=head.shape[0], **kwargs)
    except Exception as e:  # an unknown name, kwargs the architecture refuses
        raise FatalError(f"--model {name} cannot be built with {kwargs} ({e})") from None
    if not isinstance(model, cls):
        raise FatalError(f"the checkpoint holds a {label} student ({FAMILIES[family][0]}), but --model {name} is a "
                         f"timm {type(model).__name__}; pass a {label} name"
                         f"{' such as ' + by_weights.name if by_weights else ''}")
    out, dropped = to_timm(family, state, model, path)
    prep = config_preprocessing(cfg) if cfg else None
    if prep is None and expected:
        prep = student_preprocessing(expected)
    for note in notes:
        _logger.info(note)
    if dropped:
        reasons: Dict[str, int] = {}
        for why in dropped.values():
            reasons[why] = reasons.get(why, 0) + 1
        _logger.info('student tensors left out: ' + '; '.join(f'{n} x {why}' for why, n in reasons.items()))
    _logger.info(f"{expected.label if expected else label} student -> timm {name} {kwargs or ''}: {len(out)} tensors"
                 f"{', preprocessing of the official test pipeline ' + str(prep) if prep else ''}")
    extra = {k: v for k, v in kwargs.items() if k != 'global_pool'}  # global_pool travels as the 'gp' setting
    settings = dict(model=name, num_classes=int(head.shape[0]), **({'model_kwargs': extra} if extra else {}),
                    **({'gp': kwargs['global_pool']} if 'global_pool' in kwargs else {}), **(prep or {}))
    return out, settings, model
