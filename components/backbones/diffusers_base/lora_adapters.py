"""peft LoRA as the diffusion backbones add it for the enhancer stages (``enhancer`` / ``joint``).

One place for what the Stable Diffusion UNet and the SD 3 / FLUX transformer backbones do alike: a
gaussian-initialised LoRA of a given rank on named modules (alpha defaults to the rank: scale 1), the
same LoRA on every VAE decoder, and everything else frozen. The adapter names appear in checkpoint keys
(``...lora_A.<adapter>.weight``), so they must never change.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

#: peft adapter name of the VAE-decoder LoRA (it appears in checkpoint keys)
VAE_ADAPTER = "tadm_vae"
#: LoRA targets on the VAE decoder only (a full-match regex, so encoder modules never match)
VAE_DECODER_LORA_REGEX = (
    r"decoder\.(.*\.)?(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_q|to_k|to_v|to_out\.0)"
)


def inject_lora(
    module: nn.Module,
    adapter: str,
    rank: int,
    alpha: float | None,
    targets: str | Sequence[str],
    exclude: list[str] | None = None,
) -> None:
    """peft LoRA named ``adapter`` on the ``targets`` of ``module`` (name suffixes, or a full-match regex),
    gaussian-initialised; ``alpha`` None means alpha = rank (peft scales the update by alpha / rank)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights="gaussian",
        target_modules=targets, exclude_modules=exclude,
    )  # fmt: skip
    inject_adapter_in_model(config, module, adapter_name=adapter)


def inject_vae_decoder_lora(vae: nn.Module, rank: int, alpha: float | None) -> None:
    """LoRA on the VAE decoder (adapter :data:`VAE_ADAPTER`); the encoder never gets any."""
    inject_lora(vae, VAE_ADAPTER, rank, alpha, VAE_DECODER_LORA_REGEX)


def train_only_lora(*modules: nn.Module) -> None:
    """Let only the LoRA weights of ``modules`` train; every other weight of them is frozen."""
    for module in modules:
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
