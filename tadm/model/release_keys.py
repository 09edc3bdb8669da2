"""Tensor names of the authors' release (github.com/wwangcece/TADM) <-> tadm's, both directions.

The release's modules and ours hold the same parameters under other names: its DFRM
(``src/modules/ae_arch_inv_cnn.py``) nests each conv in a ``ConvBlock.conv_in`` / ``Resblock.res_block``
/ ``Downsample.downsample``, its TPM and Refiner (``src/tpm_patch.py``) in BasicSR blocks, and its LoRA
tensors carry peft's adapter names ``default`` (UNet) and ``vae_skip`` (VAE decoder). The DFRM, TPM and
Refiner names are enumerated from the release's module structure (so a missing or an unknown one is
named); LoRA names follow a pattern over the UNet / VAE module paths, which the backbone checks.
Knowing concrete plug-ins' key names is why this lives in the config layer, not in a plug-in.
"""

from __future__ import annotations

import functools
import math
import re

from tadm.components.backbones.stable_diffusion import UNET_ADAPTER, VAE_ADAPTER

#: the release's peft adapter names: ``unet.add_adapter(cfg)`` and ``vae.add_adapter(cfg, "vae_skip")``
RELEASE_UNET_ADAPTER = "default"
RELEASE_VAE_ADAPTER = "vae_skip"
#: residual blocks in each DFRM trunk, couplings in F, dense convs per coupling net (fixed in the release)
DFRM_RESBLOCKS = 8
DFRM_COUPLINGS = 12
#: the SD VAE's downsampling (the release hard-codes SD's 8)
LATENT_FACTOR = 8
TPM_RESBLOCKS = 6
REFINER_RESBLOCKS = 6
PARAMS = ("weight", "bias")

_PIXEL_DOWN = re.compile(r"^down_module\.(\d+)\.downsample\.1\.weight$")


def _conv(out: dict[str, str], release: str, ours: str) -> None:
    for p in PARAMS:
        out[f"{release}.{p}"] = f"{ours}.{p}"


def _res(out: dict[str, str], release: str, ours: str, conv1: str, conv2: str) -> None:
    _conv(out, f"{release}.{conv1}", f"{ours}.body.0")
    _conv(out, f"{release}.{conv2}", f"{ours}.body.2")


def dfrm_scale(keys: set[str]) -> int | None:
    """The scale a release DFRM state dict was built for: 2 ** (pixel-branch downsampling steps)."""
    steps = sum(1 for k in keys if _PIXEL_DOWN.match(k))
    return 2**steps if steps else None


def dfrm_key_map(scale: int) -> dict[str, str]:
    """Release DFRM name -> tadm name (``rescaler.`` prefix) for a DFRM at ``scale`` (16 or 32).

    Release ``down_module``: ConvBlock, log2(s) x [Downsample (PixelUnshuffle, 1x1 conv), Resblock],
    ConvBlock; ours flattens each Downsample into two entries of ``pixel_branch``, so the indices shift.
    ``latent_module`` / ``fusing_module`` / ``final_module`` keep their indices as ``latent_branch`` /
    ``fusion`` / ``decoder`` (G_d ending in a ConvBlock: ``final_activation: true``); ``inv_module.i.F/G/H``
    ``conv1..conv5`` are ``invertible.blocks.i.f/g/h`` ``convs.0..3`` and ``out``.
    """
    steps = int(math.log2(scale))
    lat_steps = steps - int(math.log2(LATENT_FACTOR))
    if 2**steps != scale or lat_steps < 1:
        raise ValueError(f"the release's DFRM exists for x16 and x32, not x{scale}")
    m: dict[str, str] = {}
    r = "rescaler"
    _conv(m, "down_module.0.conv_in", f"{r}.pixel_branch.0.0")
    for k in range(steps):
        _conv(m, f"down_module.{1 + 2 * k}.downsample.1", f"{r}.pixel_branch.{2 + 3 * k}")
        _res(m, f"down_module.{2 + 2 * k}", f"{r}.pixel_branch.{3 + 3 * k}", "res_block.0", "res_block.2")
    _conv(m, f"down_module.{1 + 2 * steps}.conv_in", f"{r}.pixel_branch.{1 + 3 * steps}.0")
    for release, ours in (("latent_module", "latent_branch"), ("final_module", "decoder")):
        _conv(m, f"{release}.0.conv_in", f"{r}.{ours}.0.0")
        for i in range(1, DFRM_RESBLOCKS + 1):
            _res(m, f"{release}.{i}", f"{r}.{ours}.{i}", "res_block.0", "res_block.2")
        for j in range(lat_steps):  # PixelUnshuffle / PixelShuffle at 9 + 2j, a ConvBlock after each
            i = DFRM_RESBLOCKS + 2 + 2 * j
            _conv(m, f"{release}.{i}.conv_in", f"{r}.{ours}.{i}.0")
    for i in range(DFRM_RESBLOCKS):
        _res(m, f"fusing_module.{i}", f"{r}.fusion.{i}", "res_block.0", "res_block.2")
    _conv(m, f"fusing_module.{DFRM_RESBLOCKS}.conv_in", f"{r}.fusion.{DFRM_RESBLOCKS}.0")
    for i in range(DFRM_COUPLINGS):
        for release_net, ours_net in (("F", "f"), ("G", "g"), ("H", "h")):
            base, ours_base = f"inv_module.{i}.{release_net}", f"{r}.invertible.blocks.{i}.{ours_net}"
            for c in range(4):
                _conv(m, f"{base}.conv{c + 1}", f"{ours_base}.convs.{c}")
            _conv(m, f"{base}.conv5", f"{ours_base}.out")
    return m


