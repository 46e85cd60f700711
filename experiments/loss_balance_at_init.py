#!/usr/bin/env python3
"""Gradient norm each weighted ScaleKD term sends into the student at init, per geometry (random weights).

The numbers behind ``--loss-balance-factor``'s default: at the paper's geometry (7x7 / 14x14 maps) and
at the demo's (2x2 / 4x4) every term stays within a small factor of the task loss; a 1x1 stage-4 map
with the unguarded normalisation (the official code's 0/0) sends millions of times more.

    python experiments/loss_balance_at_init.py [--batch 8] [--seeds 0 1 2]
"""
import argparse
import os
import sys

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: F401,E402
import distillers.scalekd as scalekd  # noqa: E402
from distillers import build_task  # noqa: E402
from distillers.balance import term_gradient_norms  # noqa: E402
from distillers.dfm import feature_distance, remove_dc  # noqa: E402

VIT_GAP = dict(class_token=False, global_pool='avg', fc_norm=False)
GEOMETRIES = {
    # name: (student, student kwargs, teacher, teacher kwargs, image size, heads)
    'paper: resnet18 <- swin (7x7 final map), 224 px': (
        'resnet18', {}, 'swin_tiny_patch4_window7_224', dict(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8)),
        224, 8),
    'paper: vit-s/16 <- swin (14x14 -> 7x7), 224 px': (
        'vit_small_patch16_224', dict(depth=4, **VIT_GAP), 'swin_tiny_patch4_window7_224',
        dict(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8)), 224, 8),
    'demo: scalekd_demo_resnet <- scalekd_demo_vit (8x8), 32 px': (
        'scalekd_demo_resnet', {}, 'scalekd_demo_vit', {}, 32, 8),
    'small: resnet18 (1x1 stage 4) <- scalekd_demo_vit, 32 px': ('resnet18', {}, 'scalekd_demo_vit', {}, 32, 8),
    'small: resnet18 (1x1 stage 4) <- vit-tiny/16 (2x2 tokens), 32 px': (
        'resnet18', {}, 'vit_tiny_patch16_224', dict(img_size=32, depth=2, **VIT_GAP), 32, 3),
}
SMALL = [n for n in GEOMETRIES if n.startswith('small')]


def _unguarded(p, t, alternative=False):
    if not alternative:
        return feature_distance(p, t)
    p, t = remove_dc(p.float()), remove_dc(t.float())
    return (F.normalize(p, dim=1) - F.normalize(t, dim=1)).pow(2).sum() / p.shape[0]


def measure(name, seed, batch, unguarded=False):
    student, skw, teacher, tkw, size, heads = GEOMETRIES[name]
    torch.manual_seed(seed)
    s = timm.create_model(student, num_classes=10, **skw)
    t = timm.create_model(teacher, num_classes=10, **tkw)
    task = build_task('scalekd', s, t, img_size=(size, size), heads_s3=heads, heads_s4=heads)
    task.train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    original = scalekd.feature_distance
    scalekd.feature_distance = _unguarded if unguarded else original
    try:
        norms = term_gradient_norms(task, x, y, task.get_eval_model().parameters())
    finally:
        scalekd.feature_distance = original
    return task.geometry, {k: v / norms['loss_cls'] for k, v in norms.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--only', nargs='+', default=None, help='geometry names (default: all)')
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print('ratio = gradient norm of the weighted term / that of the weighted task loss (loss_cls), '
          f'batch {args.batch}, seeds {args.seeds}: max over seeds\n')
    rows = [(n, False) for n in GEOMETRIES] + [(n, True) for n in SMALL]
    rows = [r for r in rows if args.only is None or r[0] in args.only]
    for name, unguarded in rows:
        worst = {}
        for seed in args.seeds:
            geometry, ratios = measure(name, seed, args.batch, unguarded)
            for k, r in ratios.items():
                worst[k] = max(worst.get(k, 0.0), r)
        label = name + (' [unguarded F.normalize, before the fix]' if unguarded else '')
        grids = f"student {geometry['student_s3']}/{geometry['student_s4']}, teacher {geometry['teacher_s4']}"
        print(f'{label} ({grids})\n  ' + '  '.join(f'{k} {v:.3g}x' for k, v in worst.items() if k != 'loss_cls'))


if __name__ == '__main__':
    main()
