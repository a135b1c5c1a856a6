"""The trainer base of every ``nnunet_ext`` method: behaviour set by class attributes.

nnU-Net changes a trainer's behaviour by overriding a few methods (``nnUNetTrainerAdam`` overrides
``configure_optimizers``, ``nnUNetTrainerDiceLoss`` overrides ``_build_loss``, ...). The methods of this package
combine several such changes (a network, a loss, a recipe, a schedule), so ``nnUNetExtTrainer`` overrides those
hooks once and reads what they do from class attributes. A method trainer and its variants only set attributes::

    class nnUNetTrainerDPCNet(nnUNetExtTrainer):
        network_factory = staticmethod(build_dpcnet_from_plans)
        output_levels = staticmethod(DPCNet.output_levels)
        lowest_level_weight = 1e-6

    class nnUNetTrainerDPCNetPaper(nnUNetTrainerDPCNet):
        adam_learning_rate = 1e-4

    class nnUNetTrainerDPCNet_quick(nnUNetTrainerDPCNet):
        schedule = QUICK_SCHEDULE
        mirroring = False

Attributes (defaults = nnU-Net's ``nnUNetTrainer``):

network
    ``network_factory``: None (the plan's own network) or a function with the arguments of
    ``build_network_architecture`` plus ``**network_kwargs``. ``supported_dimensions``: the spatial dimensions the
    network exists in; another plan is refused with a message naming what to use instead.
loss (nnU-Net's Dice + CE for labels, Dice + BCE for regions; ``nnunet_ext.losses.compound.build_dice_ce_loss``)
    ``dice_class``, ``weight_dice``, ``weight_ce``, ``batch_dice`` (None = the plan's), ``ce_loss_kwargs()``
    (a method: extra arguments of the CE/BCE term, e.g. class weights), ``lowest_level_weight`` (deep-supervision
    weight of the lowest-resolution output; None = nnU-Net's rule: 0, or 1e-6 under DDP without torch.compile),
    ``output_levels`` (None for one output per resolution level; for networks with several output families, a
    function ``num_levels -> level of each output``: DPC-Net), ``loss_weight_schedule`` (None, or a function
    ``(epoch, num_epochs) -> (weight_dice, weight_ce)`` applied at the start of every epoch and written to the
    training log: DLKUNet's phase-based and dynamic schedules).
optimiser
    ``adam_learning_rate``: None (nnU-Net's SGD, 1e-2, Nesterov, poly) or the initial learning rate of Adam with
    nnU-Net's poly decay; ``adam_weight_decay``: None (nnU-Net's 3e-5) or Adam's weight decay.
schedule
    ``schedule``: None (nnU-Net's 1000 epochs x 250 iterations) or a ``TrainingSchedule`` (``QUICK_SCHEDULE`` of
    the smoke-run variants ``*_quick``, ``DEMO_SCHEDULE`` of the demo variants ``*_demo``); ``mirroring``: False
    turns off mirror augmentation and test-time mirroring (``*_quick`` and ``*_demo`` do both).

Progress: while it trains, a trainer shows each epoch's iterations, current loss and time left on the console
(``nnunet_ext.training.progress.EpochProgress``: a live bar on a terminal, else a line every 10 s), on rank 0 only and
never in nnU-Net's log file.

CPU training: a trainer on the CPU makes glibc keep freed memory for reuse (``nnunet_ext.training.cpu_memory``; a
line in the training log says so; ``NNUNET_EXT_KEEP_FREED_MEMORY=0`` turns it off): without it every large
activation is page-faulted in again at each step (SCRNet at 256^2: 1.3-2 million page faults and 7.6-9.8 s per
step, against 6.0 s).

Deep supervision: ``set_deep_supervision_enabled`` switches ``network.decoder.deep_supervision`` (nnU-Net's U-Net
and the networks wrapping it) or, for networks without such a decoder, ``network.deep_supervision``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ext.architectures.plan_network import unwrap_network
from nnunet_ext.losses.compound import build_dice_ce_loss, deep_supervision_weights
from nnunet_ext.losses.multi_output_deep_supervision import MultiOutputDeepSupervisionWrapper
from nnunet_ext.training.cpu_memory import DISABLE_VARIABLE as CPU_MEMORY_VARIABLE
from nnunet_ext.training.cpu_memory import keep_freed_memory
from nnunet_ext.training.pretrained import load_pretrained_weights
from nnunet_ext.training.progress import EpochProgress


@dataclass(frozen=True)
class TrainingSchedule:
    """Epochs, training iterations per epoch and validation iterations per epoch."""
    epochs: int
    iterations: int
    val_iterations: int


QUICK_SCHEDULE = TrainingSchedule(epochs=2, iterations=5, val_iterations=2)
"""Smoke runs (demo, end-to-end tests, CI): enough to exercise every stage of nnU-Net's pipeline, far too short to
learn a useful model. nnU-Net has no command-line switch for the length of training; like its own
``nnUNetTrainer_1epoch`` a trainer variant sets it."""

DEMO_SCHEDULE = TrainingSchedule(epochs=6, iterations=12, val_iterations=2)
"""``nnunet_ext_demo``'s default (the ``*_demo`` variants, with mirroring off like ``*_quick``): long enough for DPC-Net
and nnU-Net's network to segment the liver of the synthetic LiTS task (Dice >= 0.8) within the demo's 10 minutes on 2
CPU cores. Chosen from a 10 x 10 DPC-Net run on the demo's plan, where the liver pseudo Dice was 0.25, 0.73, 0.87 and
0.93 after 20, 30, 40 and 50 iterations: 72 iterations leave a margin for the faster poly decay of 6 epochs. Few long
epochs, because each epoch adds a validation, a progress plot and possibly a checkpoint."""


def configuration_dimension(configuration_manager) -> int:
    """2 or 3: the spatial dimension of a configuration (from its patch size)."""
    return len(configuration_manager.patch_size)


class nnUNetExtTrainer(nnUNetTrainer):
    network_factory: Optional[Callable[..., nn.Module]] = None
    network_kwargs: Dict[str, object] = {}
    supported_dimensions: Tuple[int, ...] = (2, 3)

    dice_class: Type[nn.Module] = MemoryEfficientSoftDiceLoss
    weight_dice: float = 1.0
    weight_ce: float = 1.0
    batch_dice: Optional[bool] = None
    lowest_level_weight: Optional[float] = None
    output_levels: Optional[Callable[[int], Sequence[int]]] = None
    loss_weight_schedule: Optional[Callable[[int, int], Tuple[float, float]]] = None

    adam_learning_rate: Optional[float] = None
    adam_weight_decay: Optional[float] = None

    schedule: Optional[TrainingSchedule] = None
    mirroring: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.check_dimension(self.configuration_manager, configuration)
        if self.adam_learning_rate is not None:
            self.initial_lr = self.adam_learning_rate
        if self.adam_weight_decay is not None:
            self.weight_decay = self.adam_weight_decay
        if self.schedule is not None:
            self.num_epochs = self.schedule.epochs
            self.num_iterations_per_epoch = self.schedule.iterations
            self.num_val_iterations_per_epoch = self.schedule.val_iterations
        self.compound_loss: Optional[nn.Module] = None
        self.progress: Optional[EpochProgress] = None
        if self.device.type == "cpu" and keep_freed_memory():
            self.print_to_log_file(f"CPU training: freed memory is kept for reuse (glibc mallopt; "
                                   f"{CPU_MEMORY_VARIABLE}=0 turns this off)")

    @classmethod
    def check_dimension(cls, configuration_manager, configuration_name: Optional[str] = None) -> None:
        """Refuse a configuration whose dimension this trainer's network does not exist in."""
        dim = configuration_dimension(configuration_manager)
        if dim not in cls.supported_dimensions:
            supported = " or ".join(f"{d}D" for d in cls.supported_dimensions)
            use = "the 2d configuration" if 2 in cls.supported_dimensions else "a 3d configuration"
            name = f"configuration '{configuration_name}'" if configuration_name else "this configuration"
            raise ValueError(f"{cls.__name__} is {supported} only, but {name} is {dim}D "
                             f"(patch size {list(configuration_manager.patch_size)}): train it with {use}.")

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The method's network from the plan (training and ``nnUNetv2_predict`` both call this)."""
        cls.check_dimension(configuration_manager)
        if cls.network_factory is None:
            return get_network_from_plans(
                configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
                allow_init=True, deep_supervision=enable_deep_supervision)
        return cls.network_factory(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision, **cls.network_kwargs)

    def initialize(self):
        """nnU-Net's ``initialize``; also installs ``nnunet_ext.training.pretrained.load_pretrained_weights`` for
        ``nnUNetv2_train -pretrained_weights`` (networks around the plan's U-Net load a plain nnU-Net checkpoint of
        the same plan, their own modules are listed in the log; other networks load as in nnU-Net)."""
        super().initialize()
        import nnunetv2.run.run_training as run_training
        run_training.load_pretrained_weights = partial(load_pretrained_weights, log=self.print_to_log_file)

    # --- loss -----------------------------------------------------------------------------------------------

    def ce_loss_kwargs(self) -> dict:
        """Extra keyword arguments of the CE (labels) or BCE (regions) term; override for class weights."""
        return {}

    def deep_supervision_level_weights(self) -> Sequence[float]:
        """nnU-Net's 1/2^i weights over the deep-supervision levels, normalised; lowest level as configured."""
        lowest = self.lowest_level_weight
        if lowest is None:
            lowest = 1e-6 if self.is_ddp and not self._do_i_compile() else 0.0
        return deep_supervision_weights(len(self._get_deep_supervision_scales()), lowest)

    def _build_loss(self) -> nn.Module:
        batch_dice = self.configuration_manager.batch_dice if self.batch_dice is None else self.batch_dice
        self.compound_loss = build_dice_ce_loss(
            self.label_manager, batch_dice=batch_dice, is_ddp=self.is_ddp, weight_dice=self.weight_dice,
            weight_ce=self.weight_ce, dice_class=self.dice_class, ce_kwargs=self.ce_loss_kwargs(),
            compile_dice=self._do_i_compile())
        if not self.enable_deep_supervision:
            return self.compound_loss
        weights = self.deep_supervision_level_weights()
        output_levels = type(self).output_levels  # class access: a plain function stays unbound
        if output_levels is None:
            return DeepSupervisionWrapper(self.compound_loss, weights)
        return MultiOutputDeepSupervisionWrapper(self.compound_loss, weights, output_levels(len(weights)))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        schedule = type(self).loss_weight_schedule  # class access: a plain function stays unbound
        if schedule is not None:
            weight_dice, weight_ce = schedule(self.current_epoch, self.num_epochs)
            self.compound_loss.weight_dice, self.compound_loss.weight_ce = weight_dice, weight_ce
            self.print_to_log_file(f"loss weights: dice {weight_dice:.4f}, ce {weight_ce:.4f}")
        if self.local_rank == 0:
            self.progress = EpochProgress(self.current_epoch, self.num_epochs, self.num_iterations_per_epoch)

    # --- progress (console only; rank 0) -------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if self.progress is not None:
            self.progress.update(float(result["loss"]))
        return result

    def on_train_epoch_end(self, train_outputs):
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        super().on_train_epoch_end(train_outputs)

    # --- optimiser and schedule ----------------------------------------------------------------------------

    def configure_optimizers(self):
        if self.adam_learning_rate is None:
            return super().configure_optimizers()
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.mirroring:
            self.inference_allowed_mirroring_axes = None
            mirror_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    # --- deep supervision ----------------------------------------------------------------------------------

    def set_deep_supervision_enabled(self, enabled: bool):
        network = unwrap_network(self.network)
        decoder = getattr(network, "decoder", None)
        if decoder is not None and hasattr(decoder, "deep_supervision"):
            decoder.deep_supervision = enabled
        elif hasattr(network, "deep_supervision"):
            network.deep_supervision = enabled
        else:
            raise AttributeError(f"{type(network).__name__} has neither decoder.deep_supervision nor "
                                 f"deep_supervision: nnunet_ext networks must expose one of them")

