#!/usr/bin/env python3
"""A small real reproduction: ScaleKD vs KD vs no distillation on Fashion-MNIST, on a CPU.

Regime (where distillation matters): the ViT teacher trains on the full 60k training images, the
students only on a 100-images-per-class subset (1,000 images), so the teacher knows much more
than the students' labels can teach them. Two student families (a small ResNet and a small
MLP-Mixer) train three ways with identical budgets and seeds: ``--distiller none``, ``kd`` and
``scalekd`` (recipes/demo_fmnist.yaml; only ``--distiller`` changes). Three seeds each.

Writes ``<out>/report.md``, ``<out>/top1_per_epoch.png``, ``<out>/scalekd_terms.png`` and
``experiments/results/small_repro.json`` (``--results``).

    python experiments/small_repro.py --out experiments/results          # full run (~1 h on 2 cores)
    python experiments/small_repro.py --quick --out /tmp/repro_quick       # CI smoke (1 seed, tiny)
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
METHODS = ('none', 'kd', 'scalekd')
STUDENTS = ('scalekd_demo_resnet', 'scalekd_demo_mixer')
# feature-weight candidates for every stage: (direct view, alternative view)
CANDIDATES = {'paper': (0.08, 0.06), 'recipe': (0.01, 0.0075)}
TUNING_NOTE = """
Tuning. The only knob chosen here is the ScaleKD feature weight pair (the same for both stages), between
two candidates fixed in advance: the paper's Swin-L weights (0.08, 0.06) and the demo recipe's
(0.01, 0.0075). The choice is made on a tuning split carved from the Fashion-MNIST *training* images
(disjoint from the students' 1,000 images); the table above is on the test split, which played no part in
it. Every other setting is `recipes/demo_fmnist.yaml` (SGD, gradient clipping 5); the teacher recipe and
the regime were fixed earlier from short runs of teachers and of none/KD students.
"""
TERMS = ('loss_cls', 'loss_kd', 'loss_s3', 'loss_s3_alt', 'loss_s4', 'loss_s4_alt')


def sh(cmd, log):
    with open(log, 'w') as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f'failed (exit {rc}): {" ".join(cmd)}; see {log}')


def read_summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return [{k: float(v) for k, v in r.items() if v not in ('', None)} for r in csv.DictReader(f)]


def finished(run_dir, epochs):
    """True when the run's summary has its last epoch, validated (a stopped run leaves checkpoints behind)."""
    if not os.path.isfile(os.path.join(run_dir, 'summary.csv')):
        return False
    rows = read_summary(run_dir)
    return bool(rows) and int(rows[-1]['epoch']) == epochs - 1 and 'eval_top1' in rows[-1]


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='experiments/results', help='folder for report.md, plots and runs')
    p.add_argument('--results', default=None, help='JSON path (default: experiments/results/small_repro.json, '
                                                   'or <out>/small_repro.json with --quick)')
    p.add_argument('--src', default='/usr/share/datasets/fashion-mnist')
    p.add_argument('--quick', action='store_true', help='1 seed, tiny subsets, 1-2 epochs (CI)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--teacher-epochs', type=int, default=6)
    p.add_argument('--student-epochs', type=int, default=15)
    p.add_argument('--train-per-class', type=int, default=100, help='student training images per class')
    p.add_argument('--teacher-per-class', type=int, default=None, help='teacher training images per class (all)')
    p.add_argument('--val-per-class', type=int, default=200)
    p.add_argument('--students', nargs='+', default=list(STUDENTS))
    p.add_argument('--tune-per-class', type=int, default=100,
                   help='tuning images per class, carved from the training images (0: no tuning, recipe weights)')
    p.add_argument('--tune-seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--tune-only', action='store_true', help='stop after the tuning runs (writes <out>/tuning.json)')
    p.add_argument('--teacher-checkpoint', default='', help='a trained scalekd_demo_vit (default: train one)')
    p.add_argument('--workers', type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.teacher_epochs, args.student_epochs = args.seeds[:1], 1, 2
        args.train_per_class, args.teacher_per_class, args.val_per_class = 10, 30, 10
        args.tune_per_class, args.tune_seeds = min(args.tune_per_class, 5), args.tune_seeds[:1]
    out = os.path.abspath(args.out)
    runs = os.path.join(out, 'runs')
    os.makedirs(runs, exist_ok=True)
    py = sys.executable
    start = time.time()

    # data: the teacher's split, the students' subset, one validation subset for all
    data = {}
    for name, per_class in (('teacher', args.teacher_per_class), ('student', args.train_per_class)):
        tune = args.tune_per_class if name == 'student' else 0
        d = os.path.join(out, 'data', f'{name}_{per_class or "all"}_val{args.val_per_class}_tune{tune}')
        if not os.path.isdir(os.path.join(d, 'validation')):
            cmd = [py, 'tools/prepare_fashion_mnist.py', '--src', args.src, '--out', d,
                   '--val-per-class', str(args.val_per_class)]
            if per_class:
                cmd += ['--train-per-class', str(per_class)]
            if tune:
                cmd += ['--tune-per-class', str(tune)]
            subprocess.check_call(cmd, cwd=ROOT)
        data[name] = d
    common = ['--output', runs, '-j', str(args.workers), '--log-interval', '50']

    teacher_dir = os.path.join(runs, 'teacher')
    t0 = time.time()
    if args.teacher_checkpoint:
        teacher_ckpt = os.path.abspath(args.teacher_checkpoint)
        sh([py, 'validate.py', '--model', 'scalekd_demo_vit', '--checkpoint', teacher_ckpt, '--data-dir',
            data['teacher'], '--num-classes', '10', '--results-file', os.path.join(out, 'teacher_eval.json'),
            '--results-format', 'json'], os.path.join(out, 'teacher_eval.log'))
        with open(os.path.join(out, 'teacher_eval.json')) as f:
            teacher_top1 = json.load(f)['top1']
    else:
        if not os.path.isfile(os.path.join(teacher_dir, 'last.pth.tar')):
            shutil.rmtree(teacher_dir, ignore_errors=True)  # a stopped run: start it again
            sh([py, 'train_kd.py', '--config', 'recipes/demo_fmnist_teacher.yaml', '--data-dir', data['teacher'],
                '--experiment', 'teacher', '--epochs', str(args.teacher_epochs)] + common,
               os.path.join(out, 'teacher.log'))
        teacher_top1 = read_summary(teacher_dir)[-1]['eval_top1']
        teacher_ckpt = os.path.join(teacher_dir, 'last.pth.tar')
    teacher_secs = time.time() - t0

    def run(student, method, seed, exp, *extra):
        run_dir = os.path.join(runs, exp)
        if not finished(run_dir, args.student_epochs):
            shutil.rmtree(run_dir, ignore_errors=True)  # a stopped run: start it again
            teacher = ['--teacher-checkpoint', teacher_ckpt] if method != 'none' else ['--teacher', '']
            t = time.time()
            sh([py, 'train_kd.py', '--config', 'recipes/demo_fmnist.yaml', '--model', student,
                '--distiller', method, '--data-dir', data['student'], '--experiment', exp, '--seed', str(seed),
                '--epochs', str(args.student_epochs)] + teacher + common + list(extra),
               os.path.join(out, f'{exp}.log'))
            print(f'{exp}: {time.time() - t:.0f} s', flush=True)
        return read_summary(run_dir)

    # tuning: each candidate weight pair on the tuning split carved from the training images
    tuning, chosen = {}, 'recipe'
    if args.tune_per_class:
        for name, alpha in CANDIDATES.items():
            flags = ['--scalekd-alpha-s3', *map(str, alpha), '--scalekd-alpha-s4', *map(str, alpha)]
            for student in args.students:
                for seed in args.tune_seeds:
                    rows = run(student, 'scalekd', seed, f'tune-{name}-{student}-s{seed}', *flags, '--val-split',
                               'tune', '--val-interval', str(args.student_epochs))
                    tuning.setdefault(name, {}).setdefault(student, []).append(rows[-1]['eval_top1'])
        score = {n: statistics.mean(x for v in by_student.values() for x in v) for n, by_student in tuning.items()}
        chosen = max(score, key=score.get)
    alpha = CANDIDATES[chosen]
    if args.tune_only:
        with open(os.path.join(out, 'tuning.json'), 'w') as f:
            json.dump({'candidates': {k: list(v) for k, v in CANDIDATES.items()}, 'tune_top1': tuning,
                       'chosen': chosen, 'tune_images_per_class': args.tune_per_class, 'tune_seeds': args.tune_seeds,
                       'student_epochs': args.student_epochs, 'teacher_checkpoint': teacher_ckpt,
                       'teacher_top1': teacher_top1}, f, indent=2)
        print(json.dumps(tuning, indent=1), '\nchosen:', chosen)
        return
    chosen_flags = ['--scalekd-alpha-s3', *map(str, alpha), '--scalekd-alpha-s4', *map(str, alpha)]

    results = {}
    for student in args.students:
        for method in METHODS:
            for seed in args.seeds:
                extra = chosen_flags if method == 'scalekd' else []
                suffix = f'-{chosen}' if method == 'scalekd' else ''
                results.setdefault(student, {}).setdefault(method, {})[seed] = run(
                    student, method, seed, f'{student}-{method}{suffix}-s{seed}', '--val-interval', '1', *extra)

    # aggregate
    summary = {'teacher': {'model': 'scalekd_demo_vit', 'top1': teacher_top1, 'epochs': args.teacher_epochs,
                           'train_images_per_class': args.teacher_per_class or 6000, 'train_seconds': teacher_secs},
               'settings': {'dataset': 'Fashion-MNIST (Debian dataset-fashion-mnist), 32 px RGB',
                            'student_train_images_per_class': args.train_per_class,
                            'val_images_per_class': args.val_per_class, 'student_epochs': args.student_epochs,
                            'seeds': args.seeds, 'recipe': 'recipes/demo_fmnist.yaml',
                            'teacher_recipe': 'recipes/demo_fmnist_teacher.yaml', 'quick': args.quick,
                            'tune_images_per_class': args.tune_per_class, 'tune_seeds': args.tune_seeds},
               'tuning': {'candidates': {k: list(v) for k, v in CANDIDATES.items()}, 'tune_top1': tuning,
                          'chosen': chosen, 'chosen_alpha': list(alpha)},
               'students': {}}
    for student, by_method in results.items():
        summary['students'][student] = {}
        for method, by_seed in by_method.items():
            top1 = [[r['eval_top1'] for r in rows if 'eval_top1' in r][-1] for _, rows in sorted(by_seed.items())]
            m, s = mean_std(top1)
            summary['students'][student][method] = {'top1': top1, 'mean': m, 'std': s}
    summary['wall_seconds'] = time.time() - start
    results_path = args.results or (os.path.join(out, 'small_repro.json') if args.quick else
                                    os.path.join(ROOT, 'experiments', 'results', 'small_repro.json'))
    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    with open(results_path, 'w') as f:
        json.dump(summary, f, indent=2)

    _plots(results, out)
    _report(summary, out)
    print(open(os.path.join(out, 'report.md')).read())


def _plots(results, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    students = list(results)
    fig, axes = plt.subplots(1, len(students), figsize=(6 * len(students), 4), squeeze=False)
    for ax, student in zip(axes[0], students):
        for method in METHODS:
            runs = list(results[student][method].values())
            idx = [i for i, row in enumerate(runs[0]) if 'eval_top1' in row]
            mean = [statistics.mean(r[i]['eval_top1'] for r in runs) for i in idx]
            ax.plot([runs[0][i]['epoch'] for i in idx], mean, marker='o', label=method)
        _finish_axes(ax, f'{student}: validation top-1 (mean over seeds)', 'top-1 (%)')
    _save(fig, plt, os.path.join(out, 'top1_per_epoch.png'))

    fig, axes = plt.subplots(1, len(students), figsize=(6 * len(students), 4), squeeze=False)
    for ax, student in zip(axes[0], students):
        runs = list(results[student]['scalekd'].values())
        epochs = [r['epoch'] for r in runs[0]]
        for term in TERMS:
            key = f'train_{term}'
            if key in runs[0][0]:
                ax.plot(epochs, [statistics.mean(r[i][key] for r in runs) for i in range(len(epochs))], label=term)
        ax.set_yscale('log')
        _finish_axes(ax, f'{student}: ScaleKD loss terms (unweighted, train)')
    _save(fig, plt, os.path.join(out, 'scalekd_terms.png'))


def _finish_axes(ax, title, ylabel=None):
    ax.set_title(title)
    ax.set_xlabel('epoch')
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=.3)


def _save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(summary, out):
    s = summary['settings']
    lines = ['# Small reproduction: ScaleKD vs KD vs no distillation (Fashion-MNIST, CPU)', '',
             f"Teacher `scalekd_demo_vit` trained on {summary['teacher']['train_images_per_class']} images per class "
             f"for {summary['teacher']['epochs']} epochs: **top-1 {summary['teacher']['top1']:.2f}**.",
             f"Students train on {s['student_train_images_per_class']} images per class for {s['student_epochs']} "
             f"epochs (recipe `{s['recipe']}`, only `--distiller` differs), seeds {s['seeds']}; validation on "
             f"{s['val_images_per_class']} images per class. Top-1 of the last epoch, mean +- std over seeds.", '',
             '| student | none | kd | scalekd | kd gain | scalekd gain |', '|---|---|---|---|---|---|']
    for student, by_method in summary['students'].items():
        cell = {m: f"{v['mean']:.2f} +- {v['std']:.2f}" for m, v in by_method.items()}
        base = by_method['none']['mean']
        lines.append(f"| {student} | {cell['none']} | {cell['kd']} | {cell['scalekd']} | "
                     f"{by_method['kd']['mean'] - base:+.2f} | {by_method['scalekd']['mean'] - base:+.2f} |")
    t = summary['tuning']
    if t['tune_top1']:
        lines += ['', f"ScaleKD feature weights (both stages) chosen on the tuning split "
                      f"({s['tune_images_per_class']} training images per class, seeds {s['tune_seeds']}): "
                      f"**{t['chosen']} {tuple(t['chosen_alpha'])}**.", '',
                  '| candidate | ' + ' | '.join(t['tune_top1'][next(iter(t['tune_top1']))]) + ' | mean |',
                  '|---|' + '---|' * (len(t['tune_top1'][next(iter(t['tune_top1']))]) + 1)]
        for name, by_student in t['tune_top1'].items():
            vals = [x for v in by_student.values() for x in v]
            lines.append(f"| {name} {tuple(t['candidates'][name])} | " + ' | '.join(
                ', '.join(f'{x:.2f}' for x in v) for v in by_student.values()) + f' | {statistics.mean(vals):.2f} |')
    lines += [TUNING_NOTE, f"Wall time {summary['wall_seconds'] / 60:.1f} min on this machine"
                  f"{' (quick mode)' if s['quick'] else ''}.", '',
              '![validation top-1](top1_per_epoch.png)', '', '![ScaleKD terms](scalekd_terms.png)', '']
    with open(os.path.join(out, 'report.md'), 'w') as f:
        f.write('\n'.join(lines))


if __name__ == '__main__':
    main()
