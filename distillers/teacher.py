"""Create a teacher by timm name (hub weights) or from a local checkpoint, loaded strictly; name its source."""
import hashlib
import json
import logging
import os
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Dict, Optional, Tuple

import torch.nn as nn
import yaml

from timm.models import create_model, get_pretrained_cfg, is_model, parse_model_name, resolve_model_input_args, \
    split_model_name_tag

from runtime.checkpoint import load_strict, read_checkpoint
from runtime.errors import FatalError, short

_logger = logging.getLogger(__name__)


class TeacherLoadError(RuntimeError):
    """A teacher that cannot be created or whose weights do not fit; the message says why."""


# the distillers that learn from the teacher's logits (feature: pooled features only)
LOGIT_DISTILLERS = ('kd', 'dist', 'token', 'scalekd')
RUN_CHECKPOINTS = ('model_best.pth.tar', 'last.pth.tar')  # a run folder as --teacher-checkpoint: the first found
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')  # a local-dir: folder's weights (timm's save_for_hf)


def check_model_name(name: str, flag: str) -> Optional[str]:
    """Why ``name`` is no name ``timm.create_model`` takes (None when it is one): a registry name with an optional
    pretrained tag, ``hf-hub:ORG/NAME[@REVISION]`` or ``local-dir:FOLDER`` (a folder written by timm's save_for_hf)."""
    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        return f"{flag} '{name}': {e}"
    if source == 'local-dir':
        cfg = os.path.join(model_id, 'config.json')
        if not os.path.isfile(cfg):
            return (f"{flag} '{name}': '{cfg}' does not exist; a local-dir: folder is what timm.models.save_for_hf or "
                    f"export.py --hub-dir writes (config.json + model.safetensors)")
        try:
            with open(cfg) as f:
                arch = json.load(f).get('architecture')
        except (OSError, ValueError, AttributeError) as e:
            return f"{flag} '{name}': '{cfg}' is not a timm config.json ({short(e)})"
        if not arch or not is_model(arch):
            return (f"{flag} '{name}': its config.json names architecture '{arch}', which timm does not know (a model "
                    f"registered by this project's models/ is known; others need their package imported)")
        return None
    if source == 'hf-hub':
        return None  # its config.json comes from the hub when the model is created
    if not is_model(split_model_name_tag(name)[0]):
        return (f"unknown {flag} '{name}'; use a timm model name (timm.list_models() lists them), e.g. "
                f"swin_large_patch4_window7_224.ms_in22k_ft_in1k, hf-hub:ORG/NAME or local-dir:FOLDER")
    return None


def run_checkpoint(path: str) -> Tuple[str, bool]:
    """``--teacher-checkpoint``: (the file to read, whether its EMA is preferred). A run folder of train_kd.py gives
    its model_best.pth.tar (else last.pth.tar), and of it the EMA weights when the run kept an EMA, else the student
    weights; a file gives its ``state_dict`` (the student) as it always did."""
    if not os.path.isdir(path):
        return path, False
    for name in RUN_CHECKPOINTS:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name), True
    raise TeacherLoadError(f"--teacher-checkpoint '{path}' is a folder without {' or '.join(RUN_CHECKPOINTS)}; pass "
                           f"the folder of a finished train_kd.py run or a weight file")


def read_teacher_state(path: str, mmap: bool = False) -> Tuple[dict, str]:
    """The teacher weights of ``--teacher-checkpoint`` (file or run folder) and which entry they are, in one read
    (``mmap``: memory-mapped, for a look at a few shapes)."""
    file, prefer_ema = run_checkpoint(path)
    try:
        state, _, key = read_checkpoint(file, use_ema=None if prefer_ema else False, what='teacher checkpoint',
                                        mmap=mmap)
    except FatalError as e:  # missing, unreadable, refused (a pickle that imports code), not a state dict
        raise TeacherLoadError(str(e)) from None
    return state, key


