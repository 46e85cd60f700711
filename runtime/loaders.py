"""The run's data: timm's datasets (the class count from the class folders), Mixup/CutMix and the training loader,
from the flags of train_kd.py's ``args``."""
import logging

import torch
from timm.data import create_dataset, create_loader, Mixup, FastCollateMixup

from .data import check_data_dir, guard_bad_images
from .splits import check_dataset_splits, resolve_split
from .unlabeled import LabelFastCollateMixup, LabelMixup, add_unlabeled, check_image_folders, has_class_folders, \
    images_dataset, list_images
from .errors import FatalError

_logger = logging.getLogger('train')


def create_datasets(args):
    """Train and eval datasets (eval: None without --val-split); sets args.num_classes from the class folders (or the
    dataset's class list: hfds/). timm's dataset kinds (hfds/, wds/, ...) take --input-key, --target-key and
    --dataset-trust-remote-code as in timm; what the run can guarantee for them is checked or logged here."""
    if not args.dataset:
        check_data_dir(args.data_dir, (args.train_split,))
    keys = {k: v for k, v in (('input_key', getattr(args, 'input_key', None)),
                              ('target_key', getattr(args, 'target_key', None))) if v is not None}
    common = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, input_img_mode=args.input_img_mode,
                  trust_remote_code=getattr(args, 'dataset_trust_remote_code', False), **keys)
    train_path = resolve_split(args.data_dir, args.train_split) if not args.dataset else ''
    if train_path and args.labels == 'folders' and not has_class_folders(train_path) and list_images(train_path):
        args.labels = 'none'  # images, no class folders: nothing to read a label from
        _logger.info(f"the train split '{train_path}' holds images but no class folders: training without labels "
                     f"(--labels none), from the teacher alone")
    if args.labels == 'none':
        dataset_train = images_dataset(check_image_folders([train_path], 'the train split'), args.input_img_mode)
    else:
        dataset_train = create_dataset(args.dataset, split=args.train_split, is_training=True, seed=args.seed,
                                       repeats=args.epoch_repeats, num_samples=args.train_num_samples, **common)
    if args.unlabeled_data:  # images without labels join the labelled ones in one shuffled stream
        add_unlabeled(dataset_train, check_image_folders(args.unlabeled_data))
    dataset_eval, val_path = None, resolve_split(args.data_dir, args.val_split) if args.val_split else ''
    if val_path and not args.dataset and not has_class_folders(val_path):  # a validation split without labels
        dataset_eval = images_dataset(check_image_folders([val_path], '--val-split'), args.input_img_mode)
    elif args.val_split:
        dataset_eval = create_dataset(args.dataset, split=args.val_split, is_training=False,
                                      num_samples=args.val_num_samples, **common)
    args.val_classes = num_classes(dataset_eval)
    args.val_labelled = dataset_eval is None or args.val_classes is not None or bool(args.dataset)
    data_classes = num_classes(dataset_train)
    if args.num_classes is None:
        args.num_classes = data_classes
    elif data_classes is not None and data_classes != args.num_classes:
        where = args.dataset or f'{args.data_dir}/{args.train_split}'
        raise FatalError(f'--num-classes {args.num_classes} does not match the {data_classes} classes found in '
                         f'{where}; drop --num-classes or fix the data')
    if not len(dataset_train):
        raise FatalError(f'the train split of {args.dataset or args.data_dir} holds no images')
    check_dataset_splits(args, dataset_train, dataset_eval, data_classes)
    # unreadable / corrupt images: skipped, named in the log, counted against --max-bad-images
    return (guard_bad_images(dataset_train, args.max_bad_images, args.train_split),
            guard_bad_images(dataset_eval, args.max_bad_images, args.val_split))


def num_classes(dataset):
    """The class count of an ImageFolder-style dataset (None when it has no class folders)."""
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    return len(class_to_idx) if class_to_idx else None


def create_mixup(args):
    """(collate_fn, mixup_fn): timm's FastCollateMixup with the prefetcher, else Mixup; (None, None) when off."""
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if not mixup_active:
        return None, None
    mixup_args = dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        label_smoothing=args.smoothing, num_classes=args.num_classes)
    unlabeled = bool(args.unlabeled_data) or args.labels == 'none'  # keep the mark of samples without a label
    if args.prefetcher:
        assert not args.aug_splits, 'collate conflict (cannot use aug splits with mixup + prefetcher)'
        return (LabelFastCollateMixup if unlabeled else FastCollateMixup)(**mixup_args), None
    return None, (LabelMixup if unlabeled else Mixup)(**mixup_args)


def create_train_loader(dataset, args, data_config, device, collate_fn=None, distributed=False,
                        persistent_workers=False):
    """The run's training loader: timm's create_loader with the augmentation flags of ``args``. Workers are not
    persistent by default, so that every epoch re-seeds them from the epoch's seed (exact resume)."""
    interpolation = args.train_interpolation
    if args.no_aug or not interpolation:
        interpolation = data_config['interpolation']
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        re_split=args.resplit, train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio,
        hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, num_aug_repeats=int(args.aug_repeats),
        num_aug_splits=args.aug_splits, interpolation=interpolation, mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=distributed, collate_fn=collate_fn,
        pin_memory=args.pin_mem, device=device, use_prefetcher=not args.no_prefetcher,
        worker_seeding=args.worker_seeding, persistent_workers=persistent_workers,
    )


def device_batch(input, target, args, device, mixup_fn=None):
    """A loader's batch as a step takes it: on ``device`` with Mixup/CutMix applied (timm's prefetcher has done both
    already), channels-last with ``--channels-last``."""
    if not args.prefetcher:
        if isinstance(input, (list, tuple)):  # --aug-splits: the splits one after another, as timm's fast collate
            input, target = torch.cat(input), target.repeat(len(input))
        input, target = input.to(device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
    if args.channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, target


def create_eval_loader(dataset, args, data_config, device):
    """The run's validation loader (None without a validation split): timm's create_loader, no augmentation."""
    if dataset is None:
        return None
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher,
    )


def start_data_epoch(epoch, dataset, loader, mixup_fn, args) -> None:
    """Before an epoch: the dataset's (or the distributed sampler's) epoch, and Mixup/CutMix off from
    ``--mixup-off-epoch`` on."""
    if hasattr(dataset, 'set_epoch'):
        dataset.set_epoch(epoch)
    elif args.distributed and hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and loader.mixup_enabled:
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

