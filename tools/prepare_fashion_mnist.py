#!/usr/bin/env python3
"""Fashion-MNIST (IDX files) -> an ImageFolder (train/ and validation/, RGB PNG) for train_kd.py.

Debian ships the data set as the package ``dataset-fashion-mnist`` (files under
/usr/share/datasets/fashion-mnist); the same four ``*-idx?-ubyte.gz`` files can also come from the
data set's own release page. Images are upscaled from 28 to ``--size`` px (bilinear) and
replicated to three channels.

    python tools/prepare_fashion_mnist.py --out data/fashion_mnist --train-per-class 1000
"""
import argparse
import gzip
import os
import struct
import sys

import numpy as np
from PIL import Image

CLASSES = ('t-shirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag',
           'ankle_boot')
DEFAULT_SRC = '/usr/share/datasets/fashion-mnist'
FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
         'validation': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


def read_idx(path):
    with gzip.open(path, 'rb') as f:
        data = f.read()
    magic, = struct.unpack('>I', data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f'{path}: truncated IDX file ({arr.size} values, header says {dims})')
    return arr.reshape(dims)


def pick(labels, per_class, seed, skip=0):
    """Indices per class after a seeded shuffle: ``per_class`` of them after the first ``skip``; all when None."""
    if per_class is None:
        return np.arange(len(labels))
    order = np.random.RandomState(seed).permutation(len(labels))
    keep = [i for c in range(len(CLASSES)) for i in order[labels[order] == c][skip:skip + per_class]]
    return np.sort(np.array(keep))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', default=DEFAULT_SRC, help=f'folder with the four IDX .gz files (default: {DEFAULT_SRC})')
    p.add_argument('--out', required=True, help='output ImageFolder root')
    p.add_argument('--size', type=int, default=32, help='output image size in px (default: 32)')
    p.add_argument('--train-per-class', type=int, default=None, help='keep N train images per class (default: all)')
    p.add_argument('--val-per-class', type=int, default=None, help='keep N validation images per class (default: all)')
    p.add_argument('--tune-per-class', type=int, default=None,
                   help='also write a tune/ split of N images per class carved from the training images, disjoint '
                        'from the train/ subset (needs --train-per-class)')
    p.add_argument('--seed', type=int, default=0, help='seed of the subset choice (default: 0)')
    args = p.parse_args(argv)
    if args.tune_per_class and not args.train_per_class:
        p.error('--tune-per-class needs --train-per-class (the tuning images are carved from the rest of train)')

    missing = [f for pair in FILES.values() for f in pair if not os.path.isfile(os.path.join(args.src, f))]
    if missing:
        sys.exit(f"Fashion-MNIST files missing in '{args.src}': {', '.join(missing)}. Install them with "
                 f"'apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or download the four .gz files of the "
                 f"Fashion-MNIST release into a folder and pass --src FOLDER.")
    splits = [('train', 'train', args.train_per_class, 0), ('validation', 'validation', args.val_per_class, 0)]
    if args.tune_per_class:
        splits.append(('tune', 'train', args.tune_per_class, args.train_per_class))
    for split, source, per_class, skip in splits:
        images = read_idx(os.path.join(args.src, FILES[source][0]))
        labels = read_idx(os.path.join(args.src, FILES[source][1]))
        idx = pick(labels, per_class, args.seed, skip)
        for c in CLASSES:
            os.makedirs(os.path.join(args.out, split, c), exist_ok=True)
        for i in idx:
            img = Image.fromarray(images[i], mode='L').resize((args.size, args.size), Image.BILINEAR).convert('RGB')
            img.save(os.path.join(args.out, split, CLASSES[labels[i]], f'{i:05d}.png'))
        print(f'{split}: {len(idx)} images (from {source}) -> {os.path.join(args.out, split)}')


if __name__ == '__main__':
    main()
