"""Resume across a change of visible GPUs or of world size (runtime/rng.py, runtime/resume.py): never an IndexError.

CUDA is faked on the CPU: ``FakeCuda`` stands in for torch.cuda's device count, current device and per-device
generator states, and raises IndexError for a device that does not exist, as ``torch.cuda.default_generators[i]``
does on a real machine.
"""
import logging

import pytest
import torch

import runtime.rng as rng
from runtime.resume import EpochPosition, load_state_extras


class FakeCuda:
    def __init__(self, monkeypatch, count, current):
        self.count, self.current = count, current
        self.states = {i: torch.tensor([100 + i], dtype=torch.uint8) for i in range(count)}
        for module in (torch.cuda, torch.cuda.random):  # torch.cuda.random calls its own names
            monkeypatch.setattr(module, 'device_count', lambda: self.count)
            monkeypatch.setattr(module, 'current_device', lambda: self.current)
            monkeypatch.setattr(module, 'get_rng_state', self.get)
            monkeypatch.setattr(module, 'set_rng_state', self.set)
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(rng, '_warned', set(), raising=False)  # warn-once memory of this test

    def visible(self, count, current):
        """The next process sees ``count`` devices and runs on ``current``."""
        self.count, self.current = count, current
        self.states = {i: torch.tensor([200 + i], dtype=torch.uint8) for i in range(count)}

    def _index(self, device):
        index = device if isinstance(device, int) else torch.device(device).index
        index = self.current if index is None else index
        if not 0 <= index < self.count:
            raise IndexError('tuple index out of range')  # torch.cuda.default_generators[index]
        return index

    def get(self, device='cuda'):
        return self.states[self._index(device)].clone()

    def set(self, state, device='cuda'):
        self.states[self._index(device)] = state.clone()


def _cpu_state():
    return {k: v for k, v in rng.get_rng_state().items() if k in ('python', 'numpy', 'torch')}


def test_cuda_states_of_8_gpus_restore_where_a_process_sees_1(monkeypatch, caplog):
    """torchrun on 8 visible GPUs (rank 5 on cuda:5), resumed under srun --gpus-per-task=1 (cuda:0 only)."""
    cuda = FakeCuda(monkeypatch, count=1, current=0)
    saved = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    rng.set_rng_state(dict(_cpu_state(), cuda=saved, cuda_device=5))
    rng.set_rng_state(dict(_cpu_state(), cuda=saved, cuda_device=5))
    assert cuda.states == {0: saved[5]}
    warnings = [r.getMessage() for r in caplog.records if 'CUDA RNG states' in r.getMessage()]
    assert warnings == ["CUDA RNG states were saved by a process that saw 8 GPU(s); this process sees 1: cuda:0 "
                        "continues the saved stream of cuda:5; GPU-side random ops (dropout, drop-path, random "
                        "erasing on the GPU) are not guaranteed bit-exact after this resume. Resume with the same "
                        "visible GPUs per process for an exact continuation"]
    # the public function, for any saved list (e.g. a student's own stream): one saved GPU, resumed on cuda:3 of 8
    cuda.visible(8, 3)
    rng.set_cuda_rng_states(saved[:1], 0)
    assert cuda.states[3] == saved[0] and cuda.states[0] == saved[0] and cuda.states[1] == 201


def test_the_same_visible_gpus_restore_every_device_by_index_without_a_warning(monkeypatch, caplog):
    cuda = FakeCuda(monkeypatch, count=4, current=2)
    saved = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]
    rng.set_rng_state(dict(_cpu_state(), cuda=saved, cuda_device=2))
    assert cuda.states == dict(enumerate(saved)) and 'CUDA RNG states' not in caplog.text


def test_a_recovery_checkpoint_of_8_gpus_resumes_mid_epoch_on_1(monkeypatch, tmp_path, caplog):
    """Written by rank 0 of a torchrun whose processes saw 8 GPUs (this one on cuda:5), read back weights-only and
    replayed by ``EpochPosition.skip`` in a process that sees 1: its GPU continues cuda:5's saved streams."""
    cuda = FakeCuda(monkeypatch, count=8, current=5)
    position = EpochPosition()
    position.batch_done()  # the state before the loader's last fetch
    prev5 = cuda.states[5]
    cuda.states[5] = torch.tensor([55], dtype=torch.uint8)  # the GPU stream moves on during the step
    path = str(tmp_path / 'recovery-0-3.pth.tar')
    torch.save(dict(state_dict={}, epoch=0, run_state=dict(batch_idx=3, **position.rng_states(False))), path)

    cuda.visible(1, 0)
    extras = load_state_extras(path, {}, rank=0, world_size=1)
    resumed = EpochPosition(4, extras)
    assert resumed.skip(0) and resumed.skip(1)
    assert resumed.skip(2) and cuda.states == {0: prev5}
    assert resumed.skip(3) and cuda.states == {0: torch.tensor([55], dtype=torch.uint8)}
    assert not resumed.skip(4) and 'saw 8 GPU(s); this process sees 1: cuda:0 continues' in caplog.text
    assert extras['rng']['cuda_device'] == 5 and extras['rng_prev']['cuda_device'] == 5


def test_a_checkpoint_without_the_device_maps_a_rank_to_torchruns_device():
    """Saved before ``cuda_device`` was recorded: rank 13 of 8-GPU nodes ran on cuda:5 (LOCAL_RANK)."""
    saved = rng.capture_rng_state(_cpu_state())
    saved['cuda'] = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    assert rng.rng_from_tensors(saved, rank=13)['cuda_device'] == 5


def test_a_mid_epoch_checkpoint_of_fewer_processes_warns_and_gives_the_extra_ranks_no_state(tmp_path, caplog):
    """Written mid-epoch by 2 processes, resumed by 4: ranks 2 and 3 get no saved state (no IndexError) and go on
    from their seeded streams; every rank warns that this is not an exact resume."""
    caplog.set_level(logging.WARNING, logger='train')
    states = [rng.capture_rng_state(_cpu_state()) for _ in range(2)]
    states[1]['torch'] = torch.zeros_like(states[1]['torch'])
    path = str(tmp_path / 'recovery-0-3.pth.tar')
    torch.save(dict(state_dict={}, epoch=0, run_state=dict(batch_idx=3, rng=states, rng_prev=states)), path)
    for rank in range(4):
        extras = load_state_extras(path, {}, rank=rank, world_size=4)
        if rank < 2:
            assert torch.equal(extras['rng']['torch'], states[rank]['torch'])
        else:
            assert extras['rng'] is None and extras['rng_prev'] is None
            before = torch.get_rng_state()
            position = EpochPosition(4, extras)
            assert all(position.skip(b) for b in range(4)) and torch.equal(torch.get_rng_state(), before)
    assert caplog.text.count("was written mid-epoch by 2 process(es), resumed by 4: the rest of the epoch sees "
                             "another split of the data") == 4


@pytest.fixture(autouse=True)
def _keep_rng():
    """These tests set the process's RNG states; put them back."""
    state = _cpu_state()
    yield
    rng.set_rng_state(state)
