#!/usr/bin/env python3
"""The demo: a real distillation run on Fashion-MNIST, end to end on a CPU.

1. Fashion-MNIST -> ImageFolder (32 px RGB): all 60k training images for the teacher, a small
   student split (100 per class), and the full 10k validation split for both.
2. Train the teacher (scalekd_demo_vit, a small ViT) from scratch with ``--distiller none``.
3. Train the student (scalekd_demo_resnet) twice for the same budget on the small split: alone
   (``--distiller none``) and with ScaleKD from the teacher (``recipes/demo_fmnist.yaml``).
4. Print teacher top-1, both students' top-1 and the wall time of each stage.

    python tools/demo.py --out demo_output
"""
import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_TRAIN = re.compile(r'Train: (\d+) \[\s*\d+/\d+ \(\s*(\d+)%\)\].*?\bloss: ([\d.]+).*ETA epoch (\S+) run (\S+)')
_TEST = re.compile(r'Test: Loss: [\d.]+\s+Acc@1: ([\d.]+)')


class Progress:
    """Turns a train_kd.py log, line by line, into console progress: ``feed(line)`` returns (text, in_place) for a
    line worth showing, else None. A training step shows the epoch, its %, the loss and the ETA of the epoch and of
    the stage (the log's own ETA); without a terminal only the first step of each quarter of an epoch is shown (on
    a terminal every step, rewritten in place). An epoch's validation shows its top-1."""

    def __init__(self, stage, epochs, tty=False):
        self.stage, self.epochs, self.tty, self.shown = stage, epochs, tty, set()

    def feed(self, line):
        m = _TRAIN.search(line)
        if m:
            epoch, pct, loss, eta_epoch, eta_run = m.groups()
            quarter = (int(epoch), min(int(pct) // 25, 3))
            if not self.tty and quarter in self.shown:
                return None
            self.shown.add(quarter)
            return (f'  {self.stage}: epoch {int(epoch) + 1}/{self.epochs} {int(pct):>3d}%  loss {float(loss):.4f}  '
                    f'ETA epoch {eta_epoch}, stage {eta_run}'), self.tty
        m = _TEST.search(line)
        return (f'  {self.stage}: validation top-1 {float(m.group(1)):.2f}', False) if m else None


def run(cmd, log, stage, epochs):
    """Run one stage: its full output into ``log``, its progress on the console (Progress)."""
    t = time.time()
    tty = sys.stdout.isatty()
    print(f'{stage}: {epochs} epoch(s), full log in {log}', flush=True)
    shown, in_place = Progress(stage, epochs, tty), False
    with open(log, 'w') as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True, bufsize=1)
        for line in proc.stdout:
            f.write(line)
            out = shown.feed(line)
            if out is not None:
                text, now_in_place = out
                print(('\r' if now_in_place else ('\n' if in_place else '')) + text, end='' if now_in_place else '\n',
                      flush=True)
                in_place = now_in_place
        rc = proc.wait()
    if in_place:
        print()
    if rc != 0:
        sys.exit(f'demo step failed (exit {rc}): {" ".join(cmd)}\nsee {log}')
    return time.time() - t


def best_top1(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    top1 = [float(r['eval_top1']) for r in rows if r.get('eval_top1')]  # empty where not validated
    return top1[-1], max(top1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='demo_output', help='folder for data, runs and logs (default: demo_output)')
    p.add_argument('--src', default='/usr/share/datasets/fashion-mnist', help='Fashion-MNIST IDX folder')
    p.add_argument('--teacher-epochs', type=int, default=2)
    p.add_argument('--student-epochs', type=int, default=15)
    p.add_argument('--workers', type=int, default=2)
    args = p.parse_args(argv)
    py = sys.executable
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    times = {}

    t = time.time()
    for name, per_class in (('fmnist_teacher', None), ('fmnist_student', 100)):
        if not os.path.isdir(os.path.join(out, name, 'validation')):
            cmd = [py, 'tools/prepare_fashion_mnist.py', '--src', args.src, '--out', os.path.join(out, name)]
            subprocess.check_call(cmd + (['--train-per-class', str(per_class)] if per_class else []), cwd=ROOT)
    times['data'] = time.time() - t

    # the demo owns <out>/runs: a second demo starts its runs afresh (train_kd.py never writes over a run)
    shutil.rmtree(os.path.join(out, 'runs'), ignore_errors=True)
    common = ['--output', os.path.join(out, 'runs'), '-j', str(args.workers), '--log-interval', '20']
    teacher_dir = os.path.join(out, 'runs', 'teacher')
    times['teacher'] = run([py, 'train_kd.py', '--config', 'recipes/demo_fmnist_teacher.yaml',
                            '--data-dir', os.path.join(out, 'fmnist_teacher'), '--experiment', 'teacher',
                            '--epochs', str(args.teacher_epochs)] + common, os.path.join(out, 'teacher.log'),
                           'teacher (scalekd_demo_vit, 60k images)', args.teacher_epochs)
    teacher_ckpt = os.path.join(teacher_dir, 'last.pth.tar')
    student_data = os.path.join(out, 'fmnist_student')
    times['student_none'] = run([py, 'train_kd.py', '--config', 'recipes/demo_fmnist.yaml', '--distiller', 'none',
                                 '--teacher', '', '--data-dir', student_data, '--experiment', 'student_none',
                                 '--epochs', str(args.student_epochs)] + common,
                                os.path.join(out, 'student_none.log'), 'student alone (1k images)',
                                args.student_epochs)
    times['student_scalekd'] = run([py, 'train_kd.py', '--config', 'recipes/demo_fmnist.yaml',
                                    '--teacher-checkpoint', teacher_ckpt, '--data-dir', student_data,
                                    '--experiment', 'student_scalekd', '--epochs', str(args.student_epochs)] + common,
                                   os.path.join(out, 'student_scalekd.log'), 'student with ScaleKD (1k images)',
                                   args.student_epochs)

    rows = [('teacher scalekd_demo_vit (60k images)', teacher_dir, times['teacher']),
            ('student scalekd_demo_resnet, no KD (1k images)', os.path.join(out, 'runs', 'student_none'),
             times['student_none']),
            ('student scalekd_demo_resnet, ScaleKD (1k images)', os.path.join(out, 'runs', 'student_scalekd'),
             times['student_scalekd'])]
    print('\nFashion-MNIST validation split (10,000 images), 32 px')
    print(f'| {"model":<52} | final top-1 | best top-1 | wall time |')
    print(f'|{"-" * 54}|-------------|------------|-----------|')
    for name, d, secs in rows:
        final, best = best_top1(d)
        print(f'| {name:<52} | {final:>11.2f} | {best:>10.2f} | {secs / 60:>7.1f} m |')
    total = sum(times.values())
    print(f'total wall time {total / 60:.1f} min (data preparation {times["data"]:.0f} s); runs in {out}/runs')


if __name__ == '__main__':
    main()
