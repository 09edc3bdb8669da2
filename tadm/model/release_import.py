"""The authors' released weights -> a tadm inference checkpoint (``tadm import-release``).

The release ships two files per scale: the DFRM (``torch.save({"state_dict": ...})``) and the enhancer
pickle ``model_sr_x16.pkl`` (``src/tadm.py`` ``save_model``: LoRA target modules and ranks, then the
state dicts of the UNet (LoRA + conv_in), the VAE decoder's LoRA, the TPM and the Refiner). Both are
read with ``torch.load(weights_only=True)``, which runs no code; a file that needs more is refused.
Their tensors are renamed (:mod:`tadm.model.release_keys`), checked against the model the release
preset describes (every missing, unknown or misshapen tensor named, in the release's own names), and
written as a ``tadm export`` safetensors file whose stored config is that preset, so every command
rebuilds the release's arithmetic without flags. Nothing is written unless everything fits.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from tadm.errors import CheckpointError
from tadm.model.checkpoints import META_KEY, export_state, load_weights_only
from tadm.model.release_keys import (
    SECTION_MAPS,
    dfrm_key_map,
    dfrm_scale,
    lora_key,
    lora_module,
    release_name,
)
from tadm.model.tadm_model import TADMModel
from tadm.ops.files import atomic_write
from tadm.ops.safetensors_file import save_safetensors

#: the release's variant of every part; ``configs/experiments/release/*.yaml`` set the same values
#: (``tests/model/test_import_release.py`` keeps them equal). Stage 1 differs in one: ``unscaled_latents: false``.
RELEASE_BACKBONE: dict[str, Any] = {
    "preset": "sd21",
    "vae": "stabilityai/sd-vae-ft-mse",
    "unet_lora_rank": 48,
    "vae_lora_rank": 16,
    "unet_lora_alpha": 8,
    "vae_lora_alpha": 8,
}
RELEASE_RESCALER: dict[str, Any] = {
    "final_activation": True,
    "lr_guidance": "plain",
    "unscaled_latents": True,
}
RELEASE_ALIGNER: dict[str, Any] = {"activation": "relu", "unbiased_std": True, "relu_before_output": False}
RELEASE_ENHANCER: dict[str, Any] = {
    "t0": 50.0,
    "mode": "hybrid",
    "refiner_activation": "relu",
    "refiner_flip_sin_to_cos": False,
    "refiner_freq_shift": 1.0,
    "refiner_tail_activation": True,
}
RELEASE_MODEL: dict[str, Any] = {"aligner_latents": "release"}
RELEASE_VAE = RELEASE_BACKBONE["vae"]
#: the top-level entries of ``model_sr_x16.pkl``, with the type each must have
TADM_FILE_KEYS: dict[str, type] = {
    "unet_lora_target_modules": list,
    "vae_lora_target_modules": str,
    "rank_unet": int,
    "rank_vae": int,
    "state_dict_unet": dict,
    "state_dict_vae": dict,
    "state_dict_timemapping": dict,
    "state_dict_refiner": dict,
}
SUPPORTED_SCALES = (16, 32)


@dataclass
class ReleaseFiles:
    """The two release files, read: the DFRM state dict, the enhancer pickle's dict, their scale."""

    dfrm: dict[str, Tensor]
    tadm: dict[str, Any]
    scale: int
    dfrm_path: Path
    tadm_path: Path


def _load_release_file(path: str | Path, what: str) -> Any:
    """A release file, read without running code (:func:`~tadm.model.checkpoints.load_weights_only`): a
    file that needs any other Python object is refused, naming the object it holds."""
    return load_weights_only(
        path,
        f"the release's {what}",
        f"The release's {what} holds only tensors, numbers, strings and lists; only a file you trust "
        "should be re-saved with plain types",
    )


