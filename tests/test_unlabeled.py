"""Distillation on images without labels: --unlabeled-data joins them to training (the label loss skips them, every
distillation term covers them), --labels none reads no label at all; labels are never invented."""
import logging
import os
import shutil
import signal

import pytest
import torch

import models  # noqa: F401
import train_kd
from conftest import load_ckpt as _load, make_image_folder, state_hash as _hash, summary_rows as _rows
from runtime.unlabeled import LabelFastCollateMixup, LabelledOnly, LabelMixup, UNLABELED, keep_labels


@pytest.fixture
def unlabeled(tmp_path):
    """16 images in a nested layout whose folders are not classes."""
    return make_image_folder(tmp_path / 'unl', classes=2, per_class=4, splits=('a', 'b/c'), seed=5)


def _argv(data, teacher, out, exp, *extra, distiller='kd'):
    return ['--data-dir', data, '--model', 'scalekd_demo_resnet', '--distiller', distiller, '--teacher',
            'scalekd_demo_vit', '--teacher-checkpoint', teacher, '-b', '6', '--epochs', '1', '-j', '0', '--lr', '0.01',
            '--warmup-epochs', '0', '--log-interval', '1', '--no-plot', '--output', str(out), '--experiment', exp,
            '--loss-balance-factor', '0', *extra]


# --- the label mark through Mixup / CutMix, and the label loss ---------------------------------------------------
def test_a_mixed_sample_keeps_a_label_only_if_every_image_in_it_has_one():
    has = torch.tensor([True, True, False, True])
    assert keep_labels(has, 1.).tolist() == [True, True, False, True]  # not mixed
    assert keep_labels(has, 0.7).tolist() == [True, False, False, True]  # i mixed with 3 - i
    per_sample = torch.tensor([[1.], [0.6], [1.], [0.6]])
    assert keep_labels(has, per_sample).tolist() == [True, False, False, True]
    # timm's Mixup, batch mode: the images are mixed exactly as timm mixes them; the unlabeled mark survives
    torch.manual_seed(0)
    x, target = torch.rand(4, 3, 8, 8), torch.tensor([0, 2, UNLABELED, 1])
    mix = LabelMixup(mixup_alpha=1.0, prob=1.0, num_classes=3, label_smoothing=0.)
    x_ref = x.clone()
    out, soft = mix(x.clone(), target)
    lam = float((out[0] - x_ref[3]).flatten()[0] / (x_ref[0] - x_ref[3]).flatten()[0])
    assert torch.allclose(out, x_ref * lam + x_ref.flip(0) * (1 - lam), atol=1e-5)
    assert (soft[1] == UNLABELED).all() and (soft[2] == UNLABELED).all()
    assert torch.allclose(soft[0], torch.tensor([lam, 1 - lam, 0.]), atol=1e-4)
    assert torch.allclose(soft[3], torch.tensor([1 - lam, lam, 0.]), atol=1e-4)
    # the prefetcher's collate: the same rule
    batch = [(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), t) for t in (0, 2, UNLABELED, 1)]
    img, soft = LabelFastCollateMixup(mixup_alpha=1.0, prob=1.0, num_classes=3, label_smoothing=0.)(batch)
    assert img.shape == (4, 3, 8, 8) and (soft[1] == UNLABELED).all() and (soft[2] == UNLABELED).all()
    assert (soft[0] >= 0).all() and torch.allclose(soft[0].sum(), torch.tensor(1.))


def test_the_label_loss_is_the_mean_over_labelled_samples_only():
    ce = torch.nn.CrossEntropyLoss()
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, UNLABELED, 2, UNLABELED])
    loss = LabelledOnly(ce)(logits, target)
    assert torch.allclose(loss, ce(logits[[0, 2]], target[[0, 2]]))
    loss.backward()
    assert (logits.grad[[1, 3]] == 0).all() and (logits.grad[[0, 2]] != 0).any()
    none = LabelledOnly(ce)(logits, torch.full((4,), UNLABELED))
    assert none.item() == 0 and none.requires_grad  # a batch without labels: zero, with a gradient path
    assert LabelledOnly(ce, labels=False)(logits, torch.tensor([0, 1, 2, 0])).item() == 0  # --labels none


