#!/usr/bin/env python3
"""How much do images without labels give? KD and ScaleKD on Fashion-MNIST with few labels, on a CPU.

The demo teacher (scalekd_demo_vit, recipes/demo_fmnist_teacher.yaml) trains on all 60k training images. The
students (scalekd_demo_resnet, recipes/demo_fmnist.yaml) see a pool of 1,000 of those training images (100 per
class) four ways, each with the same number of updates (1,000 images per epoch):

  (a) only L labelled images per class (the L x 10 images repeated to 1,000 per epoch)
  (b) the same L per class with labels, plus the rest of the pool (1,000 - 10 L) as --unlabeled-data
  (c) the whole pool without labels (--labels none: the teacher alone)
  (d) the whole pool with labels

for --distiller kd and scalekd, seeds 0, 1, 2. Reported: top-1 on 100 images per class of the Fashion-MNIST test
set (never used to choose anything here: every setting is the recipes', fixed before this experiment).

    python experiments/unlabeled_fmnist.py --out experiments/results/unlabeled_fmnist
"""
import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ('a', 'b', 'c', 'd')
CASE_NAMES = {'a': 'L labelled per class', 'b': 'L labelled + the rest unlabeled', 'c': 'all, no labels',
              'd': 'all, labelled'}


def sh(cmd, log):
    with open(log, 'w') as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f'failed (exit {rc}): {" ".join(cmd)}; see {log}')


def last_row(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))[-1]


def finished(run_dir, epochs):
    """The run trained every epoch and validated the last."""
    try:
        with open(os.path.join(run_dir, 'summary.csv')) as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return False
    return len(rows) == epochs and bool(rows[-1].get('eval_top1'))


