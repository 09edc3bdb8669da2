"""Tiny stand-ins for the authors' released files, and the release's formulas recomputed on them.

The state dicts are built key by key from the release's module structure (``src/modules/ae_arch_inv_cnn.py``,
``src/tpm_patch.py``, ``src/tadm.py``'s ``save_model``) with random tensors: the exact names and shapes the
release writes, not produced by tadm's own modules or renaming tables. The reference forwards below
compute the release's arithmetic with ``torch.nn.functional`` straight from those dicts, so a test that
compares them with an imported tadm model checks both the renaming and the release-compatible options.
The release's code itself is never imported.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the release's LoRA targets (``src/tadm.py``): a list for the UNet, a full-match regex for the VAE
UNET_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
]  # fmt: skip
VAE_TARGETS = r"^decoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
SCALING = 0.18215  # the release's hard-coded SD latent multiplier


class _Filler:
    """Random tensors, small enough that deep stacks of them stay finite and non-trivial."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, shape: tuple[int, ...], std: float) -> Tensor:
        return torch.randn(shape, generator=self.gen) * std

    def conv(
        self, sd: dict[str, Tensor], name: str, cin: int, cout: int, k: int = 3, gain: float = 0.5
    ) -> None:
        sd[f"{name}.weight"] = self((cout, cin, k, k), gain / math.sqrt(cin * k * k))
        sd[f"{name}.bias"] = self((cout,), 0.01)

    def linear(self, sd: dict[str, Tensor], name: str, cin: int, cout: int, gain: float = 1.0) -> None:
        sd[f"{name}.weight"] = self((cout, cin), gain / math.sqrt(cin))
        sd[f"{name}.bias"] = self((cout,), 0.01)


# ------------------------------------------------------------------------------------- the DFRM file
def release_dfrm_state(scale: int, seed: int = 0) -> dict[str, Tensor]:
    """``DFRM(4, 3, scale).state_dict()`` names and shapes (``ConvBlock.conv_in``, ``Resblock.res_block``,
    ``Downsample.downsample``, ``InvBlockExp.F/G/H`` DenseBlocks conv1..conv5)."""
    fill, sd = _Filler(seed), {}
    steps = int(math.log2(scale))
    fill.conv(sd, "down_module.0.conv_in", 3, 16)
    c = 16
    for k in range(steps):
        fill.conv(sd, f"down_module.{1 + 2 * k}.downsample.1", 4 * c, 2 * c, k=1)
        c *= 2
        fill.conv(sd, f"down_module.{2 + 2 * k}.res_block.0", c, c)
        fill.conv(sd, f"down_module.{2 + 2 * k}.res_block.2", c, c, gain=0.2)
    fill.conv(sd, f"down_module.{1 + 2 * steps}.conv_in", c, 16)
    fill.conv(sd, "latent_module.0.conv_in", 4, 128)
    fill.conv(sd, "final_module.0.conv_in", 3, 128)
    for i in range(1, 9):
        for module in ("latent_module", "final_module"):
            fill.conv(sd, f"{module}.{i}.res_block.0", 128, 128)
            fill.conv(sd, f"{module}.{i}.res_block.2", 128, 128, gain=0.2)
    fill.conv(sd, "latent_module.10.conv_in", 512, 128)
    if scale == 16:
        fill.conv(sd, "final_module.10.conv_in", 32, 4)
    else:  # x32: a second PixelUnshuffle / PixelShuffle step
        fill.conv(sd, "latent_module.12.conv_in", 512, 128)
        fill.conv(sd, "final_module.10.conv_in", 32, 32)
        fill.conv(sd, "final_module.12.conv_in", 8, 4)
    for i in range(8):
        fill.conv(sd, f"fusing_module.{i}.res_block.0", 144, 144)
        fill.conv(sd, f"fusing_module.{i}.res_block.2", 144, 144, gain=0.2)
    fill.conv(sd, "fusing_module.8.conv_in", 144, 3)
    for i in range(12):
        for net, cin, cout in (("F", 2, 1), ("G", 1, 2), ("H", 1, 2)):
            for j in range(4):
                fill.conv(sd, f"inv_module.{i}.{net}.conv{j + 1}", cin + 32 * j, 32, gain=0.3)
            fill.conv(sd, f"inv_module.{i}.{net}.conv5", cin + 128, cout, gain=0.1)
    return sd