def _tensor_dict(obj: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{where} is not a dict of tensors")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor))
    if bad:
        raise CheckpointError(f"{where}: entries {bad[:5]} are not named tensors")
    return obj


def _names(keys: set[str], limit: int = 8) -> str:
    shown = sorted(keys)[:limit]
    return f"{shown}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"


def read_release_files(
    dfrm_file: str | Path, tadm_file: str | Path, scale: int | None = None
) -> ReleaseFiles:
    """Read and check the layout of both files; ``scale`` (when given) must be the DFRM's."""
    dfrm_path, tadm_path = Path(dfrm_file).expanduser(), Path(tadm_file).expanduser()
    raw = _load_release_file(dfrm_path, "DFRM file")
    if isinstance(raw, dict) and set(raw) == {"state_dict"}:  # DFRM.save_model; a bare state dict is fine too
        raw = raw["state_dict"]
    dfrm = _tensor_dict(raw, f"'{dfrm_path}' (the release's DFRM file: {{'state_dict': {{...}}}})")
    found = dfrm_scale(set(dfrm))
    if found is None:
        raise CheckpointError(
            f"'{dfrm_path}' is not the release's DFRM: it has no down_module.*.downsample tensors "
            f"(it holds {_names(set(dfrm), 4)})"
        )
    if found not in SUPPORTED_SCALES:
        raise CheckpointError(f"'{dfrm_path}' is a x{found} DFRM; the release has x16 and x32")
    if scale is not None and scale != found:
        raise CheckpointError(
            f"'{dfrm_path}' is a x{found} DFRM ({int(found).bit_length() - 1} pixel-branch downsampling "
            f"steps), but x{scale} was asked for (--scale {scale}); use the x{scale} DFRM or --scale {found}"
        )
    _check_names(dfrm_path, "DFRM state_dict", set(dfrm), set(dfrm_key_map(found)))
    tadm = _load_release_file(tadm_path, "enhancer file (model_sr_x*.pkl)")
    _check_tadm_layout(tadm_path, tadm)
    return ReleaseFiles(dfrm, tadm, found, dfrm_path, tadm_path)


def _check_names(path: Path, section: str, have: set[str], want: set[str]) -> None:
    missing, unknown = want - have, have - want
    if missing or unknown:
        parts = [
            f"lacks {_names(missing)}" if missing else "",
            f"has unknown {_names(unknown)}" if unknown else "",
        ]
        raise CheckpointError(f"'{path}': its {section} {' and '.join(p for p in parts if p)}")


def _check_tadm_layout(path: Path, obj: Any) -> None:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"'{path}' is not the release's enhancer file: a {type(obj).__name__}, not a dict"
        )
    have = {str(k) for k in obj}
    _check_names(path, "top level", have, set(TADM_FILE_KEYS))
    for key, kind in TADM_FILE_KEYS.items():
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise CheckpointError(f"'{path}': {key} is a {type(obj[key]).__name__}, not a {kind.__name__}")
    targets = obj["unet_lora_target_modules"]
    if not targets or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"'{path}': unet_lora_target_modules is not a list of module names")
    for section, build in SECTION_MAPS.items():
        state = _tensor_dict(obj[section], f"'{path}' {section}")
        _check_names(path, section, set(state), set(build()))
    for part in ("unet", "vae"):
        state = _tensor_dict(obj[f"state_dict_{part}"], f"'{path}' state_dict_{part}")
        unknown = {k for k in state if lora_key(part, k) is None}
        if unknown:
            raise CheckpointError(f"'{path}': its state_dict_{part} has unknown {_names(unknown)}")
        _check_lora_ranks(path, part, state, obj[f"rank_{part}"])


def _check_lora_ranks(path: Path, part: str, state: dict[str, Tensor], rank: int) -> None:
    """Every LoRA module has both factors, of the rank the file records (A: rank rows, B: rank columns)."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        hit = lora_module(part, key)
        if hit is not None:
            modules.setdefault(hit[0], {})[hit[1]] = value
    half = {m for m, ab in modules.items() if set(ab) != {"A", "B"}}
    if half:
        raise CheckpointError(f"'{path}': state_dict_{part} has only one LoRA factor for {_names(half)}")
    wrong = {
        m
        for m, ab in modules.items()
        if ab["A"].ndim < 2 or ab["B"].ndim < 2 or ab["A"].shape[0] != rank or ab["B"].shape[1] != rank
    }
    if wrong:
        raise CheckpointError(
            f"'{path}': state_dict_{part} LoRA of {_names(wrong)} is not of rank_{part} = {rank}"
        )


def convert_state(files: ReleaseFiles) -> dict[str, Tensor]:
    """All release tensors under tadm's names (rescaler., aligner., enhancer.refiner., backbone.unet/vae.)."""
    state = {ours: files.dfrm[release] for release, ours in dfrm_key_map(files.scale).items()}
    for section, build in SECTION_MAPS.items():
        state.update({ours: files.tadm[section][release] for release, ours in build().items()})
    for part in ("unet", "vae"):
        for key, value in files.tadm[f"state_dict_{part}"].items():
            state[str(lora_key(part, key))] = value
    return state


