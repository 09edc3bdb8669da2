"""Stage-2 cost of the FULL-SIZE SD 3.5 Medium transformer (and of FLUX.1-dev at the depth this machine
can hold) on this CPU, random weights, no download: one training step at 512x512, one x16 upscale of a
512x512 image, and the size of the trained state / of the ``tadm export`` file.

    flock /tmp/tadm-heavy.lock .venv/bin/python benchmarks/dit_cpu.py                 # every case
    flock /tmp/tadm-heavy.lock .venv/bin/python benchmarks/dit_cpu.py --case sd35-medium:upscale
    .venv/bin/python benchmarks/dit_cpu.py --case sizes                               # meta device, seconds

Each case runs in a fresh subprocess so its peak RSS is its own. Prints a table; asserts nothing.
As ``enhancer_cpu.py`` does for SD 2.1 / SDXL: the text encoders are replaced by a random empty-prompt
embedding of the right shape (they run once at load time, or never with ``prompt_embedding``), LPIPS and
DISTS run on a random VGG16 stand-in, fp32, batch 1, gradient checkpointing in training.

FLUX.1-dev's 11.9 B transformer is 47.6 GB in fp32 and 23.8 GB in bf16: it does not fit in this machine's
24 GiB of RAM next to anything else. ``flux1-dev-dXsY`` keeps its full width and X of its 19 double
blocks and Y of its 38 single blocks; the upscale case also times the transformer alone, from which the
full depth's transformer time is extrapolated per parameter (each block costs time in proportion to its
parameters at a fixed token count).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from case_runner import report, run_case  # noqa: E402

from tadm.components.backbones.flow_transformers.flow_presets import FLOW_PRESETS  # noqa: E402
from tadm.testing.twins.full_size_architectures import FULL_SIZE_DIT_VAE, FULL_SIZE_TRANSFORMERS  # noqa: E402

#: empty-prompt embedding shapes: (T5 tokens + CLIP tokens, width), pooled width
PROMPT = {"sd3": ((77 + 256, 4096), 2048), "flux": ((512, 4096), 768)}
FLUX_PARTIAL = "flux1-dev-d4s8"
CASES = [
    "sizes",
    "sd35-medium:upscale",
    "sd35-medium:train",
    f"{FLUX_PARTIAL}:upscale",
    f"{FLUX_PARTIAL}:train",
]


def transformer_config(name: str) -> tuple[str, dict]:
    """(preset, diffusers config) of a case's transformer; ``flux1-dev-dXsY`` cuts FLUX.1-dev's depth."""
    if name.startswith("flux1-dev-d"):
        double, single = name.removeprefix("flux1-dev-d").split("s")
        cfg = dict(FULL_SIZE_TRANSFORMERS["flux1-dev"], num_layers=int(double), num_single_layers=int(single))
        return "flux1-dev", cfg
    return name, FULL_SIZE_TRANSFORMERS[name]


def build_model(name: str):  # type: ignore[no-untyped-def]
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )

    from tadm.components.aligners.tpm import TimestepPredictionModule
    from tadm.components.backbones.flow_transformers import FluxBackbone, SD3Backbone
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.training.lightning_module import TADMModule

    preset, cfg = transformer_config(name)
    p = FLOW_PRESETS[preset]
    torch.manual_seed(0)
    cls, tcls = (
        (SD3Backbone, SD3Transformer2DModel) if p.family == "sd3" else (FluxBackbone, FluxTransformer2DModel)
    )
    b = cls(preset, gradient_checkpointing=True)
    cpu = torch.device("cpu")
    # the modules from_pretrained would give, with random weights (no download)
    b.vae = b._freeze(
        AutoencoderKL(**FULL_SIZE_DIT_VAE, scaling_factor=p.scaling_factor, shift_factor=p.shift_factor), cpu
    )
    b.transformer = b._freeze(tcls(**cfg), cpu)
    sched = {"sd3": dict(shift=3.0), "flux": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)}
    b._set_schedule(FlowMatchEulerDiscreteScheduler(**sched[p.family]))
    (seq, width), pooled = PROMPT[p.family]
    b._set_prompt(torch.randn(1, seq, width), torch.randn(1, pooled))
    params = sum(q.numel() for q in b.transformer.parameters())
    model = TADMModule(
        b, DFRM(scale=16, latent_channels=16), stage="enhancer", aligner=TimestepPredictionModule()
    )
    model.configure_model()  # what a trainer does first (the parts are in place: wires the enhancer)
    return model, params


def measure(case: str) -> dict:
    if case == "sizes":
        return sizes()
    name, kind = case.split(":")
    t0 = time.perf_counter()
    model, params = build_model(name)
    result: dict = {"case": case, "transformer_params_B": params / 1e9, "build_s": time.perf_counter() - t0}
    trainable = model.trainable_parameters()
    result["trainable_M"] = sum(q.numel() for q in trainable) / 1e6
    x = torch.rand(1, 3, 512, 512) * 2 - 1
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
        spent = [0.0]
        transformer = model.backbone.transformer
        transformer.register_forward_pre_hook(lambda *_: spent.append(-time.perf_counter()))
        transformer.register_forward_hook(lambda *_: spent.append(time.perf_counter()))
        with torch.no_grad():
            t = time.perf_counter()
            out = model.evaluate_batch(x)
            result["seconds"] = time.perf_counter() - t
        assert out["_reconstruction"].shape == x.shape
        result["transformer_s"] = sum(spent)
    result["peak_rss_GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def sizes() -> dict:
    """Trained tensors and the ``tadm export`` file of the full-size models, counted on the meta device, with
    the LoRA each backbone adds itself (its default ranks)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    from tadm.components.aligners.tpm import TimestepPredictionModule
    from tadm.components.backbones.flow_transformers import FluxBackbone, SD3Backbone
    from tadm.components.rescalers.dfrm import DFRM
    from tadm.model.enhancer import HybridScheduler

    out = {"case": "sizes"}
    small = {
        "dfrm": sum(q.numel() for q in DFRM(scale=16, latent_channels=16).parameters()),
        "tpm": sum(q.numel() for q in TimestepPredictionModule(latent_channels=16).parameters()),
        "refiner": sum(q.numel() for q in HybridScheduler(latent_channels=16).parameters()),
    }
    for name in ("sd35-medium", "sd35-large", "flux1-dev"):
        sd3 = FLOW_PRESETS[name].family == "sd3"
        b = (SD3Backbone if sd3 else FluxBackbone)(name)
        with torch.device("meta"):
            b.transformer = (SD3Transformer2DModel if sd3 else FluxTransformer2DModel)(
                **FULL_SIZE_TRANSFORMERS[name]
            )
            b.vae = AutoencoderKL(**FULL_SIZE_DIT_VAE)
            full = sum(q.numel() for q in b.transformer.parameters())
            b._add_lora()
        lora = sum(q.numel() for m in (b.transformer, b.vae) for n, q in m.named_parameters() if "lora_" in n)
        trained = lora + small["tpm"] + small["refiner"]
        export_mb = (2 * trained + 4 * small["dfrm"]) / 1e6  # bf16, the DFRM in fp32 (tadm export's default)
        out[name] = {
            "transformer_B": full / 1e9,
            "lora_M": lora / 1e6,
            "stage2_trained_M": trained / 1e6,
            "ckpt_over_transformer": (trained + small["dfrm"]) / full,
            "export_MB": export_mb,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=f"run one case in this process (prints JSON): {', '.join(CASES)}")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    args = ap.parse_args()
    if args.case:
        if args.case != "sizes":  # LPIPS / DISTS load torchvision's VGG16: a random stand-in, offline
            from tadm.testing.twins.vgg16_stand_in import write_random_vgg16

            home = Path(tempfile.gettempdir()) / "tadm-bench-torch-home"
            write_random_vgg16(home)
            os.environ["TORCH_HOME"] = str(home)
        report(measure(args.case))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, HR 512x512, x16")
    for case in CASES:
        t = time.perf_counter()
        r, why = run_case(__file__, case, args.timeout)
        if r is None:
            print(f"{case}: {why}", flush=True)
            continue
        r["wall_s"] = time.perf_counter() - t
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
