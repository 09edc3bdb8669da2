"""``tadm import-release --dfrm DFRM --tadm model_sr_x16.pkl --output tadm_x16.safetensors``: the authors'
released weights as a tadm checkpoint (see :mod:`tadm.model.release_import`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tadm.commands.common import EXIT_OK, command, writable_file
from tadm.model.checkpoints import EXPORT_DTYPES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tadm import-release",
        description="Convert the authors' released TADM weights (github.com/wwangcece/TADM: a DFRM file and "
        "model_sr_x16.pkl / model_sr_x32.pkl) into one tadm checkpoint in the `tadm export` format. Its "
        "stored config is the release preset (SD 2.1 768-v with the sd-vae-ft-mse VAE and every "
        "release-compatible option), so `tadm downscale/upscale/evaluate --ckpt` use it as is. The files are "
        "read without running code (torch.load weights_only); every tensor is checked against the model "
        "(the backbone is loaded for that) and nothing is written unless all fit.",
        epilog="example: tadm import-release --dfrm checkpoints/dfrm_x16.pkl --tadm checkpoints/model_sr_x16.pkl "
        "--output tadm_x16.safetensors --backbone-pretrained /models/stable-diffusion-2-1",
    )
    ap.add_argument("--dfrm", required=True, help="the release's DFRM file ({'state_dict': ...})")
    ap.add_argument("--tadm", required=True, help="the release's enhancer file (model_sr_x16.pkl)")
    ap.add_argument("--output", "-o", required=True, help="the .safetensors file to write")
    ap.add_argument(
        "--scale", type=int, choices=[16, 32], help="expected scale (default: the DFRM file's); checked"
    )
    ap.add_argument(
        "--backbone-pretrained",
        help="local diffusers folder (or hub id) of Stable Diffusion 2.1 (default: stabilityai/stable-diffusion-2-1)",
    )
    ap.add_argument(
        "--vae",
        help="the VAE: a local folder or hub id (default: stabilityai/sd-vae-ft-mse, as the release; "
        "'none' keeps the pipeline's own)",
    )
    ap.add_argument(
        "--backbone-preset",
        default="sd21",
        help="backbone preset (default sd21: the release's 768-v SD 2.1; tiny-sd21 for tests)",
    )
    ap.add_argument(
        "--aligner-latents",
        choices=["release", "unscaled", "scaled"],
        default="release",
        help="what the TPM reads at inference: release = scaled, as the release's inference script "
        "(default); unscaled = as the release trained it",
    )
    ap.add_argument(
        "--dtype",
        choices=list(EXPORT_DTYPES),
        default="fp32",
        help="dtype of non-DFRM tensors (default fp32)",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return ap


@command("tadm import-release")
def import_release_command(argv: Sequence[str]) -> int:
    """``tadm import-release`` entry point: 0 written, 2 unusable input or output (nothing written)."""
    args = _parser().parse_args(list(argv))
    target = writable_file(args.output)
    from tadm.model.release_import import RELEASE_VAE, import_release

    if args.vae is None:
        vae = None if args.backbone_preset.startswith("tiny-") else RELEASE_VAE
    else:
        vae = None if args.vae.lower() == "none" else args.vae
    out = import_release(
        args.dfrm,
        args.tadm,
        target,
        scale=args.scale,
        preset=args.backbone_preset,
        pretrained=args.backbone_pretrained,
        vae=vae,
        aligner_latents=args.aligner_latents,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(f"{args.dfrm} + {args.tadm} -> {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype}, DFRM fp32)")
    return EXIT_OK
