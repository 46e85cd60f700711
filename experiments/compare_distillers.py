#!/usr/bin/env python3
"""Every distiller of this project on the demo pair, at the same budget: none, kd, dist, feature, scalekd (and token).

The regime of experiments/small_repro.py: the demo ViT teacher (``scalekd_demo_vit``) knows all 60k Fashion-MNIST
training images, the students see 100 per class. The CNN student (``scalekd_demo_resnet``) trains with every
distiller of ``recipes/demo_fmnist.yaml``'s settings (SGD, 15 epochs, clipping 5, the recipe's ScaleKD weights);
only ``--distiller`` changes. ``token`` needs a ViT with a distillation token, so it runs on its own student (timm's
``deit_tiny_distilled_patch16_224`` built for 32 px: 4x4 patches, 4 blocks) with that student's own ``none``
baseline, same settings. Each distiller runs with its defaults (dist: the paper's ImageNet weights; feature and
token: timm's weights; token: hard), none tuned here. One seed (``--seeds`` for more).

Writes ``<out>/report.md`` and ``<out>/compare_distillers.json``; runs and data go under ``<out>/runs/``.

    python experiments/compare_distillers.py                                   # ~8 runs of ~2-3 min on 2 cores
    python experiments/compare_distillers.py --teacher-checkpoint T.pth.tar    # reuse a trained demo teacher
    python experiments/compare_distillers.py --quick --out /tmp/compare_quick   # smoke (tiny, 2 epochs)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from small_repro import finished, read_summary, sh  # the sibling script's run helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN = 'scalekd_demo_resnet'
VIT = 'deit_tiny_distilled_patch16_224'
VIT_FLAGS = ['--img-size', '32', '--crop-pct', '1.0', '--interpolation', 'bilinear', '--model-kwargs', 'img_size=32',
             'patch_size=4', 'depth=4']  # the demo data config (32 px, no crop, bilinear), as the CNN's
# (student, distiller, extra flags); the first of each student is its no-teacher baseline
PLAN = [(CNN, 'none', []), (CNN, 'kd', []), (CNN, 'dist', []), (CNN, 'feature', []), (CNN, 'scalekd', []),
        (VIT, 'none', VIT_FLAGS), (VIT, 'token', VIT_FLAGS + ['--token-distill-type', 'hard'])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join(ROOT, 'experiments', 'results', 'compare_distillers'))
    p.add_argument('--src', default='/usr/share/datasets/fashion-mnist')
    p.add_argument('--quick', action='store_true', help='tiny subsets, 2 student epochs, 1 teacher epoch (smoke)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--teacher-epochs', type=int, default=6)
    p.add_argument('--student-epochs', type=int, default=15)
    p.add_argument('--train-per-class', type=int, default=100)
    p.add_argument('--val-per-class', type=int, default=200)
    p.add_argument('--teacher-checkpoint', default='', help='a trained scalekd_demo_vit (default: train one)')
    p.add_argument('--skip-token', action='store_true', help='only the CNN student')
    p.add_argument('--workers', type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_epochs, args.student_epochs, args.train_per_class, args.val_per_class = 1, 2, 10, 10
    out = os.path.abspath(args.out)
    runs = os.path.join(out, 'runs')
    os.makedirs(runs, exist_ok=True)
    py = sys.executable
    start = time.time()

    data = {}
    for name, per_class in (('teacher', 30 if args.quick else None), ('student', args.train_per_class)):
        d = os.path.join(runs, 'data', f'{name}_{per_class or "all"}_val{args.val_per_class}')
        if not os.path.isdir(os.path.join(d, 'validation')):
            cmd = [py, 'tools/prepare_fashion_mnist.py', '--src', args.src, '--out', d, '--val-per-class',
                   str(args.val_per_class)] + (['--train-per-class', str(per_class)] if per_class else [])
            subprocess.check_call(cmd, cwd=ROOT)
        data[name] = d
    common = ['--output', runs, '-j', str(args.workers), '--log-interval', '50']

    if args.teacher_checkpoint:
        teacher_ckpt, teacher_top1 = os.path.abspath(args.teacher_checkpoint), None
    else:
        teacher_dir = os.path.join(runs, 'teacher')
        if not finished(teacher_dir, args.teacher_epochs):
            shutil.rmtree(teacher_dir, ignore_errors=True)
            sh([py, 'train_kd.py', '--config', 'recipes/demo_fmnist_teacher.yaml', '--data-dir', data['teacher'],
                '--experiment', 'teacher', '--epochs', str(args.teacher_epochs)] + common,
               os.path.join(runs, 'teacher.log'))
        teacher_ckpt = os.path.join(teacher_dir, 'last.pth.tar')
        teacher_top1 = read_summary(teacher_dir)[-1]['eval_top1']

    results = []
    for student, distiller, extra in PLAN:
        if args.skip_token and student == VIT:
            continue
        for seed in args.seeds:
            exp = f'{student}-{distiller}-s{seed}'
            run_dir = os.path.join(runs, exp)
            secs = None
            if not finished(run_dir, args.student_epochs):
                shutil.rmtree(run_dir, ignore_errors=True)
                teacher = ['--teacher-checkpoint', teacher_ckpt] if distiller != 'none' else ['--teacher', '']
                t = time.time()
                sh([py, 'train_kd.py', '--config', 'recipes/demo_fmnist.yaml', '--model', student, '--distiller',
                    distiller, '--data-dir', data['student'], '--experiment', exp, '--seed', str(seed), '--epochs',
                    str(args.student_epochs), '--val-interval', '1'] + teacher + common + extra,
                   os.path.join(runs, f'{exp}.log'))
                secs = time.time() - t
                print(f'{exp}: {secs:.0f} s', flush=True)
            rows = read_summary(run_dir)
            top1 = [r['eval_top1'] for r in rows if 'eval_top1' in r]
            last = rows[-1]
            results.append(dict(student=student, distiller=distiller, seed=seed, top1=top1[-1], best_top1=max(top1),
                                seconds=secs, img_per_s=last.get('train_img_per_s'),
                                terms={k[6:]: v for k, v in last.items() if k.startswith('train_loss')},
                                agreement={k: v for k, v in last.items() if 'agree' in k or 'kl' in k}))

    summary = dict(teacher=dict(model='scalekd_demo_vit', checkpoint=teacher_ckpt, top1=teacher_top1),
                   settings=dict(recipe='recipes/demo_fmnist.yaml', student_epochs=args.student_epochs,
                                 train_images_per_class=args.train_per_class, val_images_per_class=args.val_per_class,
                                 seeds=args.seeds, quick=args.quick),
                   runs=results, wall_seconds=time.time() - start)
    with open(os.path.join(out, 'compare_distillers.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    _report(summary, out)
    print(open(os.path.join(out, 'report.md')).read())


def _report(summary, out):
    s, t = summary['settings'], summary['teacher']
    teacher = f"top-1 {t['top1']:.2f}" if t['top1'] is not None else f"checkpoint `{t['checkpoint']}`"
    seeds = ('one seed, so differences of a point or two are within seed noise' if len(s['seeds']) == 1 else
             'mean over seeds')
    lines = ['# Every distiller on the demo pair, same budget (Fashion-MNIST, CPU)', '',
             f"Teacher `scalekd_demo_vit` ({teacher}). Students: {s['train_images_per_class']} training images per "
             f"class, {s['student_epochs']} epochs, the settings of `{s['recipe']}` with only `--distiller` (and, for "
             f"`token`, the student) changed; validation on {s['val_images_per_class']} images per class. "
             f"Seed(s) {s['seeds']}: {seeds} (experiments/results/report.md: a seed std of 0.1 to 1.0 points in "
             f"this regime). Each distiller runs with its default weights, none tuned here.", '',
             '| student | distiller | top-1 (last) | best top-1 | gain vs none (last) | loss terms at the last epoch '
             '(unweighted) | train s |', '|---|---|---:|---:|---:|---|---:|']
    by = {}
    for r in summary['runs']:
        by.setdefault((r['student'], r['distiller']), []).append(r)
    for (student, distiller), rs in by.items():
        last = statistics.mean(r['top1'] for r in rs)
        best = statistics.mean(r['best_top1'] for r in rs)
        base = statistics.mean(r['top1'] for r in by.get((student, 'none'), rs))
        terms = ', '.join(f'{k} {v:.3g}' for k, v in rs[0]['terms'].items())
        secs = [r['seconds'] for r in rs if r['seconds'] is not None]
        lines.append(f"| {student} | {distiller} | {last:.2f} | {best:.2f} | {last - base:+.2f} | {terms} | "
                     f"{statistics.mean(secs):.0f} |" if secs else
                     f"| {student} | {distiller} | {last:.2f} | {best:.2f} | {last - base:+.2f} | {terms} | - |")
    agree = [r for r in summary['runs'] if r['agreement']]
    if agree:
        lines += ['', 'Teacher agreement at the last evaluation:', '']
        lines += [f"- {r['student']} {r['distiller']}: " + ', '.join(f'{k} {v:.3g}' for k, v in r['agreement'].items())
                  for r in agree]
    quick = ' (quick mode: not a result)' if s['quick'] else ''
    lines += ['', f"Wall time {summary['wall_seconds'] / 60:.1f} min{quick}.", '']
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))


if __name__ == '__main__':
    main()
