"""Reusable measuring helpers for the benchmarks (parameters, step time, peak memory, throughput, FLOPs).

API (all functions take plain callables, so they work for any network or op):

    count_parameters(model, trainable_only=False) -> int
    total_loss(output) -> Tensor
        scalar stand-in loss: sum of the means of a tensor or of every tensor in a list/tuple
        (deep-supervision outputs).
    make_train_step(model, x, loss_fn=total_loss, optimizer=None) -> fn()
        one forward + backward (+ optimizer.step() if given); gradients are zeroed (set to None)
        first, so repeated calls measure a steady-state training step.
    make_inference_step(model, x) -> fn()
        one forward under torch.no_grad() in eval mode (turn deep supervision off yourself:
        ``model.decoder.deep_supervision = False`` for nnU-Net networks).
    median_time(fn, repeats=5, warmup=1, device=None) -> float
        median wall time of fn() in seconds (CUDA: synchronised before and after each call).
    throughput(fn, items_per_call=1, repeats=5, warmup=1, device=None) -> float
        items per second = items_per_call / median_time (e.g. sliding-window patches per second).
    flops(fn) -> int
        floating point operations of one fn() call counted by ``torch.utils.flop_counter.FlopCounterMode``
        (forward AND backward when fn is a train step). Counts only ops with a registered formula
        (convolutions, matmul/bmm/einsum, attention); e.g. ``grid_sample``, ``torchvision::deform_conv2d``,
        norms and activations count 0.
    peak_memory(fn, device=None) -> PeakMemory(bytes, method)
        extra memory at the peak of one fn() call, above what was allocated/resident before it.
        CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call (tensors
        only, not the caching allocator's reserve). CPU: Linux resident-set high-water mark: the
        process's peak RSS (``VmHWM``) is reset to the current RSS by writing 5 to
        ``/proc/self/clear_refs``, fn() runs, then ``VmHWM - VmRSS_before``. If the reset is not
        permitted it falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` minus the RSS before,
        which is only right in a fresh process whose earlier peak was lower (the ``method`` says which).
        Includes everything the process touches (allocator caches, oneDNN scratch), not only tensors.
    run_in_fresh_process(target, *args, **kwargs) -> result
        runs ``target(*args, **kwargs)`` in a newly spawned Python process and returns its (picklable)
        result; use it to isolate memory measurements from each other. ``target`` must be importable
        (a top-level function of a module or of a script guarded by ``if __name__ == "__main__"``).
    fmt_bytes(n) -> str

Typical use (one case per fresh process):

    def case(kind):                     # top-level in the benchmark script
        model, x = build(kind)
        step = make_train_step(model, x)
        mem = peak_memory(step)         # first: measures the first step from a clean state
        t = median_time(step)
        return mem, t
    mem, t = run_in_fresh_process(case, "lfam")
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["PeakMemory", "count_parameters", "total_loss", "make_train_step", "make_inference_step",
           "median_time", "throughput", "flops", "peak_memory", "run_in_fresh_process", "fmt_bytes"]


@dataclass
class PeakMemory:
    bytes: int
    method: str


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def total_loss(output: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float().mean()
    return sum(o.float().mean() for o in output)


def make_train_step(model: nn.Module, x: torch.Tensor, loss_fn: Callable = total_loss,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], None]:
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
    return step


def make_inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model.eval()

    def step():
        with torch.no_grad():
            return model(x)
    return step


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(fn: Callable[[], Any], items_per_call: int = 1, repeats: int = 5, warmup: int = 1,
               device=None) -> float:
    return items_per_call / median_time(fn, repeats, warmup, device)


def flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device=None) -> PeakMemory:
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device) - base,
                          "torch.cuda.max_memory_allocated - allocated before")
    rss_before = _proc_status_kb("VmRSS")
    if _reset_hwm():
        fn()
        return PeakMemory(max(0, _proc_status_kb("VmHWM") - rss_before) * 1024,
                          "CPU peak RSS (VmHWM reset via /proc/self/clear_refs) - RSS before")
    fn()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return PeakMemory(max(0, peak_kb - rss_before) * 1024,
                      "CPU ru_maxrss - RSS before (valid in a fresh process only)")


def run_in_fresh_process(target: Callable, *args, **kwargs):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(target, args, kwargs)


def fmt_bytes(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"
