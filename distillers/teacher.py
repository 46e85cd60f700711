"""Create a teacher by timm name (hub weights) or from a local checkpoint, loaded strictly; name its source."""
import hashlib
import logging
import os
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Dict, Optional

import torch.nn as nn
import yaml

from timm.models import create_model, get_pretrained_cfg, is_model, parse_model_name, split_model_name_tag

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


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()


def teacher_identity(name: str, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """Where the teacher's weights come from, for the run record (args.yaml, start-up log).

    A local file: ``teacher_source`` (its absolute path), ``teacher_sha256`` and ``teacher_bytes`` (hashed once
    per file and modification time). Hub weights: ``teacher_source`` = ``hub <name.tag>`` and where timm fetches
    them from (the Hugging Face hub id or the URL of the tag's pretrained_cfg).
    """
    if checkpoint:
        path = os.path.abspath(checkpoint)
        st = os.stat(path)
        return OrderedDict(teacher_source=path, teacher_sha256=_sha256(path, st.st_size, st.st_mtime_ns),
                           teacher_bytes=st.st_size)
    if name.startswith(('hf-hub:', 'local-dir:')) or ':' in name:
        return OrderedDict(teacher_source=f'hub {name}')
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  an unknown tag: the name itself is the record
        cfg = None
    if cfg is None:
        return OrderedDict(teacher_source=f'hub {name} (no pretrained weights known to timm)')
    tagged = f'{split_model_name_tag(name)[0]}.{cfg.tag}' if cfg.tag else name
    where = f'hf-hub:{cfg.hf_hub_id}' if cfg.hf_hub_id else cfg.url or cfg.file or 'no weights: random initialisation'
    return OrderedDict(teacher_source=f'hub {tagged} ({where})')


def identity_yaml(args) -> str:
    """The run's ``teacher_identity`` as YAML lines for its args.yaml ('' without a teacher); recipes skip these
    keys (config.py IGNORED_KEYS), and they are no run setting (not in the checkpoint's args, not compared on
    resume)."""
    if getattr(args, 'distiller', 'none') == 'none' or not args.teacher:
        return ''
    ident = teacher_identity(args.teacher, args.teacher_checkpoint or None)
    return yaml.safe_dump(dict(ident), default_flow_style=False, sort_keys=False)
