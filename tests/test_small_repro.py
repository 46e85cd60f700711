"""experiments/small_repro.py --quick: the whole pipeline on tiny real Fashion-MNIST subsets."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = '/usr/share/datasets/fashion-mnist'


@pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')),
                    reason='Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)')
def test_small_repro_quick(tmp_path):
    out = tmp_path / 'repro'
    subprocess.check_call([sys.executable, 'experiments/small_repro.py', '--quick', '--out', str(out),
                           '--workers', '0'], cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(out / 'small_repro.json') as f:
        res = json.load(f)
    assert 0 <= res['teacher']['top1'] <= 100
    for student in ('scalekd_demo_resnet', 'scalekd_demo_mixer'):
        for method in ('none', 'kd', 'scalekd'):
            r = res['students'][student][method]
            assert len(r['top1']) == 1 and r['mean'] == r['top1'][0]
    # the feature weights are chosen on a tuning split carved from the training images, not on the reported split
    tuning = res['tuning']
    assert set(tuning['tune_top1']) == {'paper', 'recipe'} and tuning['chosen'] in tuning['tune_top1']
    for by_student in tuning['tune_top1'].values():
        assert all(len(v) == 1 and 0 <= v[0] <= 100 for v in by_student.values())
    assert sorted(os.listdir(out / 'data' / 'student_10_val10_tune5')) == ['train', 'tune', 'validation']
    train = {f for _, _, fs in os.walk(out / 'data' / 'student_10_val10_tune5' / 'train') for f in fs}
    tune = {f for _, _, fs in os.walk(out / 'data' / 'student_10_val10_tune5' / 'tune') for f in fs}
    assert len(train) == 100 and len(tune) == 50 and not train & tune
    report = (out / 'report.md').read_text()
    assert '| scalekd_demo_resnet |' in report and 'scalekd gain' in report
    for png in ('top1_per_epoch.png', 'scalekd_terms.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
