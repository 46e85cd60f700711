#!/usr/bin/env python3
"""Validate a trained student, its EMA, an exported file, a teacher, or a student next to its teacher; flags keep
timm's validate.py names.

Model and preprocessing come, in this order, from the command line, a recipe (``--config``), the
checkpoint (the ``args`` of a training checkpoint, the metadata of an exported ``.safetensors``)
and the model's pretrained_cfg. Checkpoints are read weights-only; a pickle that needs other
globals is refused. Bad input stops with one message and exit code 2.

    python validate.py --data-dir DATA --checkpoint RUN/model_best.pth.tar --use-ema
    python validate.py --data-dir DATA --config recipes/demo_fmnist.yaml --checkpoint student.safetensors
    python validate.py --data-dir DATA --teacher scalekd_demo_vit --teacher-checkpoint TEACHER/last.pth.tar
    python validate.py --data-dir DATA --checkpoint RUN/model_best.pth.tar --teacher NAME --teacher-checkpoint PATH
"""
import argparse
import csv
import json
import logging
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from timm import utils
from timm.data import RealLabelsImagenet, create_dataset, create_loader, resolve_data_config
from timm.models import create_model, get_pretrained_cfg_value

import models  # noqa: F401  registers the demo / paper student variants
from config import SETTING_KEYS, RecipeError, coerce_value, read_recipe, run_settings
from distillers import TeacherLoadError, create_teacher
from distillers.teacher import check_model_name, teacher_head
from distillers.base import DistillTask, TeacherOnStudentInput
from distillers.flags import teacher_size
from runtime.checkpoint import load_strict, read_checkpoint
from runtime.timm_flags import plain_student_state
from runtime.data import check_bad_images, check_data_dir
from runtime.errors import FatalError, log_startup_error, short
from runtime.preflight import check_numeric_flags, check_output_file

_logger = logging.getLogger('validate')

STRICT_HINT = 'Pass the --model, --model-kwargs and --num-classes it was trained with (or --config)'
DATA_KEYS = ('img_size', 'input_size', 'in_chans', 'crop_pct', 'crop_mode', 'mean', 'std', 'interpolation')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Validate a ScaleKD student, exported file or teacher (timm-style)')
    p.add_argument('-c', '--config', default='', metavar='FILE',
                   help='recipe YAML of the run: model, model_kwargs, num_classes, sizes, mean/std are taken from it')
    p.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    p.add_argument('--dataset', default='', metavar='NAME', help='dataset type + name (default: ImageFolder)')
    p.add_argument('--split', default='validation', metavar='NAME', help='dataset split (default: validation)')
    p.add_argument('--class-map', default='', metavar='FILENAME', help='path to class to idx mapping file')
    p.add_argument('--model', '-m', default=None, metavar='NAME', help='model name (default: from the checkpoint)')
    p.add_argument('--model-kwargs', nargs='*', default=None, action=utils.ParseKwargs, help='extra model kwargs')
    p.add_argument('--num-classes', type=int, default=None, help='number of classes (default: from the checkpoint)')
    p.add_argument('--gp', default=None, metavar='POOL', help='global pool type (default: model default)')
    p.add_argument('--checkpoint', default='', metavar='PATH',
                   help='training checkpoint, exported .safetensors/.pth or plain timm checkpoint')
    p.add_argument('--use-ema', action='store_true', default=False, help='use the EMA student (state_dict_ema)')
    p.add_argument('--teacher', default='', metavar='NAME',
                   help='evaluate this teacher instead (hub weights, or --teacher-checkpoint), normalised with its '
                        'own pretrained_cfg mean/std; with --checkpoint, evaluate the student and this teacher on the '
                        "student's batches (the teacher's input re-normalised and resized as in training, its "
                        "teacher_kwargs / teacher_img_size from the run's args) and report both top-1, their top-1 "
                        'agreement and the mean KL(teacher || student) (softmax at T=1, nats)')
    p.add_argument('--teacher-checkpoint', default='', metavar='PATH', help='teacher weights from a local file')
    p.add_argument('--teacher-kwargs', nargs='*', default=None, action=utils.ParseKwargs,
                   help='extra teacher model kwargs')
    p.add_argument('--teacher-img-size', type=int, default=None, metavar='N',
                   help='build the teacher for this input size (as train_kd.py; same as --teacher-kwargs img_size=N)')
    p.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='data loading workers (default: 4)')
    p.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
    p.add_argument('--img-size', default=None, type=int, metavar='N', help='input image size')
    p.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N', help='input dims (d h w)')
    p.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels')
    p.add_argument('--use-train-size', action='store_true', default=False,
                   help="use the model's train input size even if a test size is set (always for a run's checkpoint)")
    p.add_argument('--crop-pct', default=None, type=float, metavar='N', help='input image center crop pct')
    p.add_argument('--crop-mode', default=None, type=str, metavar='N', help='input image crop mode')
    p.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override dataset mean')
    p.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override dataset std')
    p.add_argument('--interpolation', default=None, type=str, metavar='NAME', help='resize interpolation type')
    p.add_argument('--log-freq', default=10, type=int, metavar='N', help='batch logging frequency (default: 10)')
    p.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
    p.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in DataLoader')
    p.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='device (default: cuda)')
    p.add_argument('--amp', action='store_true', default=False, help='use mixed precision (autocast)')
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype')
    p.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile the model with this backend')
    p.add_argument('--real-labels', default='', metavar='FILENAME', help='ImageNet ReaL labels JSON file')
    p.add_argument('--results-file', default='', metavar='FILENAME', help='write the results to this file')
    p.add_argument('--results-format', default='csv', choices=('csv', 'json'), help='results file format')
    return p


