import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_image_folder(root, classes=3, per_class=4, size=32, splits=('train', 'validation'), seed=0):
    """A tiny ImageFolder of random RGB PNGs: root/<split>/<class>/<i>.png."""
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(seed)
    for split in splits:
        for c in range(classes):
            d = os.path.join(root, split, f'class{c}')
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                # class-dependent brightness so a model can learn something
                arr = (rng.rand(size, size, 3) * 128 + c * 40).clip(0, 255).astype('uint8')
                Image.fromarray(arr).save(os.path.join(d, f'{i}.png'))
    return str(root)


@pytest.fixture
def one_thread():
    """One intra-op thread: in-process runs of tiny models are ~10x faster than with two threads on two busy
    cores, and the golden run is bitwise reproducible."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / 'data')


@pytest.fixture(scope='module')
def teacher_ckpt(tmp_path_factory):
    """A demo ViT teacher (3 classes, seed 0) saved as a local checkpoint, as --teacher-checkpoint takes it."""
    import timm
    import models  # noqa: F401  (registers scalekd_demo_vit)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.manual_seed(0)
    torch.save({'state_dict': timm.create_model('scalekd_demo_vit', num_classes=3).state_dict()}, path)
    return str(path)


def load_ckpt(path):
    """A training checkpoint as train_kd.py writes it (its args are a Namespace), loaded weights-only."""
    import argparse
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def state_hash(state):
    """A short hash of a state dict's names and exact bytes: equal only when every tensor is equal bit for bit."""
    import hashlib
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def summary_rows(run_dir):
    import csv
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))