def teacher_head(name: str, checkpoint: Optional[str] = None) -> Tuple[Optional[int], str]:
    """(class count of the head the teacher's weights come with, where that head comes from); (None, ...) when the
    weights carry no head timm would keep (no pretrained weights known, or no classifier in the file)."""
    try:
        cfg = resolve_model_input_args(name)['pretrained_cfg']
    except Exception as e:  # noqa: BLE001  a hub config that cannot be fetched: creating the teacher will say so
        _logger.debug(f'pretrained_cfg of {name}: {short(e)}')
        return None, ''
    if checkpoint:
        state, key = read_teacher_state(checkpoint, mmap=True)  # only the classifier's shape is read
        classifiers = cfg.get('classifier') or ()
        for c in (classifiers,) if isinstance(classifiers, str) else classifiers:
            w = state.get(f'{c}.weight')
            if w is not None and w.ndim >= 1:
                return int(w.shape[0]), f"--teacher-checkpoint '{checkpoint}' ({c}.weight of its {key} weights)"
        return None, ''
    if not any(cfg.get(k) for k in ('url', 'hf_hub_id', 'file', 'state_dict')) or not cfg.get('num_classes'):
        return None, ''
    return int(cfg['num_classes']), f"the pretrained weights of '{name}'"


def check_teacher_head(args, data_classes: Optional[int]) -> Optional[int]:
    """Before the teacher is created: the class count of its head when it differs from the data's and the run may go
    on (distillation from features only), None when it fits. A head for other classes with a distiller that uses
    the teacher's logits stops here, naming both counts and the fixes; timm would re-initialise it silently."""
    classes, where = teacher_head(args.teacher, args.teacher_checkpoint or None)
    if classes is None or data_classes is None or classes == data_classes:
        return None
    if args.teacher_min_top1 is not None:
        raise FatalError(f'--teacher-min-top1 cannot check a teacher whose head has {classes} classes on data with '
                         f'{data_classes}; fine-tune the teacher on the data first (see README, "Distil on your own '
                         f'data")')
    if args.distiller == 'feature' or (args.distiller == 'scalekd' and args.teacher_features_only):
        return classes
    if args.teacher_features_only:
        raise FatalError(f'--teacher-features-only leaves --distiller {args.distiller} nothing to learn from (it uses '
                         f'only the teacher\'s logits); use --distiller scalekd or feature, or fine-tune the teacher')
    source = f' --pretrained-path {run_checkpoint(args.teacher_checkpoint)[0]}' if args.teacher_checkpoint else ''
    raise FatalError(
        f"the teacher's head has {classes} classes ({where}) but the data has {data_classes}: --distiller "
        f"{args.distiller} would learn from a randomly initialised head. Fix: (a) fine-tune the teacher on this data, "
        f"python train_kd.py --data-dir {args.data_dir} --distiller none --model {args.teacher} --pretrained{source} "
        f"--output OUT --experiment teacher-ft, then distil with --teacher {args.teacher} "
        f"--teacher-checkpoint OUT/teacher-ft (the run folder: its EMA weights when it kept an EMA, else the student "
        f"weights); or (b) distil from the teacher's features only, without its logits: --distiller scalekd "
        f"--teacher-features-only (or --distiller feature)")


def load_teacher_weights(model: nn.Module, path: str, name: str) -> str:
    """Load ``path`` (weights-only ``.pth``/``.pth.tar``/``.safetensors``, or a run folder) into ``model`` strictly; a
    mismatch names the keys and stops. Returns which entry was loaded (``state_dict``, ``state_dict_ema``, ``file``)."""
    state, key = read_teacher_state(path)
    load_strict(model, state, path, f'--teacher {name}', 'Pass the --teacher architecture the checkpoint was '
                'trained with (and --num-classes of its head)', what='teacher checkpoint', error=TeacherLoadError)
    return key