def _recipe_settings(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The recipe's values for keys this script has a flag for; the others belong to training and are ignored."""
    actions = {a.dest: a for a in parser._actions}
    try:
        recipe = read_recipe(path)
        out = {}
        for key, (where, value) in recipe.items():
            if key in SETTING_KEYS or key == 'teacher_kwargs':
                try:
                    out[key] = coerce_value(value, actions[key])
                except (TypeError, ValueError):
                    raise RecipeError(f"recipe '{path}': key '{key}' in {where} has a wrong value {value!r}") from None
        return out
    except RecipeError as e:
        raise FatalError(str(e)) from None


def _infer_num_classes(model_name: str, state: dict) -> Optional[int]:
    classifier = get_pretrained_cfg_value(model_name, 'classifier')
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    weight = state.get(f'{classifier}.weight') if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _build_student(args, settings: Dict[str, Any]) -> Tuple[nn.Module, str, bool, Dict[str, Any]]:
    state, weights, run_args = None, 'pretrained', {}
    if args.checkpoint:
        state, run_args, weights = read_checkpoint(args.checkpoint, args.use_ema)
        ck = run_settings(run_args)
        if args.model and ck.get('model') and ck['model'] != args.model:
            _logger.warning(f"checkpoint was trained as {ck['model']}, evaluated as {args.model}; its settings unused")
            ck = {}
        settings = dict(ck, **settings)
    for k, v in settings.items():  # below the command line and the recipe
        if k == 'model_kwargs' and args.model_kwargs:
            args.model_kwargs = dict(v, **args.model_kwargs)
        elif getattr(args, k, None) in (None, {}):
            setattr(args, k, v)
    if not args.model:
        raise FatalError('no model to validate: pass --model NAME (or --config RECIPE, or a training checkpoint)')
    problem = check_model_name(args.model, '--model')
    if problem:
        raise FatalError(problem)
    if args.num_classes is None and state is not None:
        args.num_classes = _infer_num_classes(args.model, state)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    model = create_model(args.model, pretrained=state is None, num_classes=args.num_classes, in_chans=in_chans,
                         global_pool=args.gp, bn_eps=getattr(args, 'bn_eps', None), **(args.model_kwargs or {}))
    if state is not None:
        state = plain_student_state(state)  # a --split-bn run's per-split BN statistics are training-only
        load_strict(model, state, args.checkpoint, f'--model {args.model} (num_classes={model.num_classes}, '
                                                    f'model_kwargs={args.model_kwargs or {}})', STRICT_HINT)
    _logger.info(f"Model {args.model} created from '{args.checkpoint or 'pretrained weights'}' ({weights})")
    return model, weights, bool(settings), run_args or {}


def _build_teacher(args, settings: Dict[str, Any], student: Optional[nn.Module] = None,
                   run_args: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Optional[int]]:
    """(teacher, the size it is built for). Alone, it sets the data size; next to ``student`` (compare mode) it takes
    the student's class count and the run's teacher_kwargs / teacher_img_size (when the run had this teacher)."""
    run_args = run_args or {}
    if student is not None and run_args.get('teacher') not in (None, '', args.teacher):
        _logger.warning(f"the run was distilled from {run_args['teacher']}, compared here with {args.teacher}")
        run_args = {}
    num_classes = student.num_classes if student is not None else args.num_classes or settings.get('num_classes')
    if num_classes is None:  # the head the teacher's weights come with (a file, a run folder, hub or local-dir:)
        try:
            num_classes = teacher_head(args.teacher, args.teacher_checkpoint or None)[0]
        except TeacherLoadError as e:
            raise FatalError(str(e)) from None
    num_classes = num_classes or get_pretrained_cfg_value(args.teacher, 'num_classes') or 1000
    kwargs = dict(run_args.get('teacher_kwargs') or {}, **(settings.get('teacher_kwargs') or {}),
                  **(args.teacher_kwargs or {}))
    # --teacher-img-size or --teacher-kwargs img_size= (or the run's)
    size = teacher_size(args.teacher_img_size or run_args.get('teacher_img_size'), kwargs)
    if student is None:
        args.num_classes = num_classes
        if size and args.img_size is None and args.input_size is None:
            args.img_size = size  # the teacher's pretrained_cfg may name another size than it is built for
    try:
        return create_teacher(args.teacher, num_classes=num_classes, in_chans=args.in_chans or 3,
                              checkpoint=args.teacher_checkpoint or None, img_size=size, **kwargs), size
    except TeacherLoadError as e:
        raise FatalError(str(e)) from None
    except Exception as e:  # hub weights unavailable (offline) or bad kwargs
        raise FatalError(f"teacher '{args.teacher}' cannot be created ({short(e)}); pass --teacher-checkpoint "
                         f"PATH for local weights") from None


def validate_main(argv=None, settings: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run a validation and return its results. ``settings`` stand in for a checkpoint's run settings."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.prefetcher = not args.no_prefetcher
    check_numeric_flags(args)
    if args.results_file:
        check_output_file(args.results_file, '--results-file')
    recipe = _recipe_settings(args.config, parser) if args.config else {}
    if args.teacher and not args.checkpoint:  # the recipe's student settings do not describe the teacher alone
        recipe = {k: v for k, v in recipe.items() if k in ('num_classes', 'teacher_kwargs')}
    if not args.dataset:
        check_data_dir(args.data_dir, (args.split,))
    try:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map)
    except Exception as e:  # no images, bad class map
        raise FatalError(f"cannot read split '{args.split}' of '{args.data_dir}' ({short(e)})") from None
    data_classes = len(getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or {}) or None

    for k, v in recipe.items():  # the command line wins over the recipe
        if k != 'teacher_kwargs' and getattr(args, k) in (None, {}):
            setattr(args, k, v)
    teacher = None
    if args.teacher and not args.checkpoint:
        model, name, weights = _build_teacher(args, recipe)[0], args.teacher, args.teacher_checkpoint or 'pretrained'
        from_run = False
    else:
        model, weights, from_run, run_args = _build_student(args, settings or {})
        name = args.model
        if args.teacher:  # compare mode: the teacher on the student's batches, as in training
            teacher = _build_teacher(args, recipe, model, run_args)
    if data_classes and model.num_classes != data_classes and not args.real_labels:
        raise FatalError(f"model {name} has {model.num_classes} classes but {args.data_dir}/{args.split} has "
                         f"{data_classes} class folders; pass the matching --num-classes/--checkpoint or data")
    param_count = sum(p.numel() for p in model.parameters())
    _logger.info(f'Model {name}: {param_count / 1e6:.2f} M params')

    # a run's checkpoint is validated as the run validated it (train size); others as timm does (test size)
    data_config = resolve_data_config({k: getattr(args, k) for k in DATA_KEYS}, model=model,
                                      use_test_size=not (args.use_train_size or from_run or recipe))
    device = torch.device(args.device)
    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    if teacher is not None:
        teacher = _TeacherComparison(model, *teacher, data_config, device)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, use_prefetcher=args.prefetcher,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'],
        pin_memory=args.pin_mem, device=device)
    real_labels = None
    if args.real_labels:
        try:
            real_labels = RealLabelsImagenet(dataset.filenames(basename=True), real_json=args.real_labels)
        except (AssertionError, OSError, ValueError) as e:
            raise FatalError(f"--real-labels '{args.real_labels}' does not fit {args.data_dir}/{args.split} "
                             f"({short(e)}); it needs the 50,000-image ImageNet validation set") from None
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else suppress

    top1, top5, losses, batch_time = (utils.AverageMeter() for _ in range(4))
    loss_fn = nn.CrossEntropyLoss()
    start = end = time.time()
    with torch.inference_mode():
        for batch_idx, (input, target) in enumerate(loader):
            output, input, target = forward_batch(model, input, target, args, device, amp_autocast)
            output = output.float()
            if real_labels is not None:
                real_labels.add_result(output)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, output.shape[-1])))
            n = input.shape[0]
            losses.update(loss_fn(output, target).item(), n)
            top1.update(acc1.item(), n)
            top5.update(acc5.item(), n)
            if teacher is not None:
                teacher.add(output, input, target, args, device, amp_autocast)
            batch_time.update(time.time() - end)
            end = time.time()
            if batch_idx % args.log_freq == 0 or batch_idx == len(loader) - 1:
                eta = time.strftime('%H:%M:%S', time.gmtime(batch_time.avg * (len(loader) - batch_idx - 1)))
                _logger.info(f'Test: [{batch_idx:>4d}/{len(loader)}]  Time: {batch_time.val:.3f}s '
                             f'({n / max(batch_time.val, 1e-9):>7.2f}/s)  Loss: {losses.avg:>7.4f}  '
                             f'Acc@1: {top1.avg:>7.3f}  Acc@5: {top5.avg:>7.3f}  ETA {eta}')
    elapsed = time.time() - start
    t1, t5 = (real_labels.get_accuracy(k=1), real_labels.get_accuracy(k=5)) if real_labels else (top1.avg, top5.avg)
    results = OrderedDict(
        model=name, checkpoint=args.checkpoint or args.teacher_checkpoint, weights=weights,
        top1=round(t1, 4), top1_err=round(100 - t1, 4), top5=round(t5, 4), top5_err=round(100 - t5, 4),
        loss=round(losses.avg, 6), img_per_s=round(top1.count / max(elapsed, 1e-9), 2),
        param_count=round(param_count / 1e6, 4), num_images=top1.count, img_size=data_config['input_size'][-1],
        crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'])
    _logger.info(f" * Acc@1 {results['top1']:.3f} ({results['top1_err']:.3f})  Acc@5 {results['top5']:.3f} "
                 f"({results['top5_err']:.3f})  Loss {results['loss']:.4f}  {results['img_per_s']:.1f} img/s  "
                 f"{results['param_count']:.2f} M params")
    if teacher is not None:
        results.update(teacher.results(args))
    if args.results_file:
        _write_results(args.results_file, results, args.results_format)
    return results


class _TeacherComparison:
    """validate.py --teacher NAME --checkpoint RUN: the teacher on the student's batches (re-normalised from the
    student's mean/std to its own, resized to the size it is built for, as in training), its accuracy and the
    student-teacher top-1 agreement and KL(teacher || student) summed over the images."""

    def __init__(self, student, teacher, size, data_config, device):
        task = DistillTask(student, teacher, mean=data_config['mean'], std=data_config['std'],
                           teacher_img_size=(size, size) if size else None, device=device)
        self.model = TeacherOnStudentInput(task).to(device).eval()
        self.sums = torch.zeros(6, dtype=torch.float64)  # loss, top1, top5, n, agree, kl

    def add(self, output, input, target, args, device, amp_autocast):
        t_out = forward_batch(self.model, input, target, args, device, amp_autocast)[0].float()
        acc1, acc5 = utils.accuracy(t_out, target, topk=(1, min(5, t_out.shape[-1])))
        n = input.shape[0]
        self.sums += torch.cat([torch.stack([F.cross_entropy(t_out, target) * n, acc1 * n, acc5 * n,
                                             torch.tensor(float(n), device=t_out.device)]).double(),
                                agreement(output, t_out)]).cpu()

    def results(self, args) -> Dict[str, Any]:
        loss, t1, t5, n, agree, kl = self.sums.tolist()
        n = max(n, 1)
        out = OrderedDict(teacher=args.teacher, teacher_checkpoint=args.teacher_checkpoint or 'pretrained',
                          teacher_top1=round(t1 / n, 4), teacher_top5=round(t5 / n, 4), teacher_loss=round(loss / n, 6),
                          agree_top1=round(100. * agree / n, 4), kl_teacher=round(kl / n, 6))
        _logger.info(f" * Teacher {args.teacher}: Acc@1 {out['teacher_top1']:.3f}  Acc@5 {out['teacher_top5']:.3f}  "
                     f"Loss {out['teacher_loss']:.4f}  |  top-1 agreement with the student {out['agree_top1']:.3f}%  "
                     f"KL(teacher || student) {out['kl_teacher']:.4f} nats (softmax at T=1, mean over images)")
        return out


def forward_batch(model, input, target, args, device, amp_autocast=suppress):
    """(output, input, target) of one eval batch: on the device (unless the prefetcher put it there),
    channels_last when asked, the model's first output under autocast."""
    if not args.prefetcher:
        input, target = input.to(device), target.to(device)
    if args.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    with amp_autocast():
        output = model(input)
        if isinstance(output, (tuple, list)):
            output = output[0]
    return output, input, target


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[images whose student and teacher argmax agree, sum over images of KL(p_t || p_s)] of one batch, in float64;
    p = softmax of the logits at temperature 1, natural log (KL in nats)."""
    s, t = student_logits.float(), teacher_logits.float()
    log_p_s, log_p_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return torch.stack([(s.argmax(-1) == t.argmax(-1)).sum().double(), kl.double()])


def _task_models(task, args):
    """{column prefix: model} of a run's epoch-end validation (the student, its EMA when validated) and the
    teacher on the student's batch (None without a teacher)."""
    models = OrderedDict([('', task.get_eval_model())])
    if task.has_ema() and not args.model_ema_force_cpu:
        models['ema_'] = task.get_eval_model(ema=True)
    teacher = TeacherOnStudentInput(task) if getattr(task, 'teacher', None) is not None else None
    if teacher is not None and getattr(utils.unwrap_model(task.teacher.model), 'num_classes', None) != \
            getattr(utils.unwrap_model(task.get_eval_model()), 'num_classes', None):
        teacher = None  # a teacher head for other classes (--teacher-features-only): no agreement to report
    return models, teacher


def eval_columns(task, args):
    """The eval columns of a run's summary.csv (without the ``eval_`` prefix), in the order validate_task returns."""
    models, teacher = _task_models(task, args)
    names = (('loss', 'top1', 'top5') if getattr(args, 'val_labelled', True) else ()) + \
        (('agree_top1', 'kl_teacher') if teacher is not None else ())
    return [p + k for p in models for k in names]


def validate_task(task, loader, args, device, amp_autocast=suppress, logger=_logger):
    """train_kd.py's epoch-end validation: the student, plus ``ema_*`` of its EMA, and with a teacher their top-1
    agreement with it and KL(teacher || student); one pass over ``loader``, one teacher forward per batch."""
    models, teacher = _task_models(task, args)
    if 'ema_' in models and args.distributed and args.dist_bn in ('broadcast', 'reduce'):
        utils.distribute_bn(task.get_trainable_module(ema=True), args.world_size, args.dist_bn == 'reduce')
    return _evaluate_models(models, loader, args, device, amp_autocast, teacher=teacher, logger=logger,
                            suffixes={'ema_': ' (EMA)'})


def evaluate(model, loader, args, device, amp_autocast=suppress, log_suffix='', max_batches=None, logger=_logger,
             teacher=None):
    """Top-1 / top-5 / loss of ``model`` on ``loader``, reduced over ranks; with ``teacher`` (a model of the same
    batch) also ``agree_top1`` (% of images where the argmax agree) and ``kl_teacher`` (mean KL(teacher || model))."""
    return _evaluate_models({'': model}, loader, args, device, amp_autocast, max_batches=max_batches, logger=logger,
                            teacher=teacher, suffixes={'': log_suffix})


@torch.no_grad()
def _evaluate_models(models, loader, args, device, amp_autocast=suppress, max_batches=None, logger=_logger,
                     teacher=None, suffixes=None):
    """Metrics of every model of ``models`` ({column prefix: model}) in one pass over ``loader``, prefixed."""
    loss_fn = nn.CrossEntropyLoss().to(device)
    labelled = getattr(args, 'val_labelled', True)  # a validation split without labels: agreement and KL only
    if not labelled and teacher is None:
        raise FatalError('the validation split has no labels and there is no teacher to compare with; give it class '
                         'folders, or pass --val-split \'\'')
    nets = list(models.values()) + ([teacher] if teacher is not None else [])
    was_training = [m.training for m in nets]
    for m in nets:
        m.eval()
    sums = torch.zeros(len(models), 6, device=device, dtype=torch.float64)  # loss, top1, top5, n, agree, kl
    start = time.time()
    for batch_idx, (input, target) in enumerate(loader):
        if max_batches is not None and batch_idx >= max_batches:
            break
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
        t_out = forward_batch(teacher, input, target, args, device, amp_autocast)[0] if teacher is not None else None
        for i, model in enumerate(models.values()):
            output, input_i, target_i = forward_batch(model, input, target, args, device, amp_autocast)
            n = input_i.shape[0]
            if labelled:
                loss = loss_fn(output.float(), target_i)
                acc1, acc5 = utils.accuracy(output, target_i, topk=(1, min(5, output.shape[-1])))
                sums[i, :3] += torch.stack([loss * n, acc1 * n, acc5 * n]).double()
            sums[i, 3] += n
            if t_out is not None:
                sums[i, 4:] += agreement(output, t_out)
    if args.distributed:
        dist.all_reduce(sums)
    check_bad_images(loader, device)  # with several processes: --max-bad-images counts every rank's skips
    sums = sums.cpu()
    for m, was in zip(nets, was_training):
        m.train(was)
    metrics = OrderedDict()
    for (prefix, _), row in zip(models.items(), sums.tolist()):
        n = max(row[3], 1)
        if labelled:
            metrics.update([(f'{prefix}loss', row[0] / n), (f'{prefix}top1', row[1] / n),
                            (f'{prefix}top5', row[2] / n)])
        if teacher is not None:
            metrics.update([(f'{prefix}agree_top1', 100. * row[4] / n), (f'{prefix}kl_teacher', row[5] / n)])
        if utils.is_primary(args):
            extra = f'  Agree@1 (teacher): {100. * row[4] / n:.3f}  KL(teacher||student): {row[5] / n:.4f}' \
                if teacher is not None else ''
            scores = f'Loss: {row[0] / n:.4f}  Acc@1: {row[1] / n:.3f}  Acc@5: {row[2] / n:.3f}' if labelled else \
                'no labels:'
            logger.info(f'Test{(suffixes or {}).get(prefix, "")}: {scores}{extra}  ({int(n)} images, '
                        f'{time.time() - start:.1f}s)')
    return metrics


def check_teacher(task, loader_eval, args, device, amp_autocast=suppress, logger=_logger):
    """--teacher-min-top1: catch wrong weights, class counts, normalisation or data before step 0."""
    if loader_eval is None:
        raise FatalError('--teacher-min-top1 needs a validation split (--val-split)')
    if getattr(task, 'teacher', None) is None:
        raise FatalError('--teacher-min-top1 needs a teacher (--distiller kd or scalekd)')
    if not getattr(args, 'val_labelled', True):
        raise FatalError('--teacher-min-top1 needs labels: the validation split has no class folders')
    metrics = evaluate(TeacherOnStudentInput(task), loader_eval, args, device, amp_autocast, log_suffix=' (teacher)',
                       max_batches=args.teacher_check_batches, logger=logger)
    task.train()
    if metrics['top1'] < args.teacher_min_top1:
        raise FatalError(f"teacher '{args.teacher}' reaches top-1 {metrics['top1']:.2f} on the validation split, "
                         f"below --teacher-min-top1 {args.teacher_min_top1}: check the teacher weights and its "
                         f"class count, the normalisation (--mean/--std) and the data")


def _write_results(path: str, results: Dict[str, Any], fmt: str) -> None:
    with open(path, 'w') as f:
        if fmt == 'json':
            json.dump(results, f, indent=4)
        else:
            writer = csv.DictWriter(f, fieldnames=list(results))
            writer.writeheader()
            writer.writerow(results)


def main(argv=None) -> int:
    utils.setup_default_logging()
    try:
        results = validate_main(argv)
    except FatalError as e:
        log_startup_error(_logger, e)
        return e.exit_code
    print(f'--result\n{json.dumps(results, indent=4)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
