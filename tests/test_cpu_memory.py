"""``keep_freed_memory``: after it, the training steps of a small network page-fault a fraction of the memory they
do with glibc's defaults; each measurement in a fresh process, so that this one keeps glibc's defaults."""
import platform
import subprocess
import sys

import pytest

from nnunet_ext.training import cpu_memory

STEPS = """
import resource, sys, torch
from nnunet_ext.training.cpu_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
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
for _ in range(6):
    step()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_six_steps(setting: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", STEPS, setting], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    kept, faults_kept = page_faults_of_six_steps("keep")
    _, faults_default = page_faults_of_six_steps("default")
    assert kept
    assert faults_default > 10_000  # 16-channel 4 x 256^2 maps: mapped afresh at every step by default
    assert faults_kept < faults_default / 4


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_memory.DISABLE_VARIABLE, "0")
    assert cpu_memory.keep_freed_memory() is False
