"""Create a teacher by timm name (hub weights) or from a local checkpoint, loaded strictly."""
import logging
from typing import Optional

import torch.nn as nn

from timm.models import create_model, is_model, parse_model_name, split_model_name_tag

from runtime.checkpoint import load_strict, read_checkpoint
from runtime.errors import FatalError

_logger = logging.getLogger(__name__)


class TeacherLoadError(RuntimeError):
    """A teacher that cannot be created or whose weights do not fit; the message says why."""


def load_teacher_weights(model: nn.Module, path: str, name: str) -> None:
    """Load ``path`` (weights-only ``.pth``/``.pth.tar`` or ``.safetensors``) into ``model`` strictly; a mismatch
    names the keys and stops."""
    try:
        state = read_checkpoint(path, what='teacher checkpoint')[0]
    except FatalError as e:  # missing, unreadable, refused (a pickle that imports code), not a state dict
        raise TeacherLoadError(str(e)) from None
    load_strict(model, state, path, f'--teacher {name}', 'Pass the --teacher architecture the checkpoint was '
                'trained with (and --num-classes of its head)', what='teacher checkpoint', error=TeacherLoadError)


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
