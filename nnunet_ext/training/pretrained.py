"""``nnUNetv2_train -pretrained_weights`` for networks built around the plan's U-Net.

nnU-Net's ``load_pretrained_weights`` requires every key of the network (segmentation layers aside) in the
checkpoint, so fine-tuning DPC-Net or the LFAM U-Net from a plain nnU-Net model of the same plan fails on the keys
of the modules the method adds. ``load_pretrained_weights`` here keeps nnU-Net's rules for the shared part and
relaxes them for the rest:

- the weights of the adopted encoder and decoder (``PlanUNetWrapper.plan_network_keys``, segmentation layers
  excluded as in nnU-Net) must all be in the checkpoint with the same shapes, else the checkpoint belongs to
  another plan (or network) and loading stops with the keys that differ;
- every other tensor of the checkpoint whose key and shape match is loaded too (a checkpoint of the same method);
- the network's keys the checkpoint lacks (the method's own modules) keep their initialisation and are listed.

Any other network is handed to nnU-Net's own function unchanged. ``nnUNetExtTrainer.initialize`` installs this
function in ``nnunetv2.run.run_training``, whose ``maybe_load_checkpoint`` calls it right after ``initialize``.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.distributed as dist
from torch import nn

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as nnunet_load_pretrained_weights

from nnunet_ext.architectures.plan_network import PlanUNetWrapper, unwrap_network

SKIPPED = ".seg_layers."  # nnU-Net never transfers the segmentation layers (class count may differ)


def load_pretrained_weights(network: nn.Module, checkpoint_file: str, verbose: bool = False,
                            log: Callable[[str], None] = print) -> None:
    module = unwrap_network(network)
    if not isinstance(module, PlanUNetWrapper):
        nnunet_load_pretrained_weights(network, checkpoint_file, verbose)
        return
    device = torch.device("cuda", dist.get_rank()) if dist.is_initialized() else torch.device("cpu")
    pretrained = torch.load(checkpoint_file, map_location=device, weights_only=False)["network_weights"]
    own = module.state_dict()
    shared = [k for k in module.plan_network_keys() if SKIPPED not in k]
    mismatched: List[str] = [f"{k} (missing)" for k in shared if k not in pretrained]
    mismatched += [f"{k} (checkpoint {tuple(pretrained[k].shape)}, network {tuple(own[k].shape)})"
                   for k in shared if k in pretrained and pretrained[k].shape != own[k].shape]
    if mismatched:
        raise RuntimeError(
            f"{checkpoint_file} does not hold the weights of this plan's U-Net ({len(mismatched)} of {len(shared)} "
            f"shared tensors differ, e.g. {', '.join(mismatched[:3])}): it was trained with another plan or "
            f"configuration. Pretrain with the same plans and configuration as the fine-tuning.")
    loaded = {k: v for k, v in pretrained.items() if k in own and SKIPPED not in k and v.shape == own[k].shape}
    own.update(loaded)
    module.load_state_dict(own)
    new = sorted(k for k in own if k not in pretrained)
    log(f"Pretrained weights from {checkpoint_file}: loaded {len(loaded)} tensors (the plan's U-Net: "
        f"{len(shared)}); not in the checkpoint, kept as initialised: {len(new)} tensors of the modules "
        f"{', '.join(sorted({k.split('.')[0] for k in new})) or '-'}")
    if verbose:
        for key in new:
            log(f"    not in checkpoint: {key}")
