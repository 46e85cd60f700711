"""Input data: the data folder checks and the guard that skips unreadable images, names and counts them."""
import logging
import os

import torch
import torch.distributed as dist
from PIL import Image

from .errors import FatalError

_logger = logging.getLogger('train')


def check_data_dir(data_dir: str, splits=()) -> None:
    if not data_dir or not os.path.isdir(data_dir):
        raise FatalError(f"data folder '{data_dir}' does not exist; pass --data-dir DIR, an ImageFolder root with "
                         f"train/ and validation/ (or val/) class folders (tools/prepare_fashion_mnist.py makes one)")
    for split in splits:
        candidates = [os.path.join(data_dir, split)] + ([os.path.join(data_dir, 'val')] if split == 'validation' else [])
        found = [c for c in candidates if os.path.isdir(c)]
        if not found:
            raise FatalError(f"data folder '{data_dir}' has no '{split}' folder; expected {candidates[0]}/<class>/<img>")
        if not any(os.scandir(found[0])):
            raise FatalError(f"split folder '{found[0]}' is empty; it needs one sub-folder of images per class")


def _forwarded(name: str) -> property:
    """An attribute read from and written to the wrapped ``self.dataset``."""
    return property(lambda self: getattr(self.dataset, name), lambda self, value: setattr(self.dataset, name, value))


class BadImageGuard(torch.utils.data.Dataset):
    """Wrap a timm ``ImageDataset``: an image that cannot be read or decoded is skipped and named.

    timm's ImageDataset logs only the index of a failing sample and gives up after 10 failures in a
    row; a run over a large folder with a few broken files should instead go on, say which files
    were skipped and stop when there are too many. A skipped sample is replaced by the next
    readable one of the split (so batches keep their size). Counts live in shared memory, one
    slot per loader worker, so the main process and all workers see the total of this process;
    past ``max_bad`` the dataset raises ``FatalError`` and the run stops with one message.
    """
    _SLOTS = 257  # main process + up to 256 loader workers

    def __init__(self, dataset, max_bad: int = 100, split: str = 'train', local_limit: bool = True):
        self.dataset = dataset
        self.max_bad = max_bad
        self.split = split
        self.local_limit = local_limit  # False with several processes: the limit is checked across ranks
        self.counts = torch.zeros(self._SLOTS, dtype=torch.int64).share_memory_()

    # create_loader / AugMixDataset set the transform on the dataset they get: forward it
    transform = _forwarded('transform')
    target_transform = _forwarded('target_transform')

    def __getattr__(self, name):
        if name == 'dataset':  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    @property
    def bad_count(self) -> int:
        return int(self.counts.sum())

    def _decode(self, index):
        ds = self.dataset
        sample, target, *features = ds.reader[index]
        if ds.load_bytes:
            return sample.read(), target, features
        img = Image.open(sample)
        img.load()  # decode now: a truncated file fails here, not later inside the transforms
        if ds.input_img_mode:
            img = img.convert(ds.input_img_mode)
        return img, target, features

    def _name(self, index) -> str:
        try:
            return self.dataset.filename(index, absolute=True)
        except Exception:
            return f'sample {index}'

    def _record(self, index, e: Exception) -> None:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (self._SLOTS - 1)
        self.counts[slot] += 1
        total = self.bad_count
        name = self._name(index)
        if total <= self.max_bad + 1 or not self.local_limit:  # past the limit: the stop message is the last word
            _logger.warning(f"skipped unreadable image '{name}' ({type(e).__name__}: {str(e)[:200]}); "
                            f"{total} bad image(s) in the {self.split} split so far (limit --max-bad-images "
                            f"{self.max_bad})")
        if total > self.max_bad and self.local_limit:
            raise FatalError(f"more than --max-bad-images {self.max_bad} images of the {self.split} split could "
                             f"not be read (last: '{name}'; all are named in the log); repair or remove them, or "
                             f"raise --max-bad-images")

    def __getitem__(self, index):
        n = len(self.dataset)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                img, target, features = self._decode(i)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                self._record(i, e)
                continue
            break
        else:
            raise FatalError(f'no image of the {self.split} split can be read; check the data folder')
        ds = self.dataset
        if ds.transform is not None:
            img = ds.transform(img)
        if target is None:
            target = -1
        elif ds.target_transform is not None:
            target = ds.target_transform(target)
        return (img, target, *features) if ds.additional_features is not None else (img, target)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def guard_bad_images(dataset, max_bad: int, split: str):
    """``dataset`` wrapped in a BadImageGuard when it is an image-file dataset, else unchanged. With several
    processes the limit is not checked per process but across ranks (``check_bad_images``)."""
    if dataset is None or not all(hasattr(dataset, a) for a in ('reader', 'load_bytes', 'input_img_mode')):
        return dataset
    return BadImageGuard(dataset, max_bad=max_bad, split=split, local_limit=not _distributed())


def _find_guard(obj, depth: int = 4):
    """The BadImageGuard under a loader (PrefetchLoader -> DataLoader -> [AugMixDataset ->] guard), or None."""
    for _ in range(depth):
        if obj is None or isinstance(obj, BadImageGuard):
            return obj
        obj = getattr(obj, 'loader', None) if hasattr(obj, 'loader') else getattr(obj, 'dataset', None)
    return obj if isinstance(obj, BadImageGuard) else None


def check_bad_images(loader, device, now: bool = True) -> None:
    """With several processes: stop every rank once the ranks together skipped more than --max-bad-images
    unreadable images (collective when ``now``: every rank calls it at the same step)."""
    guard = _find_guard(loader) if now else None
    if guard is None or guard.local_limit or not _distributed():
        return
    total = torch.tensor([float(guard.bad_count)], device=device)
    dist.all_reduce(total)
    total = int(total.item())
    if total > guard.max_bad:
        raise FatalError(f"more than --max-bad-images {guard.max_bad} images of the {guard.split} split could not "
                         f"be read ({total} across {dist.get_world_size()} processes, this one {guard.bad_count}; "
                         f"each is named in the log); repair or remove them, or raise --max-bad-images")
