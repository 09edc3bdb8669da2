"""Stage-2 cost of the FULL-SIZE SD 2.1-base and SDXL architectures on this CPU (random weights,
no download): one training step at 512x512 with and without gradient checkpointing, one x16
upscale of a 512x512 result, trainable-parameter counts and the checkpoint/UNet size ratio.

    .venv/bin/python benchmarks/enhancer_cpu.py                 # every case, each in its own process
    .venv/bin/python benchmarks/enhancer_cpu.py --case sd21-base:train:ckpt

Each case runs in a fresh subprocess so its peak RSS is its own. Prints a table; asserts nothing.
The text encoders are replaced by a random empty-prompt embedding of the right shape (they run
once at load time and are then released, so they cost neither step time nor training memory).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
from case_runner import report, run_case

from tadm.testing.twins.full_size_architectures import FULL_SIZE_UNETS as UNETS
from tadm.testing.twins.full_size_architectures import FULL_SIZE_VAE as VAE

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = {"sd21-base": (1024, None), "sdxl": (2048, 1280)}
CASES = [f"{b}:{k}" for b in UNETS for k in ("train:ckpt", "train:nockpt", "upscale")]


def build_model(family: str, checkpointing: bool):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from tadm.components.aligners.tpm import TimestepPredictionModule
    from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.training.lightning_module import TADMModule

    # LPIPS / DISTS on a random VGG16 where torchvision looks for the ImageNet one (offline; the stage-2
    # loss's cost is the same, its numbers are not perceptual)
    sys.path.insert(0, str(ROOT))
    from tadm.testing.twins.vgg16_stand_in import write_random_vgg16

    os.environ["TORCH_HOME"] = str(ROOT / "runs" / "bench_torch_home")
    write_random_vgg16(Path(os.environ["TORCH_HOME"]))
    torch.manual_seed(0)
    b = StableDiffusionBackbone(preset=family, gradient_checkpointing=checkpointing)
    # the same modules from_pretrained would give, with random weights (no download)
    b.vae = b._freeze(AutoencoderKL(**VAE, scaling_factor=b.preset.scaling_factor), torch.device("cpu"))
    b.unet = b._freeze(UNet2DConditionModel(**UNETS[family]), torch.device("cpu"))
    b._set_schedule(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    ctx, pooled = CONTEXT[family]
    b.prompt_embeds = torch.randn(1, 77, ctx)
    b.pooled_prompt_embeds = torch.randn(1, pooled) if pooled else None
    unet_params = sum(p.numel() for p in b.unet.parameters())
    model = TADMModule(
        b,
        DFRM(scale=16),
        stage="enhancer",
        aligner=TimestepPredictionModule(),
    )
    model.configure_model()  # what a trainer does first (the parts are in place: wires the enhancer)
    return model, unet_params


def measure(case: str) -> dict:
    family, kind, *rest = case.split(":")
    torch.set_num_threads(torch.get_num_threads())
    model, unet_params = build_model(family, checkpointing=rest == ["ckpt"])
    trainable = model.trainable_parameters()
    n_train = sum(p.numel() for p in trainable)
    stored = sum(v.numel() for k, v in model.state_dict().items() if k not in model._frozen_keys())
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    result = {"case": case, "unet_params_M": unet_params / 1e6, "trainable_M": n_train / 1e6,
              "ckpt_over_unet": stored / unet_params}  # fmt: skip
    if kind == "train":
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        model.train()
        t = time.perf_counter()
        loss = model.training_step({"image": x}, 0)
        loss.backward()
        opt.step()
        result["seconds"] = time.perf_counter() - t
    else:
        model.eval()
        with torch.no_grad():
            t = time.perf_counter()
            out = model.evaluate_batch(x)
            result["seconds"] = time.perf_counter() - t
            assert out["_reconstruction"].shape == x.shape
    result["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES, help="run one case in this process (prints JSON)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    args = ap.parse_args()
    if args.case:
        report(measure(args.case))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, HR 512x512, x16")
    print(f"{'case':<24} {'time (s)':>9} {'peak RSS (GB)':>13} {'trainable (M)':>13} {'ckpt/UNet':>9}")
    for case in CASES:
        r, why = run_case(__file__, case, args.timeout)
        if r is None:
            print(f"{case:<24} {why}", flush=True)
            continue
        print(
            f"{case:<24} {r['seconds']:>9.1f} {r['peak_rss_GB']:>13.2f} {r['trainable_M']:>13.1f} "
            f"{100 * r['ckpt_over_unet']:>8.1f}%",
            flush=True,
        )


if __name__ == "__main__":
    main()