def tpm_key_map() -> dict[str, str]:
    """Release ``TimeMapping`` name -> tadm TPM name (``aligner.`` prefix).

    ``noise_esti``: ConvBlock + 6 ResidualBlockNoBN (conv1/conv2) = our ``trunk``; ``time_predict.fuse_mlp``
    linears 0, 2, 4, 6, 8 and the last at 9 (no ReLU before it) = our ``head`` 0..8 and 10 (an Identity
    sits at 9 in the release variant).
    """
    m: dict[str, str] = {}
    _conv(m, "noise_esti.0.conv_in", "aligner.trunk.0.0")
    for i in range(1, TPM_RESBLOCKS + 1):
        _res(m, f"noise_esti.{i}", f"aligner.trunk.{i}", "conv1", "conv2")
    for i in (0, 2, 4, 6, 8):
        _conv(m, f"time_predict.fuse_mlp.{i}", f"aligner.head.{i}")
    _conv(m, "time_predict.fuse_mlp.9", "aligner.head.10")
    return m


def refiner_key_map() -> dict[str, str]:
    """Release ``Refiner`` name -> tadm name (``enhancer.refiner.`` prefix): ``resnet_blocks.0`` (ConvBlock)
    is our ``head``, ``resnet_blocks.1..6`` our ``blocks.0..5``, ``zero_conv_out.conv_in`` our ``tail``."""
    m: dict[str, str] = {}
    r = "enhancer.refiner"
    for linear in ("linear_1", "linear_2"):
        _conv(m, f"time_embedding.{linear}", f"{r}.time_embedding.{linear}")
    _conv(m, "resnet_blocks.0.conv_in", f"{r}.head.0")
    for i in range(1, REFINER_RESBLOCKS + 1):
        _res(m, f"resnet_blocks.{i}", f"{r}.blocks.{i - 1}", "conv1", "conv2")
    _conv(m, "zero_conv_out.conv_in", f"{r}.tail")
    return m


_RELEASE_LORA = {
    "unet": re.compile(rf"^(?P<m>.+)\.lora_(?P<ab>[AB])\.{RELEASE_UNET_ADAPTER}\.weight$"),
    "vae": re.compile(rf"^(?P<m>decoder\..+)\.lora_(?P<ab>[AB])\.{RELEASE_VAE_ADAPTER}\.weight$"),
}
_OUR_LORA = {
    "unet": re.compile(rf"^backbone\.unet\.(?P<m>.+)\.lora_(?P<ab>[AB])\.{UNET_ADAPTER}\.weight$"),
    "vae": re.compile(rf"^backbone\.vae\.(?P<m>.+)\.lora_(?P<ab>[AB])\.{VAE_ADAPTER}\.weight$"),
}
_ADAPTER = {"unet": UNET_ADAPTER, "vae": VAE_ADAPTER}
_RELEASE_ADAPTER = {"unet": RELEASE_UNET_ADAPTER, "vae": RELEASE_VAE_ADAPTER}
#: the UNet's conv_in, trained in full by the release and by tadm
UNET_FULL = {f"conv_in.{p}": f"backbone.unet.conv_in.{p}" for p in PARAMS}


def lora_module(part: str, release_key: str) -> tuple[str, str] | None:
    """(module path, ``A``/``B``) of a release LoRA tensor name of ``part`` (``unet``/``vae``), else None."""
    hit = _RELEASE_LORA[part].match(release_key)
    return (hit["m"], hit["ab"]) if hit else None


def lora_key(part: str, release_key: str) -> str | None:
    """tadm's name of a release LoRA tensor (or the UNet's conv_in), None for anything else."""
    if part == "unet" and release_key in UNET_FULL:
        return UNET_FULL[release_key]
    hit = lora_module(part, release_key)
    if hit is None:
        return None
    return f"backbone.{part}.{hit[0]}.lora_{hit[1]}.{_ADAPTER[part]}.weight"


#: the release's file sections whose names are enumerated (the LoRA sections follow a pattern)
SECTION_MAPS = {"state_dict_timemapping": tpm_key_map, "state_dict_refiner": refiner_key_map}


@functools.lru_cache(maxsize=4)
def _inverse_maps(scale: int) -> tuple[tuple[str, dict[str, str]], ...]:
    sections = [("DFRM state_dict", dfrm_key_map(scale))]
    sections += [(name, build()) for name, build in SECTION_MAPS.items()]
    sections.append(("state_dict_unet", UNET_FULL))
    return tuple((name, {ours: release for release, ours in m.items()}) for name, m in sections)


def release_name(our_key: str, scale: int) -> str:
    """Where a tadm tensor lives in the release's files, e.g. ``state_dict_unet['conv_in.weight']``;
    tadm's own name when it has no counterpart."""
    for section, inverse in _inverse_maps(scale):
        if our_key in inverse:
            return f"{section}[{inverse[our_key]!r}]"
    for part in ("unet", "vae"):
        hit = _OUR_LORA[part].match(our_key)
        if hit:
            name = f"{hit['m']}.lora_{hit['ab']}.{_RELEASE_ADAPTER[part]}.weight"
            return f"state_dict_{part}[{name!r}]"
    return our_key