# --- runs ---------------------------------------------------------------------------------------------------------
def test_an_unlabeled_image_never_reaches_the_label_loss(image_folder, teacher_ckpt, unlabeled, tmp_path, one_thread,
                                                         monkeypatch):
    """Every sample the student's label loss sees has a real label: 12 labelled + 16 unlabeled images, 4 batches of
    6 (the incomplete last batch dropped); the wrapped loss sees exactly each batch's labelled samples."""
    seen, reached = [], []
    orig = LabelledOnly.forward

    def spy(self, logits, target):
        if not getattr(self, 'spied', False):  # what reaches the wrapped label loss
            self.criterion.register_forward_pre_hook(lambda module, inputs: reached.append(inputs[1].clone()))
            self.spied = True
        keep = target >= 0
        seen.append((int(keep.sum()), int((~keep).sum()), target[keep].tolist()))
        return orig(self, logits, target)
    monkeypatch.setattr(LabelledOnly, 'forward', spy)
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'u', '--unlabeled-data', unlabeled)) == 0
    assert len(seen) == 4
    labelled = sum(s[0] for s in seen)
    assert sum(s[0] + s[1] for s in seen) == 24 and 0 < labelled <= 12 and sum(s[1] for s in seen) >= 12
    assert [len(t) for t in reached] == [s[0] for s in seen if s[0]]  # the inner loss saw only the labelled ones
    assert all((t >= 0).all() for t in reached)
    assert all(0 <= t < 3 for s in seen for t in s[2])


def test_teacher_only_run_is_bit_identical_with_permuted_training_labels(image_folder, teacher_ckpt, tmp_path,
                                                                        one_thread):
    """--labels none reads no label: a class map that permutes the training labels changes nothing (it changes a
    run with labels)."""
    permuted = tmp_path / 'permuted.txt'
    permuted.write_text('class2\nclass0\nclass1\n')  # class2 -> 0, class0 -> 1, class1 -> 2
    val = ('--val-split', '')
    runs = {}
    for labels in ('none', 'folders'):
        for name, extra in (('plain', ()), ('permuted', ('--class-map', str(permuted)))):
            exp = f'{labels}-{name}'
            assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, exp, '--labels', labels, *val,
                                       *extra)) == 0
            runs[exp] = _hash(_load(tmp_path / exp / 'last.pth.tar')['state_dict'])
    assert runs['none-plain'] == runs['none-permuted']
    assert runs['folders-plain'] != runs['folders-permuted']  # the permutation does reach a run that reads labels


def test_no_labels_at_all_and_an_unlabeled_validation_split(teacher_ckpt, tmp_path, one_thread, caplog):
    """A train split of images without class folders trains from the teacher alone (--labels none chosen by
    itself, the class count from the teacher's head); a validation split without class folders validates by
    agreement and KL, and model_best is chosen on agreement."""
    data = tmp_path / 'flat'
    make_image_folder(tmp_path / 'src', classes=3, per_class=4)
    for split in ('train', 'validation'):  # the images of every class in one folder
        os.makedirs(data / split)
        for i, p in enumerate(sorted((tmp_path / 'src' / split).rglob('*.png'))):
            shutil.copy(p, data / split / f'{i}.png')
    caplog.set_level(logging.INFO)
    assert train_kd.main(_argv(str(data), teacher_ckpt, tmp_path, 'flat', '--epochs', '2')) == 0
    assert 'holds images but no class folders: training without labels' in caplog.text
    assert '3 classes from the teacher\'s head' in caplog.text
    rows = _rows(tmp_path / 'flat')
    assert 'eval_top1' not in rows[0] and float(rows[0]['eval_agree_top1']) >= 0
    best = _load(tmp_path / 'flat' / 'model_best.pth.tar')
    assert best['metric'] == max(float(r['eval_agree_top1']) for r in rows)
    # the no-teacher baseline has nothing to learn from such a split: refused before step 0
    caplog.clear()
    argv = _argv(str(data), teacher_ckpt, tmp_path, 'none', distiller='none')
    argv = [a for a in argv if a not in ('--teacher', 'scalekd_demo_vit', '--teacher-checkpoint', teacher_ckpt)]
    assert train_kd.main(argv) == 2 and '--labels none needs a teacher' in caplog.text


@pytest.mark.parametrize('case', ['missing', 'empty', 'no images', 'unreadable'])
def test_a_bad_unlabeled_folder_stops_before_step_0(case, image_folder, teacher_ckpt, tmp_path, caplog):
    bad = tmp_path / 'bad'
    if case != 'missing':
        os.makedirs(bad / 'sub')
    if case == 'no images':
        (bad / 'sub' / 'notes.txt').write_text('not an image')
    if case == 'unreadable':
        for i in range(3):
            (bad / 'sub' / f'{i}.jpg').write_bytes(b'\xff\xd8 truncated')
    rc = train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'run', '--unlabeled-data', str(bad)))
    assert rc == 2 and f"'{bad}'" in caplog.text
    assert not os.path.exists(tmp_path / 'run' / 'args.yaml')


