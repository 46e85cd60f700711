"""timm's dataset kinds in a distillation run, offline: a local Hugging Face dataset (parquet files, read as
--dataset hfds/PATH) and local webdataset shards (--dataset wds/NAME), with --input-key / --target-key; and the
checks and start-up notes of what the project can guarantee for them."""
import csv
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

import train_kd


def _png(c, i):
    rng = np.random.RandomState(c * 100 + i)
    arr = (rng.rand(32, 32, 3) * 128 + c * 40).clip(0, 255).astype('uint8')
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format='PNG')
    return buf.getvalue()


def make_parquet_dataset(root, classes=3, per_class=4):
    """root/{train,validation}-00000-of-00001.parquet with columns 'img' (Image) and 'y' (ClassLabel)."""
    import datasets
    os.makedirs(root, exist_ok=True)
    names = [f'c{c}' for c in range(classes)]
    for split in ('train', 'validation'):
        rows = [(_png(c, i), c) for c in range(len(names)) for i in range(per_class)]
        features = datasets.Features({'img': datasets.Image(), 'y': datasets.ClassLabel(names=names)})
        ds = datasets.Dataset.from_dict({'img': [{'bytes': b, 'path': None} for b, _ in rows],
                                         'y': [c for _, c in rows]}, features=features)
        ds.to_parquet(os.path.join(root, f'{split}-00000-of-00001.parquet'))
    return str(root)


def make_wds_shards(root, classes=3, per_class=4):
    """root/{train,validation}-00000{0,1}.tar (a .png and a .json {"label": c} per sample) and root/_info.json."""
    os.makedirs(root, exist_ok=True)
    info = {'name': 'tiny', 'splits': {}}
    for split in ('train', 'validation'):
        samples = [(f'{split}_{c}_{i}', c, _png(c, i)) for c in range(classes) for i in range(per_class)]
        names, lengths = [], []
        for shard in range(2):
            name = f'{split}-{shard:06d}.tar'
            part = samples[shard::2]
            with tarfile.open(os.path.join(root, name), 'w') as tar:
                for key, c, png in part:
                    for ext, data in (('png', png), ('json', json.dumps({'label': c}).encode())):
                        ti = tarfile.TarInfo(f'{key}.{ext}')
                        ti.size = len(data)
                        tar.addfile(ti, io.BytesIO(data))
            names.append(name)
            lengths.append(len(part))
        info['splits'][split] = dict(name=split, num_samples=sum(lengths), filenames=names, shard_lengths=lengths)
    with open(os.path.join(root, '_info.json'), 'w') as f:
        json.dump(info, f)
    return str(root)


def _argv(out, exp, teacher_ckpt, *extra):
    return ['--model', 'scalekd_demo_resnet', '-b', '4', '--epochs', '1', '-j', '0', '--output', str(out),
            '--experiment', exp, '--lr', '0.01', '--warmup-epochs', '0', '--log-interval', '1', '--distiller', 'kd',
            '--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt, '--img-size', '32', *extra]


def _summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_hfds_local_parquet_distillation_run(tmp_path, teacher_ckpt, one_thread):
    data = make_parquet_dataset(tmp_path / 'hf')
    argv = _argv(tmp_path / 'out', 'hf', teacher_ckpt, '--dataset', f'hfds/{data}', '--data-dir',
                 str(tmp_path / 'cache'), '--input-key', 'img', '--target-key', 'y')
    assert train_kd.main(argv) == 0
    rows = _summary(tmp_path / 'out' / 'hf' / 'summary.csv')
    assert len(rows) == 1 and float(rows[0]['train_loss_kd']) > 0 and rows[0]['eval_top1'] != ''
    # the class count comes from the dataset's ClassLabel (3), not the model default (10)
    import torch
    with torch.serialization.safe_globals([__import__('argparse').Namespace]):
        ckpt = torch.load(tmp_path / 'out' / 'hf' / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['state_dict']['fc.weight'].shape[0] == 3


def test_hfds_split_size_is_checked(tmp_path, teacher_ckpt, caplog):
    # (a hfds/ dataset has one class list for all its splits, from its features)
    data = make_parquet_dataset(tmp_path / 'hf2')
    argv = _argv(tmp_path / 'out', 'hf2', teacher_ckpt, '--dataset', f'hfds/{data}', '--data-dir',
                 str(tmp_path / 'cache'), '--input-key', 'img', '--target-key', 'y', '-b', '16')
    with caplog.at_level(logging.ERROR):
        assert train_kd.main(argv) == 2
    assert '--batch-size 16 is larger than the train split' in caplog.text


def test_wds_local_shards_distillation_run(tmp_path, teacher_ckpt, caplog, one_thread):
    data = make_wds_shards(tmp_path / 'wds')
    argv = _argv(tmp_path / 'out', 'wds', teacher_ckpt, '--dataset', 'wds/tiny', '--data-dir', data,
                 '--input-key', 'png;jpg', '--target-key', 'label')
    with caplog.at_level(logging.ERROR):  # the class count is not in the shards: refused by name
        assert train_kd.main(argv) == 2
    assert 'pass --num-classes N' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train_kd.main(argv + ['--num-classes', '3']) == 0
    assert 'is an iterable dataset' in caplog.text and '--max-bad-images' in caplog.text  # said at start-up
    rows = _summary(tmp_path / 'out' / 'wds' / 'summary.csv')
    assert len(rows) == 1 and float(rows[0]['train_loss_kd']) > 0 and rows[0]['eval_top1'] != ''


def test_dataset_keys_need_a_dataset_kind_that_has_them(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_kd.main(['--data-dir', str(tmp_path), '--input-key', 'img'])
    assert '--input-key names a field of a hfds/' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # timm's wds reader finds the decoded image only under 'jpg'
        train_kd.main(['--data-dir', str(tmp_path), '--dataset', 'wds/x', '--input-key', 'png'])
    assert "pass --input-key 'png;jpg'" in capsys.readouterr().err
