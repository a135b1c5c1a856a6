"""``keep_freed_memory``: after it, the training steps of a small network page-fault a fraction of the memory they
do with glibc's defaults. Each measurement runs in a fresh process (``run_in_fresh_process``, which sets it unless
``keep_memory=False``), so that this one keeps glibc's defaults."""
import platform
import resource

import pytest
import torch

from nnunet_ext.evaluation.measure import run_in_fresh_process
from nnunet_ext.training import cpu_memory


def page_faults_of_twelve_training_steps() -> int:
    """Minor page faults of twelve training steps of a small 2D network (16 channels, 4 x 256^2), after three. With
    memory kept, a step occasionally still grows the heap by one map (4096 pages); with glibc's defaults every step
    faults 10-20 thousand pages, so twelve steps keep the two far apart."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.InstanceNorm2d(16), torch.nn.LeakyReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.InstanceNorm2d(16), torch.nn.LeakyReLU())
    x = torch.randn(4, 1, 256, 256)

    def step():
        net.zero_grad()
        net(x).square().mean().backward()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(12):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    assert run_in_fresh_process(cpu_memory.keep_freed_memory, keep_memory=False) is True
    faults_kept = run_in_fresh_process(page_faults_of_twelve_training_steps)
    faults_default = run_in_fresh_process(page_faults_of_twelve_training_steps, keep_memory=False)
    assert faults_default > 10_000  # 16-channel 4 x 256^2 maps: mapped afresh at every step by default
    assert faults_kept < faults_default / 4


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_memory.DISABLE_VARIABLE, "0")
    assert cpu_memory.keep_freed_memory() is False
