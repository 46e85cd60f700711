"""The splits of an ImageFolder root, checked before any loader exists: present, the same class folders,
no empty class, one full batch per process, no directory symlink loop."""
import os

from .errors import FatalError

_SPLIT_SYNONYMS = (('train', 'training'), ('validation', 'val', 'valid', 'eval', 'evaluation'))


def resolve_split(data_dir: str, split: str) -> str:
    """The path timm's create_dataset reads for ``split`` of a folder root ('' when there is none: timm would
    then read the root itself, every split's images as classes of one)."""
    name = split.split('[')[0]
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        return path
    for synonyms in _SPLIT_SYNONYMS:
        if name in synonyms:
            for s in synonyms:
                if os.path.exists(os.path.join(data_dir, s)):
                    return os.path.join(data_dir, s)
    return ''


def scan_split(folder: str, extensions) -> tuple:
    """(labels, empty) of an ImageFolder split: {class label (timm's leaf-folder name): image count} and the
    top-level folders without any image below them. Directory links are followed once: a link back into a
    folder it sits in (a loop) stops with a FatalError naming it."""
    labels = {}

    def walk(path, label, ancestors) -> int:
        try:
            st = os.stat(path)
            entries = list(os.scandir(path))
        except OSError:
            return 0
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            raise FatalError(f"the data folder has a symlink loop: '{path}' leads back to "
                             f"'{os.path.realpath(path)}', a folder it sits in, so its images would be read again "
                             f"and again; remove the link (or replace it with the folder it should point to)")
        n = total = 0
        for e in entries:
            if e.is_dir():  # follows links, like timm's reader
                total += walk(e.path, e.name, ancestors | {key})
            elif os.path.splitext(e.name)[1].lower() in extensions:
                n += 1
        if n:
            labels[label] = labels.get(label, 0) + n
        return total + n

    try:
        st = os.stat(folder)
        top = [e for e in os.scandir(folder) if e.is_dir()]
    except OSError:
        return labels, []
    empty = [e.name for e in top if walk(e.path, e.name, frozenset({(st.st_dev, st.st_ino)})) == 0]
    return labels, sorted(empty)


