"""Cost of trainers' networks on one plan, as ratios to nnU-Net's default network measured in the same run.

Every network is built by its trainer's ``build_network_architecture`` from the plan (as ``nnUNetv2_train`` and
``nnUNetv2_predict`` build it) and measured in a fresh process (``nnunet_ext.evaluation.measure``): parameters,
forward+backward FLOPs, median training-step time (forward + backward of the deep-supervision outputs with a stand-in
loss), peak tensor and resident memory of one step, and sliding-window throughput (batch-1 forwards without
gradients, deep supervision off, as ``nnUNetv2_predict`` runs them). ``nnUNetTrainer`` is always measured first and
is the denominator of the ratios. Trainers are found in the registry, else among nnU-Net's own trainers.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from nnunet_ext.evaluation.measure import (count_parameters, flops, fmt_bytes, make_inference_step, make_train_step,
                                           median_time, peak_memory, run_in_fresh_process, throughput)

BASELINE = "nnUNetTrainer"
# (column title, key of the result, formatter)
COST_ROWS = (("parameters", "parameters", lambda v: f"{v:,}"),
             ("fwd+bwd GFLOPs", "flops", lambda v: f"{v / 1e9:.2f}"),
             ("train step (median s)", "step_s", lambda v: f"{v:.3f}"),
             ("peak tensor memory", "memory", fmt_bytes),
             ("peak RSS, train step", "rss", fmt_bytes),
             ("inference patches/s", "patches_per_s", lambda v: f"{v:.2f}"))


def trainer_class(name: str):
    """A registered trainer, or one of nnU-Net's own (found as ``nnUNetv2_train`` finds it)."""
    from nnunet_ext.training.registry import TRAINERS
    if name in TRAINERS:
        return TRAINERS[name]
    from os.path import join

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    found = recursive_find_python_class(join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                        "nnunetv2.training.nnUNetTrainer")
    if found is None:
        raise KeyError(f"unknown trainer {name!r}: neither registered in nnunet_ext nor one of nnU-Net's")
    return found


def build_network(trainer_name: str, plans: dict, configuration: str, input_channels: int, num_classes: int):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    torch.manual_seed(0)
    return trainer_class(trainer_name).build_network_architecture(
        plans_manager, plans_manager.get_configuration(configuration), input_channels, num_classes, True)


def set_deep_supervision(network: torch.nn.Module, enabled: bool) -> None:
    """As ``nnUNetExtTrainer.set_deep_supervision_enabled``: the decoder's flag, else the network's."""
    decoder = getattr(network, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled
    else:
        network.deep_supervision = enabled


def measure_network(trainer_name: str, plans: dict, configuration: str, input_channels: int, num_classes: int,
                    batch: int, device: str, repeats: int) -> dict:
    """All numbers of one trainer's network (call it in a fresh process: ``run_in_fresh_process``)."""
    model = build_network(trainer_name, plans, configuration, input_channels, num_classes).to(device)
    patch = plans["configurations"][configuration]["patch_size"]
    x = torch.randn(batch, input_channels, *patch, device=device)
    train_step = make_train_step(model, x)
    memory = peak_memory(train_step, device)
    result = {"parameters": count_parameters(model), "flops": flops(train_step),
              "step_s": median_time(train_step, repeats=repeats, device=device),
              "memory": memory.bytes, "rss": memory.rss_bytes}
    set_deep_supervision(model, False)
    result["patches_per_s"] = throughput(make_inference_step(model, x[:1]), repeats=repeats, device=device)
    return result


def measure_trainers(trainer_names: List[str], plans: dict, configuration: str, input_channels: int = 1,
                     num_classes: int = 2, batch: int = 2, device: str = "cpu", repeats: int = 3) -> Dict[str, dict]:
    """``nnUNetTrainer`` and every trainer in ``trainer_names``, each in a fresh process, in one run."""
    return {name: run_in_fresh_process(measure_network, name, plans, configuration, input_channels, num_classes,
                                       batch, device, repeats)
            for name in [BASELINE] + [n for n in trainer_names if n != BASELINE]}


def cost_table(results: Dict[str, dict]) -> List[List[str]]:
    """Rows ``[trainer, value (ratio), ...]`` in the order of ``COST_ROWS``, ratios to ``nnUNetTrainer``."""
    base = results[BASELINE]
    rows = []
    for name, values in results.items():
        cells = [name]
        for _, key, fmt in COST_ROWS:
            if values.get(key) is None or not base.get(key):
                cells.append("n/a")
            else:
                cells.append(f"{fmt(values[key])} ({values[key] / base[key]:.2f}x)")
        rows.append(cells)
    return rows
