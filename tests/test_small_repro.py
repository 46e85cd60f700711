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
    report = (out / 'report.md').read_text()
    assert '| scalekd_demo_resnet |' in report and 'scalekd gain' in report
    for png in ('top1_per_epoch.png', 'scalekd_terms.png'):
        assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
