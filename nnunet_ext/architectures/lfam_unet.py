"""LFAM U-Net: a U-Net whose skip connections are aligned by modulated deformable convolutions.

Method: Q. Ming, X. Xiao, "Towards Accurate Medical Image Segmentation With Gradient-Optimized Dice
Loss", IEEE Signal Processing Letters 31, 2024 (``papers/godc_lfam.txt``), the Lateral Feature
Alignment Module (LFAM, Sec. II, Fig. 2, Table II). The paper gives no equation for LFAM, only:
"LFAM introduces deformable convolution blocks [DCN] to achieve the adaptive fusion of corresponding
features at the same scales"; "deformable convolutions are applied in lateral connections to achieve
feature alignment between the two features to be fused" (Fig. 2); independent (not shared) kernels
per scale are better (Table II). The paper cites DCNv1 (Dai et al., ICCV 2017, its ref. [24]); the
project spec (methods.md Sec. 2) prescribes the modulated DCNv2 (Zhu et al., CVPR 2019), which contains
DCNv1 as the case mask == 1; see ``nnunet_ext.building_blocks.deform_conv``. As implemented here, for
every aligned skip level i:

    offset_i, m_i = split(offset_conv_i(guide_i)),  m_i = sigmoid(.)       (DCNv2 offsets/modulation)
    aligned_i     = skip_i + DCN_i(skip_i; offset_i, m_i)                     (residual form)
    decoder stage i fuses cat(up_i, aligned_i) exactly as nnU-Net's UNetDecoder does with skip_i.

What the offsets are predicted from (``offset_source``)
    The paper does not say (the text and caption above are all there is; the figure is not in the
    text). Default ``'skip'``: ``guide_i = skip_i`` (the module sits entirely in the lateral path and
    the nnU-Net decoder is reused unchanged). Option ``'skip_and_decoder'``: ``guide_i =
    cat(skip_i, up_i)`` where ``up_i`` is the decoder's transposed-conv output at that level, i.e.
    the offsets see both features to be fused (the reading of "alignment between the two features").
    That option re-runs nnU-Net's ``UNetDecoder.forward`` loop here (same modules, same order, same
    deep-supervision behaviour) because the upsampled feature only exists inside it.

Zero-initialisation (the network starts as the plain U-Net)
    The last conv of every LFAM's offset/mask predictor has zero weight and bias (offsets 0 = regular
    grid, mask sigmoid(0) = 0.5) and the deformable kernel is zero (no bias), so DCN_i(skip_i) == 0 and
    ``aligned_i == skip_i``: with the encoder/decoder weights of a plain U-Net the output equals
    that U-Net's output exactly. Gradients: on the very first backward pass only the deformable
    kernels (``lfam.<i>.dcn_block.dcn.weight``) of the LFAM parameters get a non-zero gradient; the
    predictor (``lfam.<i>.dcn_block.offset_conv.*``) gets an exactly zero gradient (not None), because
    the gradient w.r.t. offsets and mask is proportional to the kernel. After the first optimiser step
    the kernel is non-zero and the predictor's last conv gets non-zero gradients; the separable
    predictor's depthwise conv (behind the zero-initialised 1x1 conv) one step later (tested). Every
    parameter receives a gradient tensor in every step (DDP without ``find_unused_parameters`` is fine).

Levels
    Level i is the encoder output at stage i (0 = full resolution); the bottleneck (last stage) is
    not a skip. ``levels`` (explicit list) and/or ``min_level`` restrict LFAM to some skips; the
    full-resolution level dominates LFAM's time and memory, so ``min_level=1`` is the cheaper choice.
    The DCN is the memory-lean one (``deform_conv_nd``: only its inputs are kept for backward).

Offset/mask predictor (``predictor``, see ``ModulatedDeformConvBlock``): ``'full'`` (default, DCNv2's regular conv)
or ``'separable'`` (depthwise k^N conv + 1x1 conv, about K times fewer multiply-adds). The default is what
``benchmarks/deform_conv_and_lfam.py`` measured: on the CPU the separable one made the LFAM U-Net's step no cheaper
(CPU time 0.98x) and needed 1.07x the peak memory of the full one.

Kernel size of each LFAM: the plan's kernel size of that stage (e.g. (1, 3, 3) for anisotropic
stages), or ``kernel_size`` if given. Supported bases: dynamic_network_architectures'
``PlainConvUNet`` and ``ResidualEncoderUNet`` (nnU-Net's default and ResEnc M/L/XL plans), 2D and 3D.

The module keeps ``.encoder`` and ``.decoder`` (with ``.decoder.deep_supervision``) under the same
state-dict keys as the base network, so nnU-Net's ``set_deep_supervision_enabled`` works and a plain
U-Net checkpoint loads with ``load_state_dict(sd, strict=False)`` (only ``lfam.*`` missing). There is
no ``initialize`` method on purpose: applying nnU-Net's ``InitWeights_He`` to the whole module would
overwrite the zero-initialised offset convs; ``build_lfam_unet_from_plans`` initialises the base
network before wrapping it.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list

from nnunet_ext.architectures.plan_network import PlanUNetWrapper, build_plan_network, decoder_stage_outputs
from nnunet_ext.building_blocks.deform_conv import ModulatedDeformConvBlock

__all__ = ["LFAM", "LFAMUNet", "build_lfam_unet_from_plans"]

OFFSET_SOURCES = ("skip", "skip_and_decoder")


class LFAM(nn.Module):
    """Lateral feature alignment module: ``aligned = skip + DCNv2(skip; offsets/mask from guide)``.

    The DCN maps ``channels -> channels`` with ``kernel_size`` ("same" padding, stride 1), has no bias,
    and is zero-initialised together with its offset/mask conv, so ``LFAM(skip) == skip`` at
    initialisation. ``guide_channels`` is the channel count of the tensor the offsets are predicted
    from (default ``channels``: the skip itself).
    """

    def __init__(self, channels: int, dim: int, kernel_size: Union[int, Sequence[int]] = 3,
                 offset_groups: int = 1, guide_channels: Optional[int] = None, backend: str = "auto",
                 predictor: str = "full"):
        super().__init__()
        ks = maybe_convert_scalar_to_list(nn.Conv2d if dim == 2 else nn.Conv3d, kernel_size)
        if any(k % 2 == 0 for k in ks):
            raise ValueError(f"LFAM needs odd kernel sizes to keep the skip's size, got {ks}")
        self.dcn_block = ModulatedDeformConvBlock(channels, channels, ks, dim, stride=1, padding=None,
                                                  dilation=1, groups=1, offset_groups=offset_groups, bias=False,
                                                  guide_channels=guide_channels, zero_init_weight=True,
                                                  backend=backend, predictor=predictor)

    def forward(self, skip: torch.Tensor, guide: Optional[torch.Tensor] = None) -> torch.Tensor:
        return skip + self.dcn_block(skip, guide)

    def feature_map_size(self, spatial_size: Sequence[int]) -> np.int64:
        """Elements of the activations this module keeps per sample (estimate, for VRAM planning):
        offset/mask conv output, sigmoid mask, DCN output, residual sum, the separable predictor's
        depthwise output. The lean DCN keeps only its inputs (all counted here) for backward."""
        blk = self.dcn_block
        vox = np.prod(spatial_size, dtype=np.int64)
        n = blk.n_offset_channels + 2 * blk.n_mask_channels + 2 * blk.dcn.out_channels
        if blk.predictor == "separable":
            n += blk.guide_channels
        return np.int64(n * vox)


def _resolve_levels(n_skips: int, levels: Optional[Iterable[int]], min_level: int) -> tuple:
    if levels is None:
        chosen = set(range(n_skips))
    else:
        chosen = set(int(i) for i in levels)
        bad = sorted(i for i in chosen if not 0 <= i < n_skips)
        if bad:
            raise ValueError(f"LFAM levels {bad} out of range: this network has skip levels 0..{n_skips - 1} "
                             f"(0 = full resolution; the bottleneck is not a skip)")
    return tuple(sorted(i for i in chosen if i >= min_level))


class LFAMUNet(PlanUNetWrapper):
    """U-Net with LFAM on (a subset of) its skip connections; wraps a built nnU-Net network.

    Args:
        base: a ``PlainConvUNet`` or ``ResidualEncoderUNet`` (already initialised); its encoder and
            decoder are reused as they are (not copied).
        levels: skip levels that get an LFAM (0 = full resolution, up to ``n_stages - 2``); None = all.
        min_level: additionally drop levels below this one (``min_level=1`` skips the full-res level).
        offset_source: ``'skip'`` (default) or ``'skip_and_decoder'``, see the module docstring.
        offset_groups: deformable groups of every LFAM (each level's channels must be divisible).
        kernel_size: None = the plan's kernel size of each stage, else used for every level.
        backend: DCN backend, see ``nnunet_ext.building_blocks.deform_conv.resolve_backend``.
        predictor: ``'full'`` (default) or ``'separable'`` offset/mask predictor.
    """

    def __init__(self, base: nn.Module, levels: Optional[Iterable[int]] = None, min_level: int = 0,
                 offset_source: str = "skip", offset_groups: int = 1,
                 kernel_size: Optional[Union[int, Sequence[int]]] = None, backend: str = "auto",
                 predictor: str = "full"):
        super().__init__(base)
        if offset_source not in OFFSET_SOURCES:
            raise ValueError(f"offset_source must be one of {OFFSET_SOURCES}, got {offset_source!r}")
        self.offset_source = offset_source
        channels = list(self.encoder.output_channels)
        n_skips = len(channels) - 1
        self.lfam_levels = _resolve_levels(n_skips, levels, min_level)
        self.lfam = nn.ModuleDict()
        for lvl in self.lfam_levels:
            ks = self.encoder.kernel_sizes[lvl] if kernel_size is None else kernel_size
            c = channels[lvl]
            self.lfam[str(lvl)] = LFAM(c, self.dim, ks, offset_groups=offset_groups,
                                       guide_channels=2 * c if offset_source == "skip_and_decoder" else c,
                                       backend=backend, predictor=predictor)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        skips = self.encoder(x)
        if self.offset_source == "skip":
            skips = list(skips)
            for lvl in self.lfam_levels:
                skips[lvl] = self.lfam[str(lvl)](skips[lvl])
            return self.decoder(skips)
        return self._decode_with_decoder_guided_lfam(skips)

    def _decode_with_decoder_guided_lfam(self, skips: List[torch.Tensor]):
        """nnU-Net's ``UNetDecoder.forward`` with the skip of each LFAM level aligned using offsets
        predicted from cat(skip, upsampled decoder feature)."""
        n = len(self.decoder.stages)

        def align(stage: int, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
            level = n - 1 - stage
            if level not in self.lfam_levels:
                return skip
            return self.lfam[str(level)](skip, torch.cat((skip, upsampled), 1))

        features = decoder_stage_outputs(self.decoder, skips, align)
        if not self.decoder.deep_supervision:
            return self.decoder.seg_layers[-1](features[-1])
        return [seg_layer(f) for seg_layer, f in zip(self.decoder.seg_layers, features)][::-1]

    def skip_sizes(self, input_size: Sequence[int]) -> List[List[int]]:
        """Spatial size of every skip level for an input patch size."""
        sizes = []
        size = list(input_size)
        for s in range(len(self.encoder.strides) - 1):
            size = [i // j for i, j in zip(size, self.encoder.strides[s])]
            sizes.append(size)
        return sizes

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Base network's estimate (encoder + decoder, as nnU-Net computes it) plus the LFAM
        activations (``LFAM.feature_map_size``); nnU-Net's planner uses this for VRAM estimates."""
        out = self.plan_unet_feature_map_size(input_size)
        sizes = self.skip_sizes(input_size)
        for lvl in self.lfam_levels:
            out += self.lfam[str(lvl)].feature_map_size(sizes[lvl])
        return np.int64(out)


def build_lfam_unet_from_plans(plans_manager, configuration_manager, num_input_channels: int,
                               num_output_channels: int, enable_deep_supervision: bool = True,
                               lfam_levels: Optional[Iterable[int]] = None, lfam_min_level: int = 0,
                               offset_source: str = "skip", offset_groups: int = 1,
                               kernel_size: Optional[Union[int, Sequence[int]]] = None,
                               backend: str = "auto", predictor: str = "full") -> LFAMUNet:
    """Build the plan's U-Net as nnU-Net does (``build_plan_network``)
    and wrap it in ``LFAMUNet``. Same first five arguments as
    ``nnUNetTrainer.build_network_architecture``; ``plans_manager`` is accepted for that symmetry and
    not used. Raises ``TypeError`` naming the class if the plan's architecture is not supported."""
    base = build_plan_network(configuration_manager, num_input_channels, num_output_channels,
                              enable_deep_supervision)
    return LFAMUNet(base, levels=lfam_levels, min_level=lfam_min_level, offset_source=offset_source,
                    offset_groups=offset_groups, kernel_size=kernel_size, backend=backend,
                    predictor=predictor)
