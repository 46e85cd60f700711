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

None of them has published weights: the single pretrained tag ``untrained`` only carries the data
config (ImageNet mean/std, bicubic, 224 px).
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import _create_convnext
from timm.models.mlp_mixer import _create_mixer
from timm.models.vision_transformer import _create_vision_transformer


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
