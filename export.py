#!/usr/bin/env python3
"""Export the student of a distillation run as a plain timm weight file (timm's clean_checkpoint idea).

Keeps the student or its EMA (default: the EMA when the run has one), drops the projectors
(``task_state``), optimizer, args and run state, checks a strict load into ``timm.create_model``
of the run's student, and writes ``.safetensors`` or a weights-only ``.pth`` atomically.
``--from-official`` converts a released student of the official (mmcls 1.x) ScaleKD code (``models/official.py``).
``--hub-dir`` writes timm's hub layout with a model card (``runtime/hub.py``), ``--push-to-hub`` uploads it.

    python export.py --checkpoint RUN/model_best.pth.tar --output student.safetensors [--validate-data DATA]
    python export.py --checkpoint RUN/model_best.pth.tar --hub-dir student-hub [--push-to-hub USER/NAME]
    python export.py --from-official --checkpoint scalekd_vitb16.pth --output vitb16.safetensors [--model NAME]
"""
import argparse
import json
import logging
import os
import sys
import tempfile

import safetensors.torch
import torch

from timm import utils
from timm.data import resolve_data_config
from timm.models import clean_state_dict, create_model

import models  # noqa: F401  registers the demo / paper student variants
from models import official
from config import run_settings
from runtime.checkpoint import atomic_write, load_strict, load_weights_only, read_checkpoint
from runtime.timm_flags import plain_student_state
from runtime import hub
from runtime.errors import FatalError, log_startup_error, short
from runtime.onnx_export import add_onnx_args, check_onnx_args, export_onnx
from runtime.preflight import check_numeric_flags, check_output_file
from validate import DATA_KEYS, STRICT_HINT, validate_main

_logger = logging.getLogger('export')
TOP1_TOLERANCE = 0.01  # points


