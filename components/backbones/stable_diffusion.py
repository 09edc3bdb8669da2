"""Stable Diffusion (1.5, 2.1, 2.1-base, SDXL) as a TADM backbone, composed from diffusers parts.

Only the parts a stage needs are loaded (stage 1: the VAE alone). Weights come from a hub id or a
local diffusers folder through the libraries' own ``from_pretrained``, or from one original
(Stability/CompVis layout) ``.safetensors`` / ``.ckpt`` file through diffusers' ``from_single_file``
with the configs of a local diffusers folder; ``tiny-*`` presets build the same module classes with
random weights (see :mod:`tadm.components.backbones.presets`). All loaded modules are frozen; later stages
add LoRA on top.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tadm.components.backbones.presets import TEXT_SUBFOLDERS, build_tiny_components, get_preset
from tadm.contracts import BACKBONES, DiffusionBackbone

PARTS = ("vae", "unet", "text")
#: docs/method.md: LoRA targets on the UNet (conv_in is trained fully, not through LoRA)
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
)  # fmt: skip
#: LoRA targets on the VAE decoder only (a full-match regex, so encoder modules never match)
VAE_DECODER_LORA_REGEX = (
    r"decoder\.(.*\.)?(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_q|to_k|to_v|to_out\.0)"
)
#: weight file stems written by save_pretrained (diffusers models / transformers models)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
_TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")
#: where each part lives in an original (Stability/CompVis) single file, per family; text encoders
#: are keyed by the diffusers subfolder they replace
SINGLE_FILE_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "sd15": {"text_encoder": ("cond_stage_model.transformer.",)},
    "sd21": {"text_encoder": ("cond_stage_model.model.",)},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.",),
        "text_encoder_2": ("conditioner.embedders.1.model.",),
    },
}
SINGLE_FILE_UNET = ("model.diffusion_model.",)
SINGLE_FILE_VAE = ("first_stage_model.", "vae.")


def _looks_like_path(src: str) -> bool:
    """A string that cannot be a hub id (``org/name``) is meant as a local folder."""
    return (
        src.startswith(("/", ".", "~", "\\"))
        or src.count("/") > 1
        or "\\" in src
        or (len(src) > 1 and src[1] == ":")
        or Path(src).expanduser().exists()
    )


def _weight_candidates(folder: Path, stems: tuple[str, ...], variant: str | None) -> list[Path]:
    suffix = f".{variant}" if variant else ""
    names = []
    for stem in stems:
        names += [f"{stem}{suffix}.safetensors", f"{stem}{suffix}.bin"]
        names += [f"{stem}.safetensors.index{suffix}.json", f"{stem}.bin.index{suffix}.json"]
        names += [f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"] if suffix else []
    return [folder / n for n in names]


@BACKBONES.register(
    "stable_diffusion", "Stable Diffusion 1.5 / 2.1 / 2.1-base / SDXL (VAE, UNet, text encoders)"
)
class StableDiffusionBackbone(DiffusionBackbone):
    """Stable Diffusion VAE (and, for the enhancer, UNet, noise schedule and text encoders).

    Construction only records where weights come from; :meth:`load` builds the named parts.
    Until the VAE is loaded, ``latent_channels`` / ``downsample_factor`` / ``scaling_factor``
    report the preset's known values, so a CLI can link them without touching weights.

    Args:
        preset: Named variant: ``sd15``, ``sd21``, ``sd21-base``, ``sdxl`` or a random tiny one
            for tests (``tiny-sd15``, ``tiny-sd21``, ``tiny-sdxl``). Decides the family (which
            text encoders exist) and the fallback latent shape.
        pretrained: Hub id or local diffusers pipeline folder (``model_index.json``, ``vae/``,
            ``unet/``, ...). Default: the preset's hub id; tiny presets build random weights.
        vae: A separate VAE to use instead of the pipeline's, as a hub id or local folder holding
            the VAE at its root (e.g. ``stabilityai/sd-vae-ft-mse``). Also wins over ``single_file``.
        single_file: Path to one ``.safetensors`` / ``.ckpt`` file in the ORIGINAL Stability/CompVis
            layout (e.g. ``v2-1_512-ema-pruned.safetensors``: ``model.diffusion_model.*``,
            ``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``). The UNet,
            the VAE and the text encoder(s) are loaded from it with diffusers' ``from_single_file``;
            ``pretrained`` must then be a LOCAL diffusers folder of the same model that gives the
            configs (``unet/config.json``, ``vae/config.json``, ``text_encoder*/config.json``), the
            tokenizers and the scheduler; its weight files are not needed (except for a text encoder
            the file lacks: that one is read from the folder, with a warning). Nothing touches the
            network. Only the file's name enters ``backbone_id``.
        revision: Hub revision (branch, tag or commit) of ``pretrained``; not applied to ``vae``.
        variant: Weight variant of ``pretrained`` (e.g. ``fp16`` loads
            ``diffusion_pytorch_model.fp16.safetensors``); not applied to ``vae``.
        sample_latent: Encode with a sample of the VAE posterior instead of its mean. The mean
            (default) makes latents deterministic, so they can be precomputed and cached.
        local_files_only: Passed to ``from_pretrained``: True never touches the network, None
            leaves the libraries' default (``HF_HUB_OFFLINE``). Local folders never use it.
        unet_lora_rank: LoRA rank on the UNet for stages ``enhancer``/``joint`` (TADM: 32; the
            release's script uses 48). ``conv_in`` is trained fully besides.
        vae_lora_rank: LoRA rank on the VAE decoder (TADM: 16); the encoder always stays frozen.
        unet_lora_targets: UNet module names (suffixes) that get LoRA; default: TADM's list
            (attention projections, ResNet convs, proj_in/out, feed-forward, conv_out).
        gradient_checkpointing: Recompute UNet / VAE-decoder activations in the backward pass:
            much less memory for about a third more time.
    """

    def __init__(
        self,
        preset: str = "sd21-base",
        pretrained: str | None = None,
        vae: str | None = None,
        single_file: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        sample_latent: bool = False,
        local_files_only: bool | None = None,
        unet_lora_rank: int = 32,
        vae_lora_rank: int = 16,
        unet_lora_targets: list[str] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.preset_name = preset
        self.preset = get_preset(preset)
        source = pretrained if pretrained is not None else self.preset.hub_id
        if source is None and not self.preset.tiny:
            raise ValueError(
                f"backbone preset {preset!r} has no hub id; set `pretrained` to a hub id or folder"
            )
        if single_file is not None and (source is None or not _looks_like_path(source)):
            hub = self.preset.hub_id or "stabilityai/stable-diffusion-2-1-base"
            raise ValueError(
                f"backbone preset {preset!r}: `single_file` needs `pretrained` to be a local diffusers "
                f"folder with the model's configs, tokenizers and scheduler (got {source!r}); get one with "
                f"`hf download {hub} --exclude '*.safetensors' '*.bin' '*.ckpt' --local-dir /path/to/folder`"
            )
        self.pretrained = source
        self.single_file = single_file
        self.vae_source = vae
        self.revision = revision
        self.variant = variant
        self.sample_latent = sample_latent
        self.local_files_only = local_files_only
        # frozen modules, filled by load(); plain submodule attributes so callers can wrap them
        self.vae: nn.Module | None = None
        self.unet: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        self.text_encoder_2: nn.Module | None = None
        self.tokenizer: Any = None
        self.tokenizer_2: Any = None
        self.scheduler: Any = None
        self.num_train_timesteps: int | None = None
        self.unet_lora_rank = unet_lora_rank
        self.vae_lora_rank = vae_lora_rank
        self.unet_lora_targets = list(unet_lora_targets or UNET_LORA_TARGETS)
        self.gradient_checkpointing = gradient_checkpointing
        self._lora_stage: str | None = None
        # empty-prompt conditioning, computed once when the text part is loaded (then encoders are freed)
        self.register_buffer("prompt_embeds", None, persistent=False)
        self.register_buffer("pooled_prompt_embeds", None, persistent=False)
        # follows .to(device) so parts loaded after the module was moved land on the same device
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    # --- what the rest of the framework reads ------------------------------------------------
    @property
    def backbone_id(self) -> str:
        source = self.pretrained if self.pretrained is not None else f"random-seed{self.preset.seed}"
        if self.revision:
            source += f"@{self.revision}"
        if self.variant:
            source += f"[{self.variant}]"
        if self.single_file:
            source += f"+single_file={Path(self.single_file).name}"
        if self.vae_source:
            source += f"+vae={self.vae_source}"
        return f"stable_diffusion:{self.preset_name}:{source}"

    @property
    def latent_channels(self) -> int:  # type: ignore[override]
        return int(self.vae.config.latent_channels) if self.vae is not None else self.preset.latent_channels

    @property
    def downsample_factor(self) -> int:  # type: ignore[override]
        if self.vae is None:
            return self.preset.downsample_factor
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:  # type: ignore[override]
        if self.vae is None:
            return self.preset.scaling_factor
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """Latent shift of VAEs that have one (none in the SD families: 0)."""
        shift = getattr(self.vae.config, "shift_factor", None) if self.vae is not None else None
        return float(shift or 0.0)

    @property
    def loaded_parts(self) -> frozenset[str]:
        names = {"vae": self.vae, "unet": self.unet, "text": self.prompt_embeds}
        return frozenset(k for k, v in names.items() if v is not None)

    # --- loading -----------------------------------------------------------------------------
    def load(self, parts: Iterable[str]) -> None:
        """Build or load the named parts (``vae``, ``unet`` + schedule, ``text``); idempotent."""
        wanted = [parts] if isinstance(parts, str) else list(parts)
        unknown = sorted(set(wanted) - set(PARTS))
        if unknown:
            raise ValueError(f"unknown backbone parts {unknown}; choose from {list(PARTS)}")
        todo = [p for p in PARTS if p in wanted and p not in self.loaded_parts]
        if not todo:
            return
        tiny: dict[str, Any] = {}
        if self.pretrained is None:
            need = [p for p in todo if not (p == "vae" and self.vae_source)]
            tiny = build_tiny_components(self.preset, parts=need) if need else {}

        single = self._read_single_file(todo) if self.single_file is not None else {}

        def get(part: str, sub: str) -> Any:  # the same modules: random-tiny, single file or from_pretrained
            if sub in tiny:
                return tiny[sub]
            if sub in single:
                return self._from_single_file(sub, single.pop(sub))
            return self._from_pretrained(part, sub)

        # everything is loaded first and assigned only if all of it worked: no half-loaded parts
        new: dict[str, Any] = {}
        if "vae" in todo:
            if "vae" in tiny or "vae" in single:
                new["vae"] = get("vae", "vae")
            else:
                new["vae"] = self._load_vae()
        if "unet" in todo:
            new["unet"], new["scheduler"] = get("unet", "unet"), get("unet", "scheduler")
        if "text" in todo:
            for enc_name, tok_name in TEXT_SUBFOLDERS[self.preset.family]:
                new[enc_name], new[tok_name] = get("text", enc_name), get("text", tok_name)
        vae, unet = new.get("vae", self.vae), new.get("unet", self.unet)
        if vae is not None and unet is not None and unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"backbone {self.backbone_id}: the UNet takes {unet.config.in_channels} latent "
                f"channels but the VAE gives {vae.config.latent_channels}; use a matching VAE"
            )
        for name, obj in new.items():
            if name == "scheduler":
                self._set_schedule(obj)
            elif isinstance(obj, nn.Module):
                setattr(self, name, self._freeze(obj, self._device_anchor.device))
            else:
                setattr(self, name, obj)
        if "text" in todo:
            self._encode_empty_prompt()

    # --- the enhancer: empty-prompt conditioning, one UNet call, trainable parts -------------
    @torch.no_grad()
    def _encode_empty_prompt(self) -> None:
        """Embed the EMPTY prompt once and release the text encoders (they are never needed again)."""
        pairs = [(self.text_encoder, self.tokenizer)]
        if self.preset.family == "sdxl":
            pairs.append((self.text_encoder_2, self.tokenizer_2))
        hidden, pooled = [], None
        for encoder, tokenizer in pairs:
            length = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
            ids = tokenizer("", padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids.to(self._device_anchor.device), output_hidden_states=True)
            if self.preset.family == "sdxl":  # SDXL: penultimate layer of both encoders, pooled from the 2nd
                hidden.append(out.hidden_states[-2])
                pooled = out[0]
            else:
                hidden.append(out[0])
        self.prompt_embeds = torch.cat(hidden, dim=-1).float()
        self.pooled_prompt_embeds = pooled.float() if pooled is not None else None
        self.text_encoder = self.text_encoder_2 = self.tokenizer = self.tokenizer_2 = None

    def _require(self, part: str) -> None:
        if part not in self.loaded_parts:
            raise RuntimeError(
                f"backbone {self.backbone_id}: part {part!r} is not loaded; call load_for_stage(...)"
            )

    def predict(self, z_t: Tensor, t: Tensor) -> Tensor:
        """One UNet call on scaled latents at timesteps ``t`` (B,) with the empty-prompt condition."""
        self._require("unet")
        self._require("text")
        assert self.unet is not None and self.prompt_embeds is not None
        b = z_t.shape[0]
        t = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
        cond = self.prompt_embeds.expand(b, -1, -1).to(self.unet.dtype)
        kwargs: dict[str, Any] = {}
        if self.preset.family == "sdxl":
            h, w = (s * self.downsample_factor for s in z_t.shape[-2:])
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=z_t.device, dtype=self.unet.dtype)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled_prompt_embeds.expand(b, -1).to(self.unet.dtype),
                "time_ids": time_ids.expand(b, -1),
            }
        out = self.unet(z_t.to(self.unet.dtype), t.to(z_t.device), encoder_hidden_states=cond, **kwargs)
        return out.sample.float()

    def load_for_stage(self, stage: str) -> None:
        super().load_for_stage(stage)
        if stage in ("enhancer", "joint") and self._lora_stage is None:
            self._add_lora()
            self._lora_stage = stage

    def _add_lora(self) -> None:
        """peft LoRA on the UNet (TADM's targets) and the VAE decoder; conv_in trained fully."""
        from peft import LoraConfig, inject_adapter_in_model

        assert self.unet is not None and self.vae is not None
        unet_cfg = LoraConfig(
            r=self.unet_lora_rank, lora_alpha=self.unet_lora_rank, init_lora_weights="gaussian",
            target_modules=self.unet_lora_targets,
        )  # fmt: skip
        inject_adapter_in_model(unet_cfg, self.unet, adapter_name="tadm_unet")
        vae_cfg = LoraConfig(
            r=self.vae_lora_rank, lora_alpha=self.vae_lora_rank, init_lora_weights="gaussian",
            target_modules=VAE_DECODER_LORA_REGEX,
        )  # fmt: skip
        inject_adapter_in_model(vae_cfg, self.vae, adapter_name="tadm_vae")
        for module in (self.unet, self.vae):
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
        self.unet.conv_in.requires_grad_(True)
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()
        self.train(self.training)  # parts with trainable weights now follow the train/eval mode

    def trainable_parameters(self, stage: str) -> list[nn.Parameter]:
        if stage not in ("enhancer", "joint"):
            return []
        return [p for m in (self.unet, self.vae) if m is not None for p in m.parameters() if p.requires_grad]

    def prepare_inference(self, channels_last: bool = False, compile: bool = False) -> None:
        """NHWC memory format for the UNet and VAE; ``torch.compile`` of the UNet."""
        if channels_last:
            for part in (self.unet, self.vae):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        if compile and self.unet is not None:
            self.unet = torch.compile(self.unet)

    @staticmethod
    def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
        module.requires_grad_(False)
        return module.eval().to(device)

    def train(self, mode: bool = True) -> StableDiffusionBackbone:
        """Keep fully frozen parts in eval mode when the LightningModule switches to training."""
        super().train(mode)
        for module in (self.vae, self.unet, self.text_encoder, self.text_encoder_2):
            if module is not None and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def _load_vae(self) -> nn.Module:
        from diffusers import AutoencoderKL

        if self.vae_source is None:
            return self._from_pretrained("vae", "vae")
        src = self.vae_source
        if _looks_like_path(src):
            folder = Path(src).expanduser()
            # a whole pipeline folder given as `vae:` is accepted too: use its vae/ subfolder
            sub = (
                "vae"
                if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists()
                else ""
            )
            self._check_local(folder, sub, "vae", variant=None, what="the VAE given as `vae`")
            return AutoencoderKL.from_pretrained(str(folder), subfolder=sub or None)
        kwargs = {} if self.local_files_only is None else {"local_files_only": self.local_files_only}
        try:
            return AutoencoderKL.from_pretrained(src, **kwargs)
        except OSError as err:
            raise self._hub_error(src, "vae", "", err, key="vae") from err

    def _from_pretrained(self, part: str, sub: str) -> Any:
        """Load one subfolder of ``pretrained`` with the class that subfolder holds."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        cls: Any = {
            "vae": AutoencoderKL,
            "unet": UNet2DConditionModel,
            "scheduler": DDPMScheduler,
            "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer,
        }[sub]
        src = self.pretrained
        assert src is not None
        kwargs: dict[str, Any] = {"subfolder": sub}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.variant is not None and sub not in ("scheduler", "tokenizer", "tokenizer_2"):
            kwargs["variant"] = self.variant
        local = _looks_like_path(src)
        if local:
            src = str(Path(src).expanduser())
            self._check_local(Path(src), sub, sub, variant=self.variant, what="`pretrained`")
        elif self.local_files_only is not None:
            kwargs["local_files_only"] = self.local_files_only
        try:
            obj = cls.from_pretrained(src, **kwargs)
        except OSError as err:
            if local:
                raise
            raise self._hub_error(src, part, sub, err, key="pretrained") from err
        if sub.startswith("tokenizer") and len(obj) < 3:
            # transformers 5 returns an EMPTY tokenizer instead of failing when no file is found
            err = OSError(f"no tokenizer files found for {src!r}/{sub}")
            if local:
                raise FileNotFoundError(f"backbone preset {self.preset_name!r}: {err}")
            raise self._hub_error(src, part, sub, err, key="pretrained")
        return obj

    def _read_single_file(self, todo: list[str]) -> dict[str, dict[str, Tensor]]:
        """The original-layout tensors of each wanted module, by diffusers subfolder; read once.

        A ``.safetensors`` file is read lazily, so stage 1 reads only the VAE's tensors of a
        multi-GB file. A missing UNet / VAE is an error; a missing text encoder falls back to the
        folder's weights with a warning.
        """
        assert self.single_file is not None
        path = Path(self.single_file).expanduser()
        label = f"backbone preset {self.preset_name!r}"
        if not path.is_file():
            raise FileNotFoundError(f"{label}: single file '{path}' given as `single_file` not found")
        wanted: dict[str, tuple[str, ...]] = {}
        if "unet" in todo:
            wanted["unet"] = SINGLE_FILE_UNET
        if "vae" in todo and self.vae_source is None:
            wanted["vae"] = SINGLE_FILE_VAE
        if "text" in todo:
            wanted.update(SINGLE_FILE_PREFIXES[self.preset.family])
        if not wanted:
            return {}
        prefixes = tuple(p for group in wanted.values() for p in group)
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    names = [k for k in f.keys() if k.startswith(prefixes)]  # noqa: SIM118 (not a dict)
                    tensors = {k: f.get_tensor(k) for k in names}
            else:  # .ckpt / .pt / .bin: torch.load (weights only), "state_dict" nesting unwrapped
                from diffusers.loaders.single_file_utils import load_single_file_checkpoint

                every = load_single_file_checkpoint(str(path), local_files_only=True)
                tensors = {k: v for k, v in every.items() if k.startswith(prefixes)}
                del every
        except Exception as err:
            raise ValueError(
                f"{label}: cannot read single file '{path}' as a checkpoint: {type(err).__name__}: {err}"
            ) from err
        out: dict[str, dict[str, Tensor]] = {}
        for sub, group in wanted.items():
            part = {k: v for k, v in tensors.items() if k.startswith(group)}
            if part:
                out[sub] = part
            elif sub in ("unet", "vae"):
                raise ValueError(
                    f"{label}: single file '{path}' holds no {sub.upper()} weights (no keys under "
                    f"{' or '.join(repr(g) for g in group)}); it is not an original-layout Stable Diffusion "
                    f"checkpoint" + ("; give the VAE separately with `vae`" if sub == "vae" else "")
                )
            else:
                warnings.warn(
                    f"{label}: single file '{path}' holds no {sub} (no keys under {group[0]!r}); "
                    f"loading {sub} from '{self.pretrained}/{sub}' instead",
                    stacklevel=3,
                )
        return out

    def _from_single_file(self, sub: str, tensors: dict[str, Tensor]) -> nn.Module:
        """One module from the single file's original-layout tensors, configured by ``pretrained/sub``."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        assert self.pretrained is not None and self.single_file is not None
        folder = Path(self.pretrained).expanduser()
        self._check_local(
            folder, sub, "config", variant=None, what="`pretrained` (configs for `single_file`)"
        )
        kwargs: dict[str, Any] = {"config": str(folder), "subfolder": sub, "local_files_only": True}
        try:
            if sub in ("unet", "vae"):
                cls: Any = UNet2DConditionModel if sub == "unet" else AutoencoderKL
                module = cls.from_single_file(tensors, **kwargs)
            else:
                cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
                module = create_diffusers_clip_model_from_ldm(cls, tensors, **kwargs)
        except Exception as err:
            # diffusers leaves absent tensors on the meta device and then fails to move them
            missing = self._unconverted_keys(cls, folder, sub, tensors) if sub in ("unet", "vae") else []
            raise self._single_file_error(sub, folder, missing, err) from err
        missing = [k for k, v in module.state_dict().items() if v.is_meta]
        if missing:
            raise self._single_file_error(sub, folder, missing, None)
        return module

    @staticmethod
    def _unconverted_keys(cls: Any, folder: Path, sub: str, tensors: dict[str, Tensor]) -> list[str]:
        """Tensors of the configured model that diffusers' original->diffusers mapping does not produce."""
        from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

        try:
            config = cls.load_config(str(folder), subfolder=sub, local_files_only=True)
            convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
            converted = convert(checkpoint=tensors, config=config)
            with torch.device("meta"):
                expected = cls.from_config(config).state_dict()
        except Exception:  # only used to explain another error: never hide that one
            return []
        return sorted(set(expected) - set(converted))

    def _single_file_error(
        self, sub: str, folder: Path, missing: list[str], err: Exception | None
    ) -> ValueError:
        where = f"single file '{self.single_file}'"
        if missing:
            return ValueError(
                f"backbone preset {self.preset_name!r}: {where} lacks {len(missing)} of {sub}'s tensors "
                f"(e.g. {missing[:3]}) for the config in '{folder / sub}': a truncated file or another model"
            )
        return ValueError(
            f"backbone preset {self.preset_name!r}: cannot load {sub} from {where} with the config in "
            f"'{folder / sub}' (a different model or family?): {type(err).__name__}: {err}"
        )

    def _set_schedule(self, scheduler: Any) -> None:
        """Training noise schedule as DDPM (whatever sampler the folder ships); v/eps from its config."""
        from diffusers import DDPMScheduler

        sched = (
            scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)
        )
        self.scheduler = sched
        self.prediction_type = str(sched.config.prediction_type)
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = sched.alphas_cumprod.detach().clone().float().to(self._device_anchor.device)

    def _check_local(self, folder: Path, sub: str, kind: str, variant: str | None, what: str) -> None:
        """Fail before the libraries do, naming exactly the missing file and the folder."""
        label = f"backbone preset {self.preset_name!r}"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{label}: folder '{folder}' given as {what} does not exist; give an existing diffusers "
                f"folder or a hub id such as {self.preset.hub_id or 'stabilityai/stable-diffusion-2-1-base'!r}"
            )
        part = folder / sub if sub else folder
        rel = f"{sub}/" if sub else ""
        kind = kind.removesuffix("_2")
        if kind == "scheduler":
            required = [("scheduler_config.json",)]
        elif kind == "config":  # weights come from elsewhere (`single_file`)
            required = [("config.json",)]
        elif kind == "tokenizer":
            required = [("tokenizer.json", "vocab.json")]
        else:
            stems = _TRANSFORMERS_WEIGHTS if kind == "text_encoder" else _DIFFUSERS_WEIGHTS
            weights = tuple(p.name for p in _weight_candidates(part, stems, variant))
            required = [("config.json",), weights]
        layout = " and ".join(f"{rel}{alts[0]}" for alts in required)
        kind_word = "diffusers folder" if sub else "diffusers AutoencoderKL folder (files at its root)"
        for alts in required:
            if not any((part / name).is_file() for name in alts):
                first = part / alts[0]
                alt = " (or .bin)" if first.suffix == ".safetensors" else ""
                alt = " (or vocab.json + merges.txt)" if alts[0] == "tokenizer.json" else alt
                hint = "" if part.is_dir() else f" (the folder '{part}' does not exist)"
                raise FileNotFoundError(
                    f"{label}: '{first}'{alt} not found{hint}; expected a {kind_word} with {layout} in '{folder}'"
                )

    def _hub_error(self, hub_id: str, part: str, sub: str, err: Exception, key: str) -> OSError:
        from huggingface_hub import constants

        where = f"part {part!r} (subfolder {sub!r})" if sub else f"part {part!r}"
        rev = f" --revision {self.revision}" if self.revision and key == "pretrained" else ""
        return OSError(
            f"backbone preset {self.preset_name!r}: cannot load {where} of hub model {hub_id!r}: no network / "
            f"Hugging Face Hub is reachable from here (or HF_HUB_OFFLINE / local_files_only is set), or the files are not in the "
            f"HF cache ({constants.HF_HUB_CACHE}). To fix: on a connected machine run "
            f"`hf download {hub_id}{rev} --local-dir /path/to/folder`, copy that folder here and set "
            f"`{key}: /path/to/folder`; or copy the HF cache folder to this machine. "
            f"Underlying error: {type(err).__name__}: {err}"
        )

    # --- latent space ------------------------------------------------------------------------
    def _require_vae(self) -> nn.Module:
        if self.vae is None:
            raise RuntimeError(
                f"backbone {self.backbone_id}: the VAE is not loaded; call load(['vae']) or load_for_stage(...)"
            )
        return self.vae

    def encode(self, x: Tensor) -> Tensor:
        """Image (B,3,H,W) in [-1,1] -> scaled latent, in the VAE's dtype, returned as float32."""
        vae = self._require_vae()
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != vae.config.in_channels:
            raise ValueError(f"encode expects images (B,{vae.config.in_channels},H,W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the VAE downsampling factor {f}; pad or crop it "
                f"(e.g. to {math.ceil(h / f) * f}x{math.ceil(w / f) * f})"
            )
        with self._vae_autocast(x):
            dist = vae.encode(x.to(vae.dtype)).latent_dist
        z = dist.sample() if self.sample_latent else dist.mean
        return ((z.float() - self.shift_factor) * self.scaling_factor).float()

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in [-1,1], decoded in the VAE's dtype, returned as float32."""
        vae = self._require_vae()
        raw = z.float() / self.scaling_factor + self.shift_factor
        with self._vae_autocast(z):
            return vae.decode(raw.to(vae.dtype)).sample.float().clamp(-1, 1)

    def _vae_autocast(self, x: Tensor) -> Any:
        """VAEs flagged ``force_upcast`` (SDXL's) overflow in fp16 into NaN / black images: run them
        in their own dtype (fp32) even inside a ``16-mixed`` autocast region. An fp16-fixed VAE
        (``force_upcast: false`` in its config) keeps autocast."""
        import contextlib

        if self.vae is not None and getattr(self.vae.config, "force_upcast", False):
            return torch.autocast(device_type=x.device.type, enabled=False)
        return contextlib.nullcontext()
