"""Create a teacher by timm name (hub weights) or from a local checkpoint, loaded strictly."""
import logging
from typing import Optional

import torch.nn as nn

from timm.models import create_model, is_model, load_state_dict
from timm.models import parse_model_name, split_model_name_tag

_logger = logging.getLogger(__name__)


class TeacherLoadError(RuntimeError):
    """A teacher that cannot be created or whose weights do not fit; the message says why."""


def _describe_mismatch(missing, unexpected, shapes, limit=8):
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', shapes)):
        if keys:
            shown = ', '.join(keys[:limit]) + (f' ... (+{len(keys) - limit} more)' if len(keys) > limit else '')
            parts.append(f'{len(keys)} {label} keys: {shown}')
    return '; '.join(parts)


def load_teacher_weights(model: nn.Module, path: str, name: str) -> None:
    """Load ``path`` into ``model`` strictly; a mismatch names the keys and stops."""
    try:
        state = load_state_dict(path, use_ema=False)  # weights_only=True / safetensors
    except FileNotFoundError:
        raise TeacherLoadError(f"teacher checkpoint '{path}' does not exist") from None
    except Exception as e:  # unpickling refused, truncated file, not a checkpoint
        raise TeacherLoadError(f"teacher checkpoint '{path}' cannot be read safely ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]}); it must be a weights-only .pth/.pth.tar "
                               f"or a .safetensors file") from None
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in own
                    if k in state and hasattr(state[k], 'shape') and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise TeacherLoadError(
            f"teacher checkpoint '{path}' does not fit --teacher {name}: "
            f"{_describe_mismatch(missing, unexpected, shapes)}. Pass the --teacher architecture the "
            f"checkpoint was trained with (and --num-classes of its head)")
    model.load_state_dict(state, strict=True)


def create_teacher(
        name: str,
        num_classes: int,
        in_chans: int = 3,
        checkpoint: Optional[str] = None,
        img_size: Optional[int] = None,
        **kwargs,
) -> nn.Module:
    """``--teacher NAME`` (with a pretrained tag: hub weights) or ``NAME --teacher-checkpoint PATH``."""
    arch = parse_model_name(name)[1] if ':' in name else name
    if not is_model(split_model_name_tag(arch)[0]):
        raise TeacherLoadError(f"unknown teacher model '{name}'; use a timm model name, e.g. "
                               f"swin_large_patch4_window7_224.ms_in22k_ft_in1k (timm.list_models() lists them)")
    if img_size:
        kwargs['img_size'] = img_size
    if checkpoint:
        model = create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        load_teacher_weights(model, checkpoint, name)
        _logger.info(f"Teacher '{name}' loaded from '{checkpoint}'")
    else:
        model = create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
        _logger.info(f"Teacher '{name}' created with its pretrained weights")
    model.requires_grad_(False)
    return model.eval()
