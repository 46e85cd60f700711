"""timm's hub layout for an exported student: ``config.json`` and ``model.safetensors`` from timm's ``save_for_hf``
plus a ``README.md`` model card (timm's ``generate_readme``), published as one folder; ``push_to_hf_hub`` uploads.

* ``check_hub_dir``: the target is new or an empty folder (never overwritten) and its parent is writable.
* ``write_hub_dir``: fills a hidden sibling folder (``checkpoint.atomic_write_dir``), checks that
  ``timm.create_model('local-dir:...', pretrained=True)`` rebuilds the same weights and preprocessing, runs the
  caller's check, then renames it onto the target: a crash leaves no half-written folder under the target's name.
* ``model_card``: the card's fields (student, teacher and its weights, distiller, recipe, preprocessing, top-1).
* ``run_identity``: the teacher identity lines of the run's ``args.yaml`` next to the checkpoint.
"""
import logging
import os
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import yaml

from timm.data import resolve_data_config
from timm.models import create_model, model_entrypoint, push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme

from .checkpoint import atomic_write_dir
from .errors import FatalError, short
from .preflight import check_output_path

_logger = logging.getLogger(__name__)
HUB_FILES = ('config.json', 'model.safetensors', 'README.md')
CARD_DATA_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct')


class PushError(FatalError):
    """The local export is done, the upload failed (network, token, repository rights)."""
    exit_code = 1


def check_hub_dir(path: str, flag: str = '--hub-dir') -> None:
    """``path`` does not exist or is an empty folder, and its parent can hold the folder (nothing is created)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FatalError(f"{flag} '{path}' is a file; pass a new or empty folder")
    if os.path.isdir(path) and os.listdir(path):
        names = sorted(os.listdir(path))
        raise FatalError(f"{flag} '{path}' is not empty ({len(names)} entries, e.g. '{names[0]}'); it is never "
                         f"overwritten: pass a new or empty folder")
    check_output_path(os.path.dirname(os.path.abspath(path)), flag)


def check_push(repo: str) -> None:
    """A repository id the hub accepts, and hub access not switched off (before any file is written)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise FatalError(f"--push-to-hub '{repo}' is not a hub repository id ({short(e)}); pass USER/NAME") from None
    if constants.HF_HUB_OFFLINE:
        raise FatalError('--push-to-hub needs the network but HF_HUB_OFFLINE is set; unset it (and log in with '
                         '`hf auth login` or HF_TOKEN), or drop --push-to-hub and upload the --hub-dir later')


def run_identity(checkpoint: str, run_args: Dict[str, Any]) -> Dict[str, Any]:
    """``teacher_source`` / ``teacher_sha256`` from the ``args.yaml`` next to ``checkpoint`` when that file is of
    the same run (same model and teacher); {} when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), 'args.yaml')
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        if os.path.exists(path):
            _logger.warning(f"'{path}' cannot be read ({short(e)}); the model card names the teacher without its "
                            f"weights' source")
        return {}
    if not isinstance(saved, dict) or any(saved.get(k) != run_args.get(k) for k in ('model', 'teacher')):
        _logger.warning(f"'{path}' is not the args.yaml of this checkpoint's run; its teacher identity is unused")
        return {}
    return {k: saved[k] for k in ('teacher_source', 'teacher_sha256') if saved.get(k)}


def needs_project_models(name: str) -> bool:
    """The architecture is registered by this project's ``models/`` (loading it needs ``import models``)."""
    return not model_entrypoint(name).__module__.startswith('timm.')


