"""tools/demo.py shows each stage's progress: the lines train_kd.py logs, turned into console lines."""
import logging
import os
import sys

import torch

from runtime.metrics import StepTimer, log_train_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools'))
import demo  # noqa: E402


def _train_line(caplog, epoch, update_idx, updates):
    """A real training log line (runtime.metrics.log_train_step)."""
    timer = StepTimer(0, 10 * updates, 1)
    timer.start_epoch()
    timer.samples = 8
    timer.data_ready()
    timer.update_done()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='train'):
        log_train_step(epoch, update_idx, updates, update_idx + 1, {'loss': 1.25, 'loss_kd': 0.5}, opt, timer)
    return caplog.records[-1].getMessage()


def test_progress_from_real_log_lines(caplog):
    p = demo.Progress('teacher', epochs=2)
    first = p.feed(_train_line(caplog, 0, 0, 100))
    assert first is not None and not first[1]
    text = first[0]
    assert 'teacher: epoch 1/2' in text and '1%' in text and 'loss 1.2500' in text and 'ETA epoch' in text \
        and 'stage' in text
    assert p.feed(_train_line(caplog, 0, 10, 100)) is None  # same quarter of the epoch: not repeated in a log file
    assert 'epoch 1/2  50%' in p.feed(_train_line(caplog, 0, 49, 100))[0]
    assert 'epoch 2/2' in p.feed(_train_line(caplog, 1, 0, 100))[0]
    val = 'Test: Loss: 0.4123  Acc@1: 84.560  Acc@5: 99.100  (10000 images, 3.1s)'
    assert p.feed(val) == ('  teacher: validation top-1 84.56', False)
    assert p.feed('Model scalekd_demo_vit created, param count: 0.45 M') is None
    tty = demo.Progress('student', epochs=1, tty=True)  # on a terminal every step, rewritten in place
    assert tty.feed(_train_line(caplog, 0, 0, 100))[1] and tty.feed(_train_line(caplog, 0, 1, 100))[1]