def build_cases(pool, out, per_class_labelled):
    """The case folders from the pool's train split: (a) L per class repeated to the pool's size, (b) the same
    labelled folders and the rest of the pool in one flat folder, (c)/(d) the pool itself."""
    a, unl = os.path.join(out, 'a'), os.path.join(out, 'unlabeled')
    if os.path.isdir(a):
        return a, unl
    classes = sorted(os.listdir(os.path.join(pool, 'train')))
    total = sum(len(os.listdir(os.path.join(pool, 'train', c))) for c in classes)
    repeat = total // (per_class_labelled * len(classes))
    os.makedirs(unl)
    for c in classes:
        files = sorted(os.listdir(os.path.join(pool, 'train', c)))
        dst = os.path.join(a + '.tmp', 'train', c)
        os.makedirs(dst)
        for f in files[:per_class_labelled]:
            for r in range(repeat):
                shutil.copy(os.path.join(pool, 'train', c, f), os.path.join(dst, f'r{r}_{f}'))
        for f in files[per_class_labelled:]:  # without its class folder: nothing to read a label from
            shutil.copy(os.path.join(pool, 'train', c, f), os.path.join(unl, f'{c}_{f}'))
    os.symlink(os.path.join(pool, 'validation'), os.path.join(a + '.tmp', 'validation'))
    b = os.path.join(out, 'b')  # L per class, not repeated: the unlabeled images fill the epoch
    os.makedirs(os.path.join(b, 'train'))
    for c in classes:
        files = sorted(os.listdir(os.path.join(pool, 'train', c)))[:per_class_labelled]
        os.makedirs(os.path.join(b, 'train', c))
        for f in files:
            shutil.copy(os.path.join(pool, 'train', c, f), os.path.join(b, 'train', c, f))
    os.symlink(os.path.join(pool, 'validation'), os.path.join(b, 'validation'))
    os.rename(a + '.tmp', a)
    return a, unl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='experiments/results/unlabeled_fmnist')
    p.add_argument('--src', default='/usr/share/datasets/fashion-mnist')
    p.add_argument('--labelled-per-class', type=int, default=10)
    p.add_argument('--pool-per-class', type=int, default=100)
    p.add_argument('--val-per-class', type=int, default=100)
    p.add_argument('--teacher-epochs', type=int, default=2)
    p.add_argument('--student-epochs', type=int, default=15)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--distillers', nargs='+', default=['kd', 'scalekd'])
    p.add_argument('--workers', type=int, default=2)
    args = p.parse_args(argv)
    py, out = sys.executable, os.path.abspath(args.out)
    work = os.path.join(out, 'runs')
    os.makedirs(work, exist_ok=True)
    start = time.time()
    data = {}
    for name, per_class in (('teacher', None), ('pool', args.pool_per_class)):
        d = os.path.join(work, 'data', name)
        if not os.path.isdir(d):
            cmd = [py, 'tools/prepare_fashion_mnist.py', '--src', args.src, '--out', d,
                   '--val-per-class', str(args.val_per_class)]
            cmd += ['--train-per-class', str(per_class), '--seed', '0'] if per_class else []
            subprocess.check_call(cmd, cwd=ROOT)
        data[name] = d
    case_a, unlabeled = build_cases(data['pool'], os.path.join(work, 'data'), args.labelled_per_class)
    case_b = os.path.join(work, 'data', 'b')
    common = ['--output', work, '--workers', str(args.workers), '--no-plot']
    teacher_dir = os.path.join(work, 'teacher')
    if not os.path.isfile(os.path.join(teacher_dir, 'last.pth.tar')):
        sh([py, 'train_kd.py', '--config', 'recipes/demo_fmnist_teacher.yaml', '--data-dir', data['teacher'],
            '--experiment', 'teacher', '--epochs', str(args.teacher_epochs)] + common, os.path.join(out, 'teacher.log'))
    teacher_top1 = float(last_row(teacher_dir)['eval_top1'])
    cases = {
        'a': ['--data-dir', case_a],
        'b': ['--data-dir', case_b, '--unlabeled-data', unlabeled],
        'c': ['--data-dir', data['pool'], '--labels', 'none'],
        'd': ['--data-dir', data['pool']],
    }
    results = {}
    for distiller in args.distillers:
        for case in CASES:
            for seed in args.seeds:
                exp = f'{distiller}-{case}-s{seed}'
                run_dir = os.path.join(work, exp)
                if not finished(run_dir, args.student_epochs):
                    if os.path.isdir(run_dir):
                        shutil.rmtree(run_dir)
                    sh([py, 'train_kd.py', '--config', 'recipes/demo_fmnist.yaml', *cases[case], '--distiller', distiller,
                        '--teacher-checkpoint', teacher_dir, '--seed', str(seed), '--experiment', exp,
                        '--epochs', str(args.student_epochs), '--val-interval', str(args.student_epochs)] + common,
                       os.path.join(out, f'{exp}.log'))
                row = last_row(run_dir)
                results.setdefault(distiller, {}).setdefault(case, []).append(
                    {'seed': seed, 'top1': float(row['eval_top1']), 'agree_top1': float(row['eval_agree_top1'])})
                print(exp, results[distiller][case][-1], flush=True)
    summary = {
        'teacher': {'model': 'scalekd_demo_vit', 'top1': teacher_top1, 'epochs': args.teacher_epochs,
                    'train_images': '60,000 (all)'},
        'settings': {'labelled_per_class': args.labelled_per_class, 'pool_per_class': args.pool_per_class,
                     'val_per_class': args.val_per_class, 'student_epochs': args.student_epochs, 'seeds': args.seeds,
                     'student': 'scalekd_demo_resnet', 'recipe': 'recipes/demo_fmnist.yaml',
                     'reported_on': 'Fashion-MNIST test images (validation/), not used to choose any setting'},
        'results': results, 'wall_seconds': time.time() - start,
    }
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    lines = [f'Teacher top-1 {teacher_top1:.2f}. Student top-1 on {args.val_per_class * 10} test images, mean +- std '
             f'over seeds {args.seeds} (each seed listed):', '',
             '| distiller | ' + ' | '.join(f'({c}) {CASE_NAMES[c]}' for c in CASES) + ' |',
             '| --- |' + ' ---: |' * len(CASES)]
    for distiller, by_case in results.items():
        cells = []
        for c in CASES:
            top1 = [r['top1'] for r in by_case[c]]
            sd = statistics.stdev(top1) if len(top1) > 1 else 0.
            cells.append(f'{statistics.mean(top1):.2f} +- {sd:.2f} ({", ".join(f"{t:.2f}" for t in top1)})')
        lines.append(f'| {distiller} | ' + ' | '.join(cells) + ' |')
    with open(os.path.join(out, 'table.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