def model_card(model: nn.Module, data_config: Dict[str, Any], run_args: Dict[str, Any], identity: Dict[str, Any],
               weights: str, source: str, top1: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's model card dict (``generate_readme`` / ``push_to_hf_hub`` take it) for an exported student.

    ``weights``: which weights (e.g. the EMA student of RUN/model_best.pth.tar); ``source``: the name a reader
    passes to ``timm.create_model`` (``local-dir:DIR`` or ``hf-hub:REPO``); ``top1``: validate.py's results.
    """
    arch = model.pretrained_cfg['architecture']
    distiller = run_args.get('distiller') or 'unknown'
    teacher = run_args.get('teacher') if distiller != 'none' else ''
    details = {'Model Type': 'Image classification', 'Student': arch,
               'Classes': model.num_classes, 'Params (M)': round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               'Weights': weights, 'Distiller': distiller}
    if teacher:
        details['Teacher'] = teacher
        local = run_args.get('teacher_checkpoint')
        src = identity.get('teacher_source') or (local and os.path.abspath(local)) or f'hub {teacher}'
        details['Teacher weights'] = os.path.basename(src) if os.path.isabs(src) else src  # no local paths
        if identity.get('teacher_sha256'):
            details['Teacher weights sha256'] = identity['teacher_sha256']
    if 'config' in run_args:  # a train_kd.py run
        recipe = run_args['config'] or 'none (command-line flags)'
        details['Recipe'] = os.path.basename(recipe) if os.path.isabs(recipe) else recipe
    details.update({k.replace('_', ' ').capitalize(): ', '.join(map(str, v)) if isinstance(v, (tuple, list)) else v
                    for k, v in ((k, data_config[k]) for k in CARD_DATA_KEYS)})
    if top1:
        data = os.path.basename(os.path.normpath(top1.get('data_dir', ''))) or 'the validation data'
        details['Top-1'] = (f"{top1['top1']:.2f} % (top-5 {top1['top5']:.2f} %) on {top1['num_images']} images of "
                            f"'{data}', validated at export")
    imports = 'import timm\n'
    if needs_project_models(arch):
        imports += f'import models  # scalekd-timm models/ registers {arch}: run from a checkout of scalekd-timm\n'
    usage = (f"```python\n{imports}model = timm.create_model('{source}', pretrained=True).eval()\n"
             f"cfg = timm.data.resolve_data_config({{}}, model=model)  # the run's input size, mean/std, crop\n"
             f"transform = timm.data.create_transform(**cfg)\n```\n")
    what = (f'distilled with {distiller} from {teacher}' if teacher else 'trained without a teacher (distiller none)'
            if distiller == 'none' else f'trained with distiller {distiller}')
    return dict(description=f'A {arch} student {what}, exported by scalekd-timm export.py. The license follows '
                            f'the training data and the teacher weights; the owner sets it.',
                details=details, usage=usage, license='other',
                tags=['image-classification', 'timm', 'knowledge-distillation', 'scalekd'])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_reload(folder: str, model: nn.Module, data_config: Dict[str, Any]) -> None:
    """``timm.create_model('local-dir:folder', pretrained=True)`` has the student's weights and preprocessing."""
    try:
        back = create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:  # a config timm cannot rebuild from
        raise FatalError(f"timm cannot rebuild the hub folder '{folder}' ({short(e)})") from None
    ref, got = model.state_dict(), back.state_dict()
    if ref.keys() != got.keys() or not all(torch.equal(ref[k], got[k]) for k in ref):
        raise FatalError(f"timm.create_model('local-dir:{folder}') does not rebuild the student's weights")
    cfg = resolve_data_config({}, model=back)
    wrong = [k for k in CARD_DATA_KEYS if _plain(cfg[k]) != _plain(data_config[k])]
    if wrong:
        raise FatalError(f"the hub config of '{folder}' resolves {', '.join(f'{k}={cfg[k]}' for k in wrong)}, "
                         f"the run used {', '.join(f'{k}={data_config[k]}' for k in wrong)}")


def write_hub_dir(model: nn.Module, folder: str, data_config: Dict[str, Any], card: Callable[[], Dict[str, Any]],
                  check: Optional[Callable[[str], None]] = None) -> None:
    """Publish ``folder`` in timm's hub layout. ``check(path of model.safetensors)`` may refuse the weights;
    ``card()`` gives the model card dict for README.md (called after ``check``, so it can report its numbers)."""
    def fill(tmp):
        save_for_hf(model, tmp, safe_serialization=True, data_config=data_config)
        _check_reload(tmp, model, data_config)
        if check is not None:
            check(os.path.join(tmp, 'model.safetensors'))
        with open(os.path.join(tmp, 'README.md'), 'w', encoding='utf-8') as f:
            f.write(generate_readme(card(), os.path.basename(os.path.abspath(folder))))

    try:
        atomic_write_dir(folder, fill)
    except FatalError:
        raise
    except (OSError, RuntimeError, ValueError) as e:  # disk full, a folder filled meanwhile, a config timm refuses
        raise FatalError(f"could not write the hub folder '{folder}' ({short(e)}); pass --hub-dir as a new folder "
                         f"on a writable disk") from None


def push(model: nn.Module, repo: str, card: Dict[str, Any], data_config: Dict[str, Any],
         revision: Optional[str] = None, private: bool = False) -> Any:
    """timm's ``push_to_hf_hub`` (safetensors only; timm adds the README.md only where the repository has none)."""
    try:
        return push_to_hf_hub(model, repo, commit_message='Add scalekd-timm student', revision=revision,
                              private=private, model_card=card, data_config=data_config, safe_serialization=True)
    except Exception as e:  # network, token, rights: the local export stands
        raise PushError(f"push to the hub repository '{repo}' failed ({short(e)}); check the network and your "
                        f"token (`hf auth login` or HF_TOKEN), then run export.py again with --push-to-hub") from None