class ExportCheckError(FatalError):
    """The exported file does not validate like the student it came from."""
    exit_code = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Export the student of a ScaleKD / KD run for timm')
    p.add_argument('--checkpoint', required=True, metavar='PATH', help='run checkpoint, e.g. RUN/model_best.pth.tar')
    p.add_argument('--output', default='', metavar='PATH',
                   help='.safetensors (default) or .pth file (default without --hub-dir / --push-to-hub: '
                        '<model>[-ema].safetensors next to the input)')
    p.add_argument('--hub-dir', default='', metavar='DIR',
                   help="write timm's hub layout (config.json, model.safetensors, README.md model card) to DIR, a new "
                        "or empty folder; timm.create_model('local-dir:DIR', pretrained=True) loads it")
    p.add_argument('--push-to-hub', default='', metavar='REPO',
                   help="upload the student with timm's push_to_hf_hub to the Hugging Face hub repository REPO")
    p.add_argument('--hub-revision', default=None, metavar='BRANCH', help='branch of --push-to-hub (default: main)')
    p.add_argument('--hub-private', action='store_true', help='--push-to-hub creates a private repository')
    p.add_argument('--use-ema', action=argparse.BooleanOptionalAction, default=None,
                   help='export the EMA student (default: the EMA when the checkpoint has one)')
    p.add_argument('--from-official', action='store_true', help='input is a checkpoint of the official ScaleKD code')
    p.add_argument('--model', default='', metavar='NAME',
                   help='timm student name (with --from-official; needed when the checkpoint carries no config)')
    p.add_argument('--num-classes', type=int, default=None, help='with --from-official: checked against its head')
    p.add_argument('--validate-data', default='', metavar='DIR',
                   help='validate the export and the student in the checkpoint on DIR; fail if top-1 differs')
    p.add_argument('-b', '--batch-size', type=int, default=64, help='validation batch size (default: 64)')
    p.add_argument('-j', '--workers', type=int, default=2, help='validation data workers (default: 2)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='validation device')
    add_onnx_args(p)  # --onnx FILE, --dynamic-batch, --onnx-atol, ... (runtime/onnx_export.py)
    return p


def _create_kwargs(settings: dict) -> dict:
    """timm.create_model kwargs of the run's student (as train_kd.py built it, minus train-only settings)."""
    kw = dict(num_classes=settings.get('num_classes'), in_chans=settings.get('in_chans'),
              global_pool=settings.get('gp'), bn_eps=settings.get('bn_eps'), **settings.get('model_kwargs', {}))
    return {k: v for k, v in kw.items() if v is not None}


def _write(state: dict, path: str, settings: dict, check=None) -> None:
    """``path`` through the atomic writer; the temporary file must read back as written (and pass ``check``)."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.partial-{os.getpid()}-{base}')  # keeps the extension: read back by its format

    def write(f):
        if path.endswith('.safetensors'):
            f.write(safetensors.torch.save(state, metadata={'format': 'pt', 'scalekd': json.dumps(settings)}))
        else:
            torch.save(state, f)

    def read_back(tmp_path):
        back = read_checkpoint(tmp_path, what='the exported file')[0]
        if back.keys() != state.keys() or not all(torch.equal(back[k], v) for k, v in state.items()):
            raise FatalError(f"'{tmp_path}' does not read back as written; check the disk")
        if check is not None:
            check(tmp_path)

    try:
        atomic_write(path, write, check=read_back, tmp=tmp)
    except FatalError:
        raise
    except (OSError, RuntimeError, ValueError) as e:  # disk full, read-only folder, tensors safetensors refuses
        raise FatalError(f"could not write '{path}' ({short(e)}); pass --output on a writable disk") from None
    finally:
        if os.path.exists(tmp):  # also after Ctrl-C
            os.remove(tmp)


def export_main(argv=None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.hub_revision or args.hub_private) and not args.push_to_hub:
        parser.error('--hub-revision and --hub-private go with --push-to-hub REPO')
    check_numeric_flags(args)
    check_onnx_args(args)  # onnx/onnxruntime importable, a .onnx name
    ckpt = load_weights_only(args.checkpoint, stand_ins=official.PICKLE_STAND_INS if args.from_official else ())
    if args.from_official:
        state, settings, model = official.convert(ckpt, args.checkpoint, args.model, args.num_classes)
        use_ema, what = False, 'student of the official ScaleKD checkpoint'
        run_args = {'distiller': 'scalekd (official code)'}
    else:
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get('args'), argparse.Namespace)
                and isinstance(ckpt.get('state_dict'), dict) and getattr(ckpt['args'], 'model', '')):
            raise FatalError(f"'{args.checkpoint}' is not a checkpoint of a train_kd.py run (no student state_dict "
                             f"and run args); pass RUN/model_best.pth.tar, or --from-official --model NAME for the "
                             f"official ScaleKD code")
        has_ema = isinstance(ckpt.get('state_dict_ema'), dict)
        use_ema = has_ema if args.use_ema is None else args.use_ema
        if use_ema and not has_ema:
            raise FatalError(f"'{args.checkpoint}' has no EMA student (run without --model-ema); pass --no-use-ema")
        key = 'state_dict_ema' if use_ema else 'state_dict'
        run_args = vars(ckpt['args'])
        state, settings = plain_student_state(clean_state_dict(ckpt[key])), run_settings(run_args)  # --split-bn
        dropped = ', '.join(sorted(k for k in ckpt if k != key))
        what = f"{'EMA student (state_dict_ema)' if use_ema else 'student (state_dict)'} of the " \
               f"{getattr(ckpt['args'], 'distiller', '?')} run; dropped {dropped}"
        model = create_model(settings['model'], **_create_kwargs(settings))
    name, num_classes = settings['model'], model.num_classes
    create_args = ''.join(f', {k}={v!r}' for k, v in _create_kwargs(settings).items() if k != 'num_classes')
    load_strict(model, state, args.checkpoint, f"timm.create_model('{name}', num_classes={num_classes}{create_args})",
                STRICT_HINT)
    output = args.output or ('' if args.hub_dir or args.push_to_hub or args.onnx else os.path.join(
        os.path.dirname(args.checkpoint), f"{name}{'-ema' if use_ema else ''}.safetensors"))
    if output:
        if not output.endswith(('.safetensors', '.pth', '.pt', '.bin')):
            raise FatalError(f"--output '{output}' must end in .safetensors or .pth")
        if os.path.abspath(output) == os.path.abspath(args.checkpoint):
            raise FatalError('--output must not overwrite the --checkpoint')
        check_output_file(output, '--output')  # its folder exists and is writable
    if args.hub_dir:
        hub.check_hub_dir(args.hub_dir)  # new or empty, never overwritten
        if output and os.path.abspath(output).startswith(os.path.abspath(args.hub_dir) + os.sep):
            raise FatalError(f"--output '{output}' is inside --hub-dir, which holds timm's files only; "
                             f"put it elsewhere")
    if args.push_to_hub:
        hub.check_push(args.push_to_hub)
    if args.onnx:
        check_output_file(args.onnx, '--onnx')
    _logger.info(f"Exporting the {what}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    results = {}
    common = ['--data-dir', args.validate_data, '-b', str(args.batch_size), '-j', str(args.workers),
              '--device', args.device]

    def check(tmp, target=output):  # the file is published only if it validates like the student it came from
        results['export'] = validate_main(common + ['--checkpoint', tmp], settings=settings)
        if args.from_official:
            return
        results['run'] = validate_main(common + ['--checkpoint', args.checkpoint] + (['--use-ema'] * use_ema))
        a, b = results['export']['top1'], results['run']['top1']
        if abs(a - b) > TOP1_TOLERANCE:
            raise ExportCheckError(f"the exported weights reach top-1 {a:.4f} but the student in '{args.checkpoint}' "
                                   f"{b:.4f} on {args.validate_data} (more than {TOP1_TOLERANCE} points apart); "
                                   f"'{target}' was not written")

    if output:
        _write(state, output, settings, check if args.validate_data else None)
        _logger.info(f"Wrote '{output}' ({len(state)} tensors). Load it with timm.create_model('{name}', "
                     f"pretrained=True, pretrained_cfg_overlay=dict(file='{output}', num_classes={num_classes}), "
                     f"num_classes={num_classes}{create_args})")
    if args.hub_dir or args.push_to_hub:  # timm's hub layout, preprocessing as the run resolved it
        data_config = resolve_data_config({k: settings.get(k) for k in DATA_KEYS}, model=model)
        identity = {} if args.from_official else hub.run_identity(args.checkpoint, run_args)
        epoch = f", epoch {ckpt['epoch']} (counted from 0)" if isinstance(ckpt.get('epoch'), int) else ''
        weights = f"{'EMA student' if use_ema else 'student'} of {os.path.basename(args.checkpoint)}{epoch}"

        def card(source):
            top1 = dict(results['export'], data_dir=args.validate_data) if results else None
            return hub.model_card(model, data_config, run_args, identity, weights, source, top1)

        late_check = (lambda p: check(p, args.hub_dir)) if args.validate_data and not results else None
        if args.hub_dir:
            hub.write_hub_dir(model, args.hub_dir, data_config, lambda: card(f'local-dir:{args.hub_dir}'), late_check)
            needs = ' after `import models`' if hub.needs_project_models(model.pretrained_cfg['architecture']) else ''
            _logger.info(f"Wrote the hub folder '{args.hub_dir}' ({', '.join(hub.HUB_FILES)}). Load it with "
                         f"timm.create_model('local-dir:{args.hub_dir}', pretrained=True){needs}")
        elif late_check is not None:  # push only: validate a temporary copy of the weights first
            with tempfile.TemporaryDirectory() as d:
                _write(state, os.path.join(d, 'student.safetensors'), settings, lambda p: check(p, args.push_to_hub))
        if args.push_to_hub:
            hub.push(model, args.push_to_hub, card(f'hf-hub:{args.push_to_hub}'), data_config, args.hub_revision,
                     args.hub_private)
            _logger.info(f"Pushed the student to the hub repository '{args.push_to_hub}'")
    if args.onnx:  # kept only when onnxruntime's logits match the student's
        results['onnx'] = export_onnx(model, args.onnx, resolve_data_config(
            {k: settings.get(k) for k in DATA_KEYS}, model=model), args)
    return dict(output=output, hub_dir=args.hub_dir, model=name, num_classes=num_classes, ema=use_ema, **results)


def main(argv=None) -> int:
    utils.setup_default_logging()
    try:
        export_main(argv)
    except FatalError as e:
        log_startup_error(_logger, e)
        return e.exit_code
    return 0


if __name__ == '__main__':
    sys.exit(main())
