#!/usr/bin/env python3
"""N students from one teacher: trained jointly (one teacher forward per batch, distillers.memo.TeacherMemo) vs one after
another (each step runs the teacher), side by side in one process at the same precision.

Builds N distillation tasks (``--distiller``, one for all or a comma list) around one teacher with random weights
(pretrained=False, nothing is downloaded) and times, on one fixed batch, round-robin (one of each per round, medians
over ``--steps`` rounds after ``--warmup``):

    solo      N full training steps (task forward, backward, optimizer step), one per student, each running the
              teacher: N students trained one after another
    joint     the same N steps with the teacher's forward computed once (what train_kd.py --model A,B,C does)
    teacher   the teacher's forward alone (no gradients), as a solo step runs it

and reports the aggregate images/s of both, ``speedup`` = joint / solo, the measured ``teacher_share`` of a solo
step (teacher / mean solo step) and the ``ideal`` speed-up ``1 / (1 - share * (N - 1) / N)`` that skipping N - 1 of
N teacher forwards allows.

    python benchmarks/multi_student.py --json multi.json                    # 3 logit-KD students on CPU
    python benchmarks/multi_student.py --model resnet50d --teacher swin_large_patch4_window7_224 \\
        --distiller scalekd,kd,dist --img-size 224 -b 64 --device cuda --amp
"""
import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch  # noqa: E402
import timm  # noqa: E402

import models  # noqa: E402,F401  registers the demo models
from distillers import build_task  # noqa: E402
from distillers.memo import TeacherMemo  # noqa: E402


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='resnet18', help='student architecture (one for all, or a comma list)')
    p.add_argument('--teacher', default='vit_base_patch16_224', help='teacher architecture')
    p.add_argument('--distiller', default='kd', help='one for all students, or a comma list (default: kd)')
    p.add_argument('-n', '--n-students', type=int, default=3)
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--num-classes', type=int, default=100)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--steps', type=int, default=10, help='timed rounds (default: 10)')
    p.add_argument('--warmup', type=int, default=2, help='untimed rounds (default: 2)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='bf16 autocast, the teacher held in bf16 (as train_kd.py)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch\'s)')
    p.add_argument('--json', default='', metavar='FILE', help='write the results as JSON')
    return p


def build(args, device):
    names = args.model.split(',')
    names = names * args.n_students if len(names) == 1 else names
    distillers = args.distiller.split(',')
    distillers = distillers * args.n_students if len(distillers) == 1 else distillers
    if len(names) != args.n_students or len(distillers) != args.n_students:
        raise SystemExit(f'--model / --distiller name {len(names)} / {len(distillers)} students, -n is '
                         f'{args.n_students}')
    torch.manual_seed(0)
    teacher = timm.create_model(args.teacher, num_classes=args.num_classes, img_size=args.img_size).eval()
    teacher.requires_grad_(False)
    runs = []
    for name, distiller in zip(names, distillers):
        student = timm.create_model(name, num_classes=args.num_classes)
        kw = dict(img_size=(args.img_size,) * 2) if distiller == 'scalekd' else {}
        task = build_task(distiller, student, teacher, device=device, **kw).to(device)
        if args.channels_last:
            task.to(memory_format=torch.channels_last)
        if args.amp:
            task.hold_teacher(torch.bfloat16)
        task.train()
        runs.append((task, torch.optim.SGD(task.get_trainable_module().parameters(), lr=1e-3, momentum=0.9)))
    return teacher, runs


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher, runs = build(args, device)
    memo = TeacherMemo(teacher)
    autocast = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16) if args.amp else nullcontext
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def step(task, opt):
        with autocast():
            loss = task(x, y)['loss']
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def solo():  # one after another: every step computes the teacher
        for task, opt in runs:
            with memo.batch():
                step(task, opt)

    def joint():  # one teacher forward for the batch
        with memo.batch():
            for task, opt in runs:
                step(task, opt)

    def teacher_only():
        task = runs[0][0]
        with torch.no_grad(), autocast():
            teacher(task.teacher_input(x))

    times = {'solo': [], 'joint': [], 'teacher': []}
    forwards = {'solo': 0, 'joint': 0, 'teacher': 0}  # teacher forwards run (counted by the memo)
    for i in range(args.warmup + args.steps):
        for name, fn in (('solo', solo), ('joint', joint), ('teacher', teacher_only)):
            runs_before = memo.runs
            sync()
            start = time.perf_counter()
            fn()
            sync()
            forwards[name] += memo.runs - runs_before
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    n, b = args.n_students, args.batch_size
    med = {k: statistics.median(v) for k, v in times.items()}
    share = med['teacher'] / (med['solo'] / n)
    result = dict(
        n_students=n, model=args.model, teacher=args.teacher, distiller=args.distiller, img_size=args.img_size,
        batch_size=b, device=str(device), amp=args.amp, threads=torch.get_num_threads(), steps=args.steps,
        solo_img_per_s=n * b / med['solo'], joint_img_per_s=n * b / med['joint'],
        solo_step_ms=1000 * med['solo'] / n, joint_round_ms=1000 * med['joint'], teacher_ms=1000 * med['teacher'],
        teacher_share=share, speedup=med['solo'] / med['joint'], ideal=1 / (1 - share * (n - 1) / n),
        teacher_forwards_per_round={k: v / (args.warmup + args.steps) for k, v in forwards.items()},
        torch=torch.__version__, timm=timm.__version__)
    print(f"{n} students ({args.model}, {args.distiller}) from {args.teacher} at {args.img_size} px, batch {b}, "
          f"{device}{' bf16' if args.amp else ' fp32'}, {torch.get_num_threads()} thread(s), median of {args.steps}:")
    print(f"  one after another: {result['solo_img_per_s']:8.1f} img/s  ({result['solo_step_ms']:.1f} ms per step, "
          f"teacher {result['teacher_ms']:.1f} ms = {100 * share:.1f}% of it)")
    print(f"  jointly:           {result['joint_img_per_s']:8.1f} img/s  ({result['joint_round_ms']:.1f} ms per "
          f"round of {n} steps)")
    print(f"  speedup {result['speedup']:.3f}x, ideal {result['ideal']:.3f}x "
          f"({100 * result['speedup'] / result['ideal']:.1f}% of ideal)")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