def release_model_config(
    scale: int,
    rank_unet: int = 48,
    rank_vae: int = 16,
    unet_targets: list[str] | None = None,
    preset: str = "sd21",
    pretrained: str | None = None,
    vae: str | None = RELEASE_VAE,
    aligner_latents: str = "release",
) -> dict[str, Any]:
    """The ``model:`` section of the release's stage-2 recipe (``configs/experiments/release/``) at
    ``scale``, on the given backbone, with the ranks and UNet LoRA targets the release file records."""
    backbone = {**RELEASE_BACKBONE, "preset": preset, "pretrained": pretrained, "vae": vae}
    backbone.update(unet_lora_rank=rank_unet, vae_lora_rank=rank_vae)
    if unet_targets is not None:
        backbone["unet_lora_targets"] = list(unet_targets)
    return {
        "scale": scale,
        "stage": "enhancer",
        "backbone": {"class_path": "stable_diffusion", "init_args": backbone},
        "rescaler": {"class_path": "dfrm", "init_args": copy.deepcopy(RELEASE_RESCALER)},
        "aligner": {"class_path": "tpm", "init_args": copy.deepcopy(RELEASE_ALIGNER)},
        "enhancer": {
            "class_path": "tadm.model.enhancer.HybridScheduler",
            "init_args": copy.deepcopy(RELEASE_ENHANCER),
        },
        "loss_weights": {"pixel": 2.0, "lpips": 5.0, "dists": 5.0},
        "aligner_latents": aligner_latents,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """What a checkpoint of ``module`` stores: rescaler, aligner, enhancer and the trained backbone tensors."""
    trained = {id(p) for p in module.trainable_parameters()}
    params = dict(module.named_parameters())
    return {
        k: tuple(v.shape)
        for k, v in module.state_dict().items()
        if k.startswith(("rescaler.", "aligner.", "enhancer.")) or (k in params and id(params[k]) in trained)
    }


def check_against_model(state: dict[str, Tensor], module: Any, scale: int, source: str) -> None:
    """Every tensor the model stores is there with its shape, and nothing else; errors use release names."""
    want = _expected_shapes(module)
    missing, unknown = set(want) - set(state), set(state) - set(want)
    wrong = {k for k in set(want) & set(state) if tuple(state[k].shape) != want[k]}
    problems = []
    if missing:
        problems.append(f"lack {_names({release_name(k, scale) for k in missing})}")
    if unknown:
        problems.append(
            f"hold tensors this backbone has no place for: {_names({release_name(k, scale) for k in unknown})}"
        )
    if wrong:
        shown = sorted(wrong)[:4]
        detail = ", ".join(f"{release_name(k, scale)} {tuple(state[k].shape)} vs {want[k]}" for k in shown)
        problems.append(f"have tensors of other shapes than the model's: {detail}")
    if problems:
        raise CheckpointError(
            f"the release files ({source}) do not fit the release model: {'; '.join(problems)}"
        )


def import_release(
    dfrm_file: str | Path,
    tadm_file: str | Path,
    output: str | Path,
    scale: int | None = None,
    preset: str = "sd21",
    pretrained: str | None = None,
    vae: str | None = RELEASE_VAE,
    aligner_latents: str = "release",
    dtype: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Convert the release's DFRM + enhancer files into one ``tadm export`` checkpoint; returns ``output``.

    The model the stored config describes is built once (the backbone is loaded: the LoRA tensors are
    checked against its modules) and the converted tensors are loaded into it before anything is written.
    """
    out = Path(output).expanduser()
    if out.suffix != ".safetensors":
        raise CheckpointError(f"output '{out}' must end in .safetensors")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output '{out}' exists; pass --overwrite to replace it")
    files = read_release_files(dfrm_file, tadm_file, scale)
    source = f"'{files.dfrm_path}' + '{files.tadm_path}'"
    state = convert_state(files)
    model_cfg = release_model_config(
        files.scale,
        files.tadm["rank_unet"],
        files.tadm["rank_vae"],
        files.tadm["unet_lora_target_modules"],
        preset,
        pretrained,
        vae,
        aligner_latents,
    )
    header = (
        f"# imported by `tadm import-release` from {files.dfrm_path.name} + {files.tadm_path.name}:\n"
        "# the authors' release preset (configs/experiments/release/), stage-2 model\n"
    )
    config = header + yaml.safe_dump({"model": model_cfg}, sort_keys=False)
    try:
        model = TADMModel.from_config(config, source)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err} (tadm import-release checks the LoRA tensors against the backbone: give local copies "
            "with --backbone-pretrained /path/to/stable-diffusion-2-1 and --vae /path/to/sd-vae-ft-mse)"
        ) from err
    check_against_model(state, model, files.scale, source)
    model.load_trained_state(state, source)
    meta = {
        **model.checkpoint_meta(config),
        "imported_from": {
            "dfrm": {"file": files.dfrm_path.name, "sha256": _sha256(files.dfrm_path)},
            "tadm": {"file": files.tadm_path.name, "sha256": _sha256(files.tadm_path)},
        },
    }
    tensors = export_state(state, dtype)
    metadata = {META_KEY: json.dumps(meta), "export_dtype": dtype, "format": "pt"}

    return atomic_write(out, lambda tmp: save_safetensors(tensors, tmp, metadata))