def test_none_refuses_images_without_labels(image_folder, unlabeled, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_kd.main(['--data-dir', image_folder, '--model', 'scalekd_demo_resnet', '--unlabeled-data', unlabeled,
                       '--output', str(tmp_path)])
    assert e.value.code == 2 and '--unlabeled-data needs a teacher' in capsys.readouterr().err


def test_resume_mid_epoch_with_unlabeled_data_equals_an_uninterrupted_run(image_folder, teacher_ckpt, unlabeled,
                                                                          tmp_path, one_thread, monkeypatch):
    extra = ('--unlabeled-data', unlabeled, '--epochs', '2', '--mixup', '0.4', '--drop-path', '0.1',
             '--recovery-interval', '1', '--sched-on-updates')
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'ref', *extra)) == 0
    calls, real = [], train_kd.stop_requested

    def stop(distributed, device):
        calls.append(1)
        if len(calls) == 4:  # the first update of epoch 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real(distributed, device)
    monkeypatch.setattr(train_kd, 'stop_requested', stop)
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'run', *extra)) == 75
    monkeypatch.setattr(train_kd, 'stop_requested', real)
    assert train_kd.main(_argv(image_folder, teacher_ckpt, tmp_path, 'run', *extra, '--resume', 'auto')) == 0
    a, b = _load(tmp_path / 'ref' / 'last.pth.tar'), _load(tmp_path / 'run' / 'last.pth.tar')
    assert _hash(a['state_dict']) == _hash(b['state_dict'])
    cols = lambda rows: [{k: v for k, v in r.items() if k.startswith(('train_loss', 'eval_'))} for r in rows]
    assert cols(_rows(tmp_path / 'run')) == cols(_rows(tmp_path / 'ref'))


def test_the_funmatch_recipe_is_kl_only_with_mixup_on_every_batch_and_no_labels():
    from config import load_recipe
    parser = train_kd.build_parser()
    parser.set_defaults(**load_recipe(os.path.join(os.path.dirname(__file__), '..', 'recipes',
                                                   'funmatch_swinl_r50.yaml'), parser))
    args = parser.parse_args([])
    assert (args.distiller, args.labels, args.kd_temperature) == ('kd', 'none', 1.0)
    assert (args.mixup, args.mixup_prob, args.cutmix, args.smoothing) == (1.0, 1.0, 0.0, 0.0)
    assert args.epochs == 1200 and args.opt == 'adamw' and args.clip_grad == 1.0
    assert train_kd.unlabeled_problem(args) == ''


def test_joint_runs_and_the_dry_run_take_unlabeled_data(image_folder, teacher_ckpt, unlabeled, tmp_path, one_thread,
                                                        caplog):
    argv = _argv(image_folder, teacher_ckpt, tmp_path, 'j', '--unlabeled-data', unlabeled, '--mixup', '0.5')
    argv[argv.index('--model') + 1], argv[argv.index('--distiller') + 1] = \
        'scalekd_demo_resnet,scalekd_demo_mixer', 'kd,scalekd'
    assert train_kd.main(argv + ['--dry-run']) == 0 and not os.path.exists(tmp_path / 'j')
    assert train_kd.main(argv) == 0
    for sub in ('scalekd_demo_resnet-kd', 'scalekd_demo_mixer-scalekd'):
        row = _rows(tmp_path / 'j' / sub)[0]
        assert float(row['train_loss_cls']) > 0 and float(row['train_loss_kd']) > 0 and row['eval_top1']


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_label_mixup_equals_timms_mixup_on_a_labelled_batch(mode):
    """With every sample labelled, LabelMixup and LabelFastCollateMixup give timm's own Mixup / FastCollateMixup
    output bit for bit (images and soft targets), from the same random state."""
    from timm.data import FastCollateMixup, Mixup
    kw = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode=mode, num_classes=5,
              label_smoothing=0.1)
    x, target = torch.rand(6, 3, 16, 16), torch.tensor([0, 4, 2, 1, 3, 2])
    import numpy as np
    for seed in range(4):  # mixup and cutmix draws both
        np.random.seed(seed)
        ours = LabelMixup(**kw)(x.clone(), target)
        np.random.seed(seed)
        theirs = Mixup(**kw)(x.clone(), target)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        batch = [(torch.randint(0, 255, (3, 16, 16), dtype=torch.uint8), int(t)) for t in target]
        np.random.seed(seed)
        copy = lambda: [(img.clone(), t) for img, t in batch]  # timm's pair mode writes into the samples
        ours = LabelFastCollateMixup(**kw)(copy())
        np.random.seed(seed)
        theirs = FastCollateMixup(**kw)(copy())
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_aug_splits_without_the_prefetcher_lay_out_as_timms_fast_collate():
    """--aug-splits without the prefetcher: the splits concatenated and the targets repeated, the layout timm's
    fast_collate gives the prefetcher path."""
    import argparse as ap
    from timm.data.loader import fast_collate
    from runtime.loaders import device_batch
    samples = [((torch.full((3, 4, 4), i, dtype=torch.uint8), torch.full((3, 4, 4), 10 + i, dtype=torch.uint8)), i)
               for i in range(3)]
    timm_input, timm_target = fast_collate(samples)
    default = torch.utils.data.default_collate([((a.float(), b.float()), t) for (a, b), t in samples])
    args = ap.Namespace(prefetcher=False, channels_last=False)
    input, target = device_batch(list(default[0]), default[1], args, torch.device('cpu'))
    assert torch.equal(input, timm_input.float()) and torch.equal(target, timm_target)
