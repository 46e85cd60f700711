"""Small models for the CPU demo and the small reproduction (32 px, 10 classes).

``scalekd_demo_vit``: a 4-block, 96-wide ViT on 4x4 patches (8x8 tokens), no class token, average pooling
over final-normed tokens (the paper's ViT head), used as the teacher. ``scalekd_demo_resnet`` and
``scalekd_demo_mixer`` are small students of two other families.
"""
import torch.nn as nn

from timm.models import generate_default_cfgs, register_model
from timm.models.mlp_mixer import _create_mixer
from timm.models.resnet import BasicBlock, _create_resnet
from timm.models.vision_transformer import _create_vision_transformer

# Fashion-MNIST statistics would do as well; ImageNet's keep teacher and student on one convention
_demo_cfg = dict(url='', num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                 interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

default_cfgs = generate_default_cfgs({
    'scalekd_demo_vit.untrained': dict(_demo_cfg, first_conv='patch_embed.proj', classifier='head'),
    'scalekd_demo_resnet.untrained': dict(_demo_cfg, first_conv='conv1', classifier='fc'),
    'scalekd_demo_mixer.untrained': dict(_demo_cfg, first_conv='stem.proj', classifier='head'),
})


@register_model
def scalekd_demo_vit(pretrained=False, **kwargs):
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, class_token=False,
                global_pool='avg', fc_norm=False, num_classes=10)
    return _create_vision_transformer('scalekd_demo_vit', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def scalekd_demo_resnet(pretrained=False, **kwargs):
    args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=32, num_classes=10)
    model = _create_resnet('scalekd_demo_resnet', pretrained=pretrained, **dict(args, **kwargs))
    # CIFAR-style: no stem max-pool, so 32 px gives 4x4 stage-3 and 2x2 stage-4 maps (as 14x14 / 7x7 at 224)
    model.maxpool = nn.Identity()
    for info in model.feature_info[1:]:
        info['reduction'] //= 2
    return model


@register_model
def scalekd_demo_mixer(pretrained=False, **kwargs):
    args = dict(img_size=32, patch_size=4, num_blocks=4, embed_dim=128, num_classes=10)
    return _create_mixer('scalekd_demo_mixer', pretrained=pretrained, **dict(args, **kwargs))
