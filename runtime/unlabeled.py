"""Distillation on images without labels (``--unlabeled-data DIR ...``, ``--labels none``).

An image without a label carries the target -1 (``UNLABELED``) through the loader; Mixup/CutMix keep that mark on a
mixed sample unless every image in it has a label (a soft-target row of -1s); the student's own loss is taken over
the labelled samples only (``LabelledOnly``), while every distillation term covers every sample. Labels are never
invented: with ``--labels none`` no label is read at all.
"""
import logging
import os
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from PIL import Image
from timm.data import FastCollateMixup, Mixup
from timm.data.mixup import mixup_target
from timm.data.readers.reader import Reader

from .errors import FatalError

_logger = logging.getLogger('train')

UNLABELED = -1
PROBE = 16  # images of a folder opened before step 0: a folder whose probed images all fail is refused


def _extensions():
    from timm.data.readers.img_extensions import get_img_extensions
    return get_img_extensions(as_set=True)


def list_images(folder: str) -> List[str]:
    """Every image file under ``folder`` (recursive, any layout; class folders are not read as labels), sorted, so
    every process and every resume sees one order. Directory links are not followed (no loops)."""
    exts, out = _extensions(), []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in exts]
    return out


def check_image_folders(folders: Sequence[str], flag: str = '--unlabeled-data') -> List[str]:
    """The image files of ``folders``; a folder that is missing, holds no image or whose probed images are all
    unreadable stops the run before step 0 with a message naming it."""
    files = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise FatalError(f"{flag} '{folder}' is not a folder; pass folders of images (read recursively, any "
                             f"layout)")
        found = list_images(folder)
        if not found:
            raise FatalError(f"{flag} '{folder}' holds no images ({', '.join(sorted(_extensions()))}, searched "
                             f"recursively); pass a folder of images")
        errors = []
        for path in found[:PROBE]:
            try:
                with Image.open(path) as img:
                    img.load()
                break
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                errors.append(f"'{path}' ({type(e).__name__}: {str(e)[:100]})")
        else:
            raise FatalError(f"{flag} '{folder}': none of its first {len(errors)} images can be read (first: "
                             f"{errors[0]}); repair the folder or drop it")
        files += found
    return files


class ImagesReader(Reader):
    """A timm reader: the samples of ``base`` (an ImageFolder reader: (file, class)), then ``files`` without a label
    (target None, which the dataset turns into -1). ``class_to_idx`` is the base's (empty without one)."""

    def __init__(self, base: Optional[Reader], files: Sequence[str]):
        super().__init__()
        self.base, self.files = base, list(files)
        self.class_to_idx = dict(getattr(base, 'class_to_idx', None) or {})
        self.n_base = len(base) if base is not None else 0

    def __getitem__(self, index):
        if index < self.n_base:
            return self.base[index]
        return open(self.files[index - self.n_base], 'rb'), None

    def __len__(self):
        return self.n_base + len(self.files)

    def _filename(self, index, basename=False, absolute=False):
        if index < self.n_base:
            return self.base.filename(index, basename=basename, absolute=absolute)
        path = self.files[index - self.n_base]
        return os.path.basename(path) if basename else os.path.abspath(path) if absolute else path


def add_unlabeled(dataset, files: Sequence[str]):
    """``dataset`` (timm's ImageDataset of a folder) with ``files`` appended as images without a label."""
    dataset.reader = ImagesReader(dataset.reader, files)
    return dataset


def images_dataset(files: Sequence[str], input_img_mode: str = 'RGB'):
    """A timm ImageDataset of ``files`` without labels (``--labels none``, or a validation split without classes)."""
    from timm.data import ImageDataset
    return ImageDataset('', reader=ImagesReader(None, files), input_img_mode=input_img_mode)


def has_class_folders(split_path: str) -> bool:
    return os.path.isdir(split_path) and any(e.is_dir() for e in os.scandir(split_path))


# --- the label mark through Mixup / CutMix ------------------------------------------------------------------------
def keep_labels(has: torch.Tensor, lam) -> torch.Tensor:
    """Which mixed samples keep a label: timm mixes sample i with sample n-1-i; a mix (lam < 1) keeps it only when
    both images have one, an unmixed sample when it has one. ``lam``: one value, or one per sample."""
    both = has & has.flip(0)
    if not torch.is_tensor(lam):
        return has if lam == 1. else both
    lam = lam.reshape(-1).to(has.device)
    n = lam.numel()
    return torch.where(lam == 1., has[:n], both[:n])


def mark_unlabeled(target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Soft targets with the rows of samples without a label set to -1."""
    target = target.clone()
    target[~keep.to(target.device)] = UNLABELED
    return target


class LabelMixup(Mixup):
    """timm's Mixup/CutMix for batches with unlabeled samples (target -1): mixed exactly as timm mixes them, and a
    mixed sample keeps a label only if every image in it has one."""

    def __call__(self, x, target):
        assert len(x) % 2 == 0, 'Batch size should be even when using this'
        has = target >= 0
        lam = self._mix_elem(x) if self.mode == 'elem' else self._mix_pair(x) if self.mode == 'pair' else \
            self._mix_batch(x)
        soft = mixup_target(target.clamp(min=0), self.num_classes, lam, self.label_smoothing, self.multi_label)
        return x, mark_unlabeled(soft, keep_labels(has, lam))


class LabelFastCollateMixup(FastCollateMixup):
    """timm's FastCollateMixup (the prefetcher's collate) with the same label rule as ``LabelMixup``."""

    def __call__(self, batch, _=None):
        n = len(batch)
        assert n % 2 == 0, 'Batch size should be even when using this'
        half = 'half' in self.mode
        out_n = n // 2 if half else n
        output = torch.zeros((out_n, *batch[0][0].shape), dtype=torch.uint8)
        if self.mode in ('elem', 'half'):
            lam = self._mix_elem_collate(output, batch, half=half)
        elif self.mode == 'pair':
            lam = self._mix_pair_collate(output, batch)
        else:
            lam = self._mix_batch_collate(output, batch)
        target = torch.tensor([int(b[1]) for b in batch], dtype=torch.int64)
        has = target >= 0
        soft = mixup_target(target.clamp(min=0), self.num_classes, lam, self.label_smoothing, self.multi_label)
        return output, mark_unlabeled(soft, keep_labels(has, lam))[:out_n]


# --- the student's own loss over labelled samples only --------------------------------------------------------------
class LabelledOnly(nn.Module):
    """The student's label loss over the samples that have a label (hard target >= 0, or a soft-target row that is not
    the -1 mark), their mean; zero (with a gradient path) when the batch has none, or always with ``labels=False``
    (``--labels none``: no label is read)."""

    def __init__(self, criterion: nn.Module, labels: bool = True):
        super().__init__()
        self.criterion, self.labels = criterion, labels

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.labels:
            return logits.sum() * 0.
        keep = target >= 0 if target.ndim == 1 else target[:, 0] >= 0
        if not bool(keep.any()):
            return logits.sum() * 0.
        return self.criterion(logits[keep], target[keep])
