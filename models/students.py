"""The paper's student architectures, registered with timm by name.

Each one is a stock timm architecture built through timm's own builder with the keyword arguments
that make it match the ScaleKD students (the paper's Table 3 students, as the official code builds them), so train_kd.py,
validation and export create them with ``timm.create_model(NAME)`` and no extra kwargs:

* ``vit_small_patch16_224_gap``, ``vit_base_patch16_224_gap``: DeiT-S/B shapes without a class
  token; the final LayerNorm is applied to every token, then tokens are averaged
  (``class_token=False, global_pool='avg', fc_norm=False``). timm's ``vit_base_patch16_gap_224``
  is not the same model (16 heads instead of DeiT-B's 12).
* ``vit_base_patch14_224_gap``: the same ViT-B with 14 px patches (16x16 tokens at 224), the
  student of the EVA-L/14 teacher.
* ``convnext_tiny_normfirst``: ConvNeXt-T whose final LayerNorm runs per position before global
  pooling (``head_norm_first=True``), as the official student does (timm's ``convnext_tiny``
  pools first). Unlike timm's ``convnext_tiny_hnf`` it keeps the Linear MLP layout.
* ``mixer_b14_224``: Mixer-B with 14 px patches (16x16 tokens at 224).
* ``vit_base_patch14_224_mmcls``: the official ViT-B/14 student exactly (mmcls ``avg_token=True``): the final
  LayerNorm on every token, the average, then a second LayerNorm (``fc_norm``); timm's kwargs give one or the other.
* ``mixer_s16_224_mmcls``, ``mixer_b16_224_mmcls``, ``mixer_b14_224_mmcls``: the official Mixer students exactly:
  timm's Mixer with mmcls's LayerNorm eps 1e-5 (timm's Mixer uses 1e-6). ``models/official.py`` converts the
  released checkpoints onto these.

None of them has published weights: the single pretrained tag ``untrained`` only carries the data
config (ImageNet mean/std, bicubic, 224 px).
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
import copy
from functools import partial

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import _create_convnext
from timm.models.mlp_mixer import _create_mixer
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer, checkpoint_filter_fn


def _cfg(**kwargs):
    cfg = dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
               interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    cfg.update(kwargs)
    return cfg


default_cfgs = generate_default_cfgs({
    'vit_small_patch16_224_gap.untrained': _cfg(first_conv='patch_embed.proj', classifier='head'),
    'vit_base_patch16_224_gap.untrained': _cfg(first_conv='patch_embed.proj', classifier='head'),
    'vit_base_patch14_224_gap.untrained': _cfg(first_conv='patch_embed.proj', classifier='head'),
    'convnext_tiny_normfirst.untrained': _cfg(first_conv='stem.0', classifier='head.fc', pool_size=(7, 7)),
    'mixer_b14_224.untrained': _cfg(first_conv='stem.proj', classifier='head'),
    'vit_base_patch14_224_mmcls.untrained': _cfg(first_conv='patch_embed.proj', classifier='head'),
    'mixer_s16_224_mmcls.untrained': _cfg(first_conv='stem.proj', classifier='head'),
    'mixer_b16_224_mmcls.untrained': _cfg(first_conv='stem.proj', classifier='head'),
    'mixer_b14_224_mmcls.untrained': _cfg(first_conv='stem.proj', classifier='head'),
})

# ViT without class token: LN on all tokens, then the average (no fc-norm after pooling)
_GAP = dict(class_token=False, global_pool='avg', fc_norm=False)


def _vit_gap(name: str, pretrained: bool, kwargs: dict, **args):
    return _create_vision_transformer(name, pretrained=pretrained, **dict(dict(img_size=224, depth=12, **args, **_GAP),
                                                                          **kwargs))


@register_model
def vit_small_patch16_224_gap(pretrained=False, **kwargs):
    """ViT-S/16 (DeiT-S shape), no class token, average of final-normed tokens."""
    return _vit_gap('vit_small_patch16_224_gap', pretrained, kwargs, patch_size=16, embed_dim=384, num_heads=6)


@register_model
def vit_base_patch16_224_gap(pretrained=False, **kwargs):
    """ViT-B/16 (DeiT-B shape), no class token, average of final-normed tokens."""
    return _vit_gap('vit_base_patch16_224_gap', pretrained, kwargs, patch_size=16, embed_dim=768, num_heads=12)


@register_model
def vit_base_patch14_224_gap(pretrained=False, **kwargs):
    """ViT-B/14 (16x16 tokens at 224), no class token, average of final-normed tokens."""
    return _vit_gap('vit_base_patch14_224_gap', pretrained, kwargs, patch_size=14, embed_dim=768, num_heads=12)


@register_model
def convnext_tiny_normfirst(pretrained=False, **kwargs):
    """ConvNeXt-T with the final LayerNorm applied per position before global pooling."""
    args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), head_norm_first=True)
    return _create_convnext('convnext_tiny_normfirst', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def mixer_b14_224(pretrained=False, **kwargs):
    """Mixer-B with 14 px patches: 12 blocks, 768 wide, 16x16 tokens at 224."""
    args = dict(img_size=224, patch_size=14, num_blocks=12, embed_dim=768)
    return _create_mixer('mixer_b14_224', pretrained=pretrained, **dict(args, **kwargs))


class TwoNormVisionTransformer(VisionTransformer):
    """timm's ViT with both LayerNorms of mmcls ``avg_token=True``: ``norm`` on every token, ``fc_norm`` after the
    average (timm's ``fc_norm=True`` alone drops the first)."""

    def __init__(self, **kwargs):
        super().__init__(**dict(kwargs, global_pool='avg', fc_norm=True))
        self.norm = copy.deepcopy(self.fc_norm)


@register_model
def vit_base_patch14_224_mmcls(pretrained=False, **kwargs):
    """ViT-B/14 (16x16 tokens at 224), no class token: LN on tokens, average, LN (the official ViT-B/14 student)."""
    args = dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, class_token=False)
    return build_model_with_cfg(TwoNormVisionTransformer, 'vit_base_patch14_224_mmcls', pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls='getter'), **dict(args, **kwargs))


def _mixer_mmcls(name: str, pretrained: bool, kwargs: dict, **args):
    args = dict(img_size=224, norm_layer=partial(nn.LayerNorm, eps=1e-5), **args)
    return _create_mixer(name, pretrained=pretrained, **dict(args, **kwargs))


@register_model
def mixer_s16_224_mmcls(pretrained=False, **kwargs):
    """Mixer-S/16 with LayerNorm eps 1e-5 (the official Mixer-S/16 student)."""
    return _mixer_mmcls('mixer_s16_224_mmcls', pretrained, kwargs, patch_size=16, num_blocks=8, embed_dim=512)


@register_model
def mixer_b16_224_mmcls(pretrained=False, **kwargs):
    """Mixer-B/16 with LayerNorm eps 1e-5 (the official Mixer-B/16 student)."""
    return _mixer_mmcls('mixer_b16_224_mmcls', pretrained, kwargs, patch_size=16, num_blocks=12, embed_dim=768)


@register_model
def mixer_b14_224_mmcls(pretrained=False, **kwargs):
    """Mixer-B/14 with LayerNorm eps 1e-5 (the official Mixer-B/14 student)."""
    return _mixer_mmcls('mixer_b14_224_mmcls', pretrained, kwargs, patch_size=14, num_blocks=12, embed_dim=768)