def _conv(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], padding=w.shape[-1] // 2)


def _conv_block(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.leaky_relu(_conv(x, sd, f"{name}.conv_in"), 0.1)


def _resblock(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return x + _conv(F.leaky_relu(_conv(x, sd, f"{name}.res_block.0"), 0.1), sd, f"{name}.res_block.2")


def _dense(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    feats = [x]
    for j in range(1, 5):
        feats.append(F.leaky_relu(_conv(torch.cat(feats, 1), sd, f"{name}.conv{j}"), 0.2))
    return _conv(torch.cat(feats, 1), sd, f"{name}.conv5")


def _inv_block(x: Tensor, sd: dict[str, Tensor], name: str, rev: bool) -> Tensor:
    x1, x2 = x[:, :1], x[:, 1:]
    if not rev:
        y1 = x1 + _dense(x2, sd, f"{name}.F")
        s = torch.sigmoid(_dense(y1, sd, f"{name}.H")) * 2 - 1
        y2 = x2 * torch.exp(s) + _dense(y1, sd, f"{name}.G")
    else:
        s = torch.sigmoid(_dense(x1, sd, f"{name}.H")) * 2 - 1
        y2 = (x2 - _dense(x1, sd, f"{name}.G")) / torch.exp(s)
        y1 = x1 - _dense(y2, sd, f"{name}.F")
    return torch.cat([y1, y2], 1)


def release_dfrm_down(sd: dict[str, Tensor], scale: int, hr: Tensor, scaled_latent: Tensor) -> Tensor:
    """``DFRM.inference``'s LR image before quantisation: the latent branch reads latent / 0.18215."""
    steps, lat_steps = int(math.log2(scale)), int(math.log2(scale)) - 3
    p = _conv_block(hr, sd, "down_module.0")
    for k in range(steps):
        p = _conv(F.pixel_unshuffle(p, 2), sd, f"down_module.{1 + 2 * k}.downsample.1")
        p = _resblock(p, sd, f"down_module.{2 + 2 * k}")
    p = _conv_block(p, sd, f"down_module.{1 + 2 * steps}")
    z = _conv_block(scaled_latent / SCALING, sd, "latent_module.0")
    for i in range(1, 9):
        z = _resblock(z, sd, f"latent_module.{i}")
    for j in range(lat_steps):
        z = _conv_block(F.pixel_unshuffle(z, 2), sd, f"latent_module.{10 + 2 * j}")
    out = torch.cat([p, z], 1)
    for i in range(8):
        out = _resblock(out, sd, f"fusing_module.{i}")
    out = _conv_block(out, sd, "fusing_module.8")
    for i in range(12):
        out = _inv_block(out, sd, f"inv_module.{i}", rev=False)
    return out


def release_dfrm_up(sd: dict[str, Tensor], scale: int, lr: Tensor) -> Tensor:
    """``DFRM.inference``'s ``z_back_recon`` (the latent the release then multiplies by 0.18215)."""
    out = lr
    for i in reversed(range(12)):
        out = _inv_block(out, sd, f"inv_module.{i}", rev=True)
    out = _conv_block(out, sd, "final_module.0")
    for i in range(1, 9):
        out = _resblock(out, sd, f"final_module.{i}")
    for j in range(int(math.log2(scale)) - 3):
        out = _conv_block(F.pixel_shuffle(out, 2), sd, f"final_module.{10 + 2 * j}")
    return out


# ----------------------------------------------------------------------------- TimeMapping, Refiner
def release_tpm_state(seed: int = 1) -> dict[str, Tensor]:
    """``TimeMapping()``: ``noise_esti`` (ConvBlock 4->32, 6 ResidualBlockNoBN conv1/conv2) and
    ``time_predict.fuse_mlp`` (Linear 64->512, 4 x [ReLU, Linear 512->512], Linear 512->1, Sigmoid)."""
    fill, sd = _Filler(seed), {}
    fill.conv(sd, "noise_esti.0.conv_in", 4, 32)
    for i in range(1, 7):
        fill.conv(sd, f"noise_esti.{i}.conv1", 32, 32)
        fill.conv(sd, f"noise_esti.{i}.conv2", 32, 32, gain=0.2)
    fill.linear(sd, "time_predict.fuse_mlp.0", 64, 512)
    for i in (2, 4, 6, 8):
        fill.linear(sd, f"time_predict.fuse_mlp.{i}", 512, 512, gain=1.4)
    fill.linear(sd, "time_predict.fuse_mlp.9", 512, 1)
    return sd


def _res_relu(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return x + _conv(F.relu(_conv(x, sd, f"{name}.conv1")), sd, f"{name}.conv2")


def _linear(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def release_tpm(sd: dict[str, Tensor], latent: Tensor) -> Tensor:
    """``TimeMapping.forward``: 10 + 190 * sigmoid(MLP([mean, torch.std] of the features))."""
    x = _conv_block(latent, sd, "noise_esti.0")
    for i in range(1, 7):
        x = _res_relu(x, sd, f"noise_esti.{i}")
    h = torch.cat([x.mean(dim=[-1, -2]), torch.std(x, dim=[-1, -2])], 1)
    h = _linear(h, sd, "time_predict.fuse_mlp.0")
    for i in (2, 4, 6, 8):
        h = _linear(F.relu(h), sd, f"time_predict.fuse_mlp.{i}")
    s = torch.sigmoid(_linear(h, sd, "time_predict.fuse_mlp.9"))
    return s[:, 0] * (200 - 10) + 10


def release_refiner_state(seed: int = 2) -> dict[str, Tensor]:
    """``Refiner()``: TimestepEmbedding(64, 64), ``resnet_blocks`` (ConvBlock 8->64, 6 ResidualBlockNoBN(64)),
    ``zero_conv_out`` (a ConvBlock 64->4: zero at init, trained to non-zero values here)."""
    fill, sd = _Filler(seed), {}
    fill.linear(sd, "time_embedding.linear_1", 64, 64)
    fill.linear(sd, "time_embedding.linear_2", 64, 64)
    fill.conv(sd, "resnet_blocks.0.conv_in", 8, 64)
    for i in range(1, 7):
        fill.conv(sd, f"resnet_blocks.{i}.conv1", 64, 64)
        fill.conv(sd, f"resnet_blocks.{i}.conv2", 64, 64, gain=0.2)
    fill.conv(sd, "zero_conv_out.conv_in", 64, 4, gain=0.3)
    return sd


def sinusoid(t: Tensor, dim: int = 64, flip_sin_to_cos: bool = False, shift: float = 1.0) -> Tensor:
    """diffusers' ``Timesteps(dim, flip_sin_to_cos, downscale_freq_shift=shift)``, written out."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - shift))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], -1)
    return torch.cat([emb[:, half:], emb[:, :half]], -1) if flip_sin_to_cos else emb


def release_refiner(sd: dict[str, Tensor], z: Tensor, pred: Tensor, t: Tensor) -> Tensor:
    """``Refiner.forward``: [ConvBlock, 6 x (ResidualBlockNoBN + t_emb)], then ConvBlock(64->4) (LeakyReLU)."""
    emb = _linear(F.silu(_linear(sinusoid(t), sd, "time_embedding.linear_1")), sd, "time_embedding.linear_2")
    x = _conv_block(torch.cat([z, pred], 1), sd, "resnet_blocks.0")
    for i in range(1, 7):
        x = _res_relu(x, sd, f"resnet_blocks.{i}") + emb[:, :, None, None]
    return _conv_block(x, sd, "zero_conv_out")


# ------------------------------------------------------------------------------------ LoRA, pkl file
def _peft_targets(
    names: list[tuple[str, nn.Module]], targets: list[str] | str
) -> list[tuple[str, nn.Module]]:
    """Modules peft wraps: a list matches a name or a dotted suffix, a string is a full-match regex."""
    if isinstance(targets, str):
        return [(n, m) for n, m in names if re.fullmatch(targets, n)]
    return [(n, m) for n, m in names if any(n == t or n.endswith("." + t) for t in targets)]


def lora_state(
    model: nn.Module, targets: list[str] | str, rank: int, adapter: str, seed: int
) -> dict[str, Tensor]:
    """peft's LoRA tensors for ``model`` as its ``state_dict`` names them: Linear A (r, in), B (out, r);
    Conv2d A (r, in, k, k), B (out, r, 1, 1); random non-zero B so the adapters matter."""
    fill, sd = _Filler(seed), {}
    for name, module in _peft_targets(list(model.named_modules()), targets):
        if isinstance(module, nn.Linear):
            a, b = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, nn.Conv2d):
            a, b = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            continue
        sd[f"{name}.lora_A.{adapter}.weight"] = fill(a, 1.0 / math.sqrt(math.prod(a[1:])))
        sd[f"{name}.lora_B.{adapter}.weight"] = fill(b, 0.05)
    return sd


@functools.lru_cache(maxsize=2)
def _tiny_parts(preset: str) -> dict[str, Any]:
    from tadm.testing.twins.unet_twins import build_tiny_components

    return build_tiny_components(preset, parts=["unet", "vae"])


def release_tadm_file(preset: str = "tiny-sd21", rank_unet: int = 48, rank_vae: int = 16) -> dict[str, Any]:
    """``TADM.save_model``'s dict for the tiny twin of ``preset`` (UNet / VAE as diffusers builds them);
    a new dict of new tensors on every call."""
    parts = _tiny_parts(preset)
    return release_tadm_state(parts["unet"], parts["vae"], rank_unet, rank_vae)


def release_tadm_state(
    unet: nn.Module, vae: nn.Module, rank_unet: int = 48, rank_vae: int = 16
) -> dict[str, Any]:
    """``TADM.save_model``'s dict for any diffusers UNet / VAE (the tiny twins here, the full-size SD 2.1
    architecture in ``benchmarks/import_release.py``): peft LoRA on the release's targets, a perturbed
    copy of ``unet.conv_in``, the TPM and the Refiner at the release's sizes."""
    unet_sd = lora_state(unet, UNET_TARGETS, rank_unet, "default", seed=3)
    fill = _Filler(4)
    conv_in = unet.conv_in
    unet_sd["conv_in.weight"] = conv_in.weight.detach().clone() + fill(tuple(conv_in.weight.shape), 0.02)
    unet_sd["conv_in.bias"] = conv_in.bias.detach() + fill(tuple(conv_in.bias.shape), 0.02)
    return {
        "unet_lora_target_modules": list(UNET_TARGETS),
        "vae_lora_target_modules": VAE_TARGETS,
        "rank_vae": rank_vae,
        "rank_unet": rank_unet,
        "state_dict_vae": lora_state(vae, VAE_TARGETS, rank_vae, "vae_skip", seed=5),
        "state_dict_unet": unet_sd,
        "state_dict_timemapping": release_tpm_state(),
        "state_dict_refiner": release_refiner_state(),
    }


def write_release_files(folder: Path, scale: int = 16, preset: str = "tiny-sd21") -> tuple[Path, Path]:
    """The two files as the release saves them: ``{"state_dict": ...}`` for the DFRM, the pickle dict."""
    folder.mkdir(parents=True, exist_ok=True)
    dfrm, tadm = folder / f"dfrm_x{scale}.pkl", folder / f"model_sr_x{scale}.pkl"
    torch.save({"state_dict": release_dfrm_state(scale)}, dfrm)
    torch.save(release_tadm_file(preset), tadm)
    return dfrm, tadm
