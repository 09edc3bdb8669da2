"""Stage-2 checkpoint sizes on the FULL-SIZE SD 2.1-base architecture (random weights, no download):
trained parameters by part, the Lightning checkpoint (with and without optimiser state) and the
``tadm export`` file, each against the UNet's fp32 parameter bytes.

    .venv/bin/python benchmarks/checkpoint_size.py        # ~40 s, ~6 GB RAM, ~1 GB in a temp folder

The checkpoint goes through ``TADMModule.on_save_checkpoint`` (the real filter: frozen backbone
weights out, ``tadm`` meta in) and is then exported with :func:`tadm.model.checkpoints.export_checkpoint`.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from tadm.testing.twins.full_size_architectures import FULL_SIZE_UNETS, FULL_SIZE_VAE

PARTS = (  # (label, predicate on a stored key)
    ("DFRM (rescaler, trained in stage 1)", lambda k: k.startswith("rescaler.")),
    ("UNet LoRA", lambda k: k.startswith("backbone.unet.") and ".lora_" in k),
    ("UNet conv_in", lambda k: k.startswith("backbone.unet.conv_in.")),
    ("VAE-decoder LoRA", lambda k: k.startswith("backbone.vae.") and ".lora_" in k),
    ("TPM (aligner)", lambda k: k.startswith("aligner.")),
    ("Refiner (enhancer)", lambda k: k.startswith("enhancer.")),
)


def build_model(unet_rank: int, vae_rank: int):  # type: ignore[no-untyped-def]
    """TADMModule, stage enhancer, on the full-size SD 2.1-base UNet + VAE with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from tadm.components.aligners.tpm import TimestepPredictionModule
    from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.training.lightning_module import TADMModule

    torch.manual_seed(0)
    b = StableDiffusionBackbone(preset="sd21-base", unet_lora_rank=unet_rank, vae_lora_rank=vae_rank)
    b.vae = b._freeze(
        AutoencoderKL(**FULL_SIZE_VAE, scaling_factor=b.preset.scaling_factor), torch.device("cpu")
    )
    b.unet = b._freeze(UNet2DConditionModel(**FULL_SIZE_UNETS["sd21-base"]), torch.device("cpu"))
    b._set_schedule(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    b.prompt_embeds = torch.randn(1, 77, 1024)  # the text encoder is never stored: a stand-in
    unet_params = sum(p.numel() for p in b.unet.parameters())
    model = TADMModule(
        b,
        DFRM(scale=16),
        stage="enhancer",
        aligner=TimestepPredictionModule(),
        loss_weights={"pixel": 2.0},  # no LPIPS/DISTS networks: they are never stored either
    )
    model.configure_model()  # what a trainer does first (the parts are in place: wires the enhancer)
    model.run_config = "# the run's YAML config is stored here (a few KB)\n"
    return model, unet_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet-lora-rank", type=int, default=32)
    ap.add_argument("--vae-lora-rank", type=int, default=16)
    args = ap.parse_args()

    from tadm.model.checkpoints import export_checkpoint

    model, unet_params = build_model(args.unet_lora_rank, args.vae_lora_rank)
    unet_bytes = 4 * unet_params
    ckpt = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(ckpt)  # the real filter: only trained tensors + the tadm meta
    stored = ckpt["state_dict"]
    trained_bytes = sum(v.numel() * v.element_size() for v in stored.values())

    # AdamW's two moments for everything stage 2 trains, as a Lightning checkpoint holds them
    trainable = model.trainable_parameters()
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()

    def pct(n: int) -> str:
        return f"{100 * n / unet_bytes:.2f} %"

    with tempfile.TemporaryDirectory(prefix="tadm-ckpt-size-") as tmp:
        lean, full = Path(tmp) / "lean.ckpt", Path(tmp) / "full.ckpt"
        torch.save(ckpt, lean)
        torch.save({**ckpt, "optimizer_states": [opt.state_dict()], "epoch": 0, "global_step": 1}, full)
        sizes = {
            name: lean.stat().st_size if name == "lean" else full.stat().st_size for name in ("lean", "full")
        }
        for dtype in ("bf16", "fp16", "fp32"):
            out = export_checkpoint(full, Path(tmp) / f"export-{dtype}.safetensors", dtype=dtype)
            sizes[dtype] = out.stat().st_size

    print(f"SD 2.1-base UNet: {unet_params / 1e6:.1f} M parameters = {unet_bytes / 1e6:.1f} MB in fp32")
    print(
        f"UNet LoRA rank {args.unet_lora_rank}, VAE-decoder LoRA rank {args.vae_lora_rank}, DFRM x16 (paper size)"
    )
    print(f"{'stored part':<38} {'params (M)':>10} {'fp32 MB':>9}")
    for label, pred in PARTS:
        n = sum(v.numel() for k, v in stored.items() if pred(k))
        print(f"{label:<38} {n / 1e6:>10.3f} {4 * n / 1e6:>9.1f}")
    other = [k for k in stored if not any(pred(k) for _, pred in PARTS)]
    assert not other, other[:5]
    n_all = sum(v.numel() for v in stored.values())
    n_trainable = sum(p.numel() for p in trainable)
    print(f"{'all stored (trained) tensors':<38} {n_all / 1e6:>10.3f} {trained_bytes / 1e6:>9.1f}")
    print(f"  of which trained in stage 2: {n_trainable / 1e6:.3f} M")
    print()
    print(f"{'file':<52} {'MB':>9} {'/ fp32 UNet':>11}")
    rows = [
        ("trained tensors, fp32 (bytes in memory)", trained_bytes),
        ("Lightning checkpoint, state_dict + meta only", sizes["lean"]),
        ("Lightning checkpoint + AdamW state (as trained)", sizes["full"]),
        ("tadm export --dtype bf16 (rescaler fp32)", sizes["bf16"]),
        ("tadm export --dtype fp16 (rescaler fp32)", sizes["fp16"]),
        ("tadm export --dtype fp32", sizes["fp32"]),
    ]
    for label, n in rows:
        print(f"{label:<52} {n / 1e6:>9.1f} {pct(n):>11}")
    print(
        f"(bf16 export over the UNet in fp16, {unet_bytes / 2e6:.1f} MB: {200 * sizes['bf16'] / unet_bytes:.2f} %)"
    )


if __name__ == "__main__":
    main()