def check_splits(data_dir: str, train_split: str, val_split: str, batch_size: int, world_size: int = 1,
                 class_map: str = '', train_labels: bool = True) -> int:
    """An ImageFolder root fit to train on: the splits exist, hold the same class folders (indices come from the
    sorted folder names of each split, so they agree only then), no class folder is empty, and every process gets
    at least one full batch per epoch. Returns the number of training images (FatalError otherwise)."""
    from timm.data.readers.img_extensions import get_img_extensions
    extensions = get_img_extensions(as_set=True)
    found = {}
    for flag, split in (('--train-split', train_split), ('--val-split', val_split)):
        if not split:
            continue
        path = resolve_split(data_dir, split)
        if not path:
            hint = ("pass --val-split '' to train without validation (checkpoints are then ranked by the training "
                    "loss)" if flag == '--val-split' else 'pass --train-split NAME')
            others = sorted(e.name for e in os.scandir(data_dir) if e.is_dir())
            raise FatalError(f"data folder '{data_dir}' has no '{split}' split ({flag} {split}; folders there: "
                             f"{', '.join(others) or 'none'}); timm would read the whole folder instead. Add "
                             f"{os.path.join(data_dir, split)}/<class>/<images>, or {hint}")
        if not os.path.isdir(path):  # a tar file or another reader's format: not checked here
            return 0
        counts, empty = scan_split(path, extensions)
        if empty:
            raise FatalError(f"class folder '{os.path.join(path, empty[0])}' holds no images ({len(empty)} empty "
                             f"class folder(s): {', '.join(empty[:5])}); add images ({', '.join(sorted(extensions))}) "
                             f"or remove the folder from every split")
        found[split] = (path, counts)
    if train_split in found and val_split in found and not class_map and train_labels and \
            all(found[k][1] for k in (train_split, val_split)):  # a split without class folders has no labels
        (tpath, tc), (vpath, vc) = found[train_split], found[val_split]
        missing, extra = sorted(set(tc) - set(vc)), sorted(set(vc) - set(tc))
        if missing or extra:
            what = '; '.join(p for p in (f"missing there: {', '.join(missing[:5])}" if missing else '',
                                         f"not in the train split: {', '.join(extra[:5])}" if extra else '') if p)
            raise FatalError(f"the validation split '{vpath}' does not have the class folders of the train split "
                             f"'{tpath}' ({what}); class indices follow the sorted folder names of each split, so "
                             f"every later class would be scored against another's label. Give both splits the "
                             f"same class folders")
    n_train = sum(found[train_split][1].values()) if train_split in found else 0
    if train_split in found and n_train:
        per_rank = -(-n_train // max(1, world_size))
        if per_rank < batch_size:
            procs = f' on each of {world_size} processes' if world_size > 1 else ''
            raise FatalError(f"--batch-size {batch_size}{procs} is larger than the train split "
                             f"'{found[train_split][0]}' ({n_train} images{', ' + str(per_rank) + ' per process' if world_size > 1 else ''}): "
                             f"with incomplete batches dropped, no update would be made. Pass --batch-size "
                             f"{max(1, per_rank)} or less, or add images")
    return n_train


def _class_to_idx(dataset):
    return getattr(getattr(dataset, 'reader', None), 'class_to_idx', None) or None


def check_dataset_splits(args, train, evaluation, data_classes) -> None:
    """The splits of a ``--dataset`` kind (hfds/, wds/, torch/, ...; an ImageFolder root is checked by check_splits
    before): a map-style dataset's two splits list the same classes and give each process one full batch; an
    iterable one (wds/, hfids/, tfds/) needs --num-classes, and the guarantees that do not hold for it are logged."""
    import logging
    import torch
    if not args.dataset:
        return
    if isinstance(train, torch.utils.data.IterableDataset):
        if data_classes is None and args.num_classes is None:
            raise FatalError(f'--dataset {args.dataset} is an iterable dataset that does not list its classes: pass '
                             f'--num-classes N (the student head and the teacher check need it)')
        if getattr(args, 'rank', 0) == 0:
            logging.getLogger('train').warning(
                f'--dataset {args.dataset} is an iterable dataset (a stream of samples), so three guarantees of this '
                f'script do not hold for it: (1) an unreadable sample is skipped by the reader with a warning, not '
                f'named or counted against --max-bad-images; (2) no split checks are made (class lists, split size '
                f'against -b; {args.train_num_samples or len(train)} training samples are assumed); (3) a resume '
                f'(--resume, a stop inside an epoch) re-reads the stream, and its samples are not guaranteed to be '
                f'those an uninterrupted run would have seen next. Use an ImageFolder or hfds/ dataset for all three')
        return
    world_size = int(os.environ.get('WORLD_SIZE', '1') or 1)
    train_classes, eval_classes = _class_to_idx(train), _class_to_idx(evaluation)
    if train_classes and eval_classes and train_classes != eval_classes and not args.class_map:
        differ = sorted(set(train_classes.items()) ^ set(eval_classes.items()), key=str)[:3]
        raise FatalError(f'--dataset {args.dataset}: the {args.val_split} split does not have the classes of the '
                         f'{args.train_split} split with the same indices (first differences: {differ}); every '
                         f'prediction would be scored against another class. Give both splits one class list')
    per_rank = -(-len(train) // max(1, world_size))
    if per_rank < args.batch_size:
        raise FatalError(f'--batch-size {args.batch_size} is larger than the {args.train_split} split of --dataset '
                         f'{args.dataset} ({len(train)} samples, {per_rank} per process): with incomplete batches '
                         f'dropped no update would be made. Pass --batch-size {max(1, per_rank)} or less')