def create_teacher(
        name: str,
        num_classes: int,
        in_chans: int = 3,
        checkpoint: Optional[str] = None,
        img_size: Optional[int] = None,
        **kwargs,
) -> nn.Module:
    """``--teacher NAME`` (with a pretrained tag, ``hf-hub:`` or ``local-dir:``: those weights) or
    ``NAME --teacher-checkpoint PATH`` (a weight file or a train_kd.py run folder). ``num_classes`` is the head the
    weights must have (check_teacher_head decides it before)."""
    problem = check_model_name(name, '--teacher')
    if problem:
        raise TeacherLoadError(problem)
    if img_size:
        kwargs['img_size'] = img_size
    try:
        model = create_model(name, pretrained=not checkpoint, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as e:  # noqa: BLE001  a hub that cannot be reached, a folder without weights, a bad kwarg
        raise TeacherLoadError(f"teacher '{name}' cannot be created ({short(e)}); check the name, the network (hub "
                               f"weights), or pass --teacher-checkpoint PATH with local weights") from None
    if checkpoint:
        key = load_teacher_weights(model, checkpoint, name)
        what = 'EMA weights' if key in ('state_dict_ema', 'model_ema') else \
            'student weights: the run kept no EMA' if os.path.isdir(checkpoint) else f"its '{key}' entry"
        _logger.info(f"Teacher '{name}' loaded from '{run_checkpoint(checkpoint)[0]}' ({what})")
    else:
        _logger.info(f"Teacher '{name}' created with its pretrained weights ({model.num_classes} classes)")
    model.requires_grad_(False)
    return model.eval()


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(name: str, checkpoint: Optional[str] = None, role: str = 'teacher') -> Dict[str, Any]:
    """Where a model's weights come from, for the run record (args.yaml, start-up log); keys ``<role>_source``,
    ``_sha256``, ``_bytes``, ``_weights``, ``_revision``.

    A local file or run folder: its absolute path, sha256 and size (hashed once per file and modification time) and,
    for a run folder, the entry used. ``local-dir:FOLDER``: the folder and its weight file's hash. ``hf-hub:ID``: the
    hub id and the revision (``@REV`` in the name, else the newest, unpinned). A registry name: ``hub <name.tag>``
    and where timm fetches it from (the Hugging Face hub id or the URL of the tag's pretrained_cfg).
    """
    def file_record(path, **extra):
        path = os.path.abspath(path)
        st = os.stat(path)
        return OrderedDict([(f'{role}_source', path), *((f'{role}_{k}', v) for k, v in extra.items()),
                            (f'{role}_sha256', _sha256(path, st.st_size, st.st_mtime_ns)), (f'{role}_bytes', st.st_size)])

    if checkpoint:
        file, prefer_ema = run_checkpoint(checkpoint)
        return file_record(file, **({'weights': 'EMA when the run has one, else student'} if prefer_ema else {}))
    source, model_id = parse_model_name(name)
    if source == 'local-dir':
        found = [os.path.join(model_id, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(model_id, f))]
        if not found:
            return OrderedDict([(f'{role}_source', f'local-dir {os.path.abspath(model_id)} (no weight file)')])
        rec = file_record(found[0])
        rec[f'{role}_source'] = f'local-dir {os.path.abspath(model_id)} ({os.path.basename(found[0])})'
        return rec
    if source == 'hf-hub':
        repo, _, rev = model_id.partition('@')
        return OrderedDict([(f'{role}_source', f'hf-hub {repo}'),
                            (f'{role}_revision', rev or 'newest on the hub (not pinned; pin with hf-hub:ID@REVISION)')])
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  an unknown tag: the name itself is the record
        cfg = None
    if cfg is None:
        return OrderedDict([(f'{role}_source', f'hub {name} (no pretrained weights known to timm)')])
    tagged = f'{split_model_name_tag(name)[0]}.{cfg.tag}' if cfg.tag else name
    where = f'hf-hub:{cfg.hf_hub_id}' if cfg.hf_hub_id else cfg.url or cfg.file or 'no weights: random initialisation'
    return OrderedDict([(f'{role}_source', f'hub {tagged} ({where})')])


def teacher_identity(name: str, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """``weights_identity`` of the teacher."""
    return weights_identity(name, checkpoint, 'teacher')


def identity_yaml(args) -> str:
    """The run's weight sources as YAML lines for its args.yaml: the teacher's, and the student's when it starts from
    pretrained weights or a hf-hub:/local-dir: name ('' for neither). Recipes skip these keys (config.py
    IGNORED_KEYS), and they are no run setting (not in the checkpoint's args, not compared on resume)."""
    ident = OrderedDict()
    if getattr(args, 'pretrained', False) or str(getattr(args, 'model', '')).startswith(('hf-hub:', 'local-dir:')):
        ident.update(weights_identity(args.model, args.pretrained_path or None, 'model') if args.pretrained else
                     OrderedDict(model_source=f'{args.model} (architecture only: no --pretrained)'))
    if getattr(args, 'distiller', 'none') != 'none' and args.teacher:
        ident.update(teacher_identity(args.teacher, args.teacher_checkpoint or None))
    return yaml.safe_dump(dict(ident), default_flow_style=False, sort_keys=False) if ident else ''
