"""StableDiffusionBackbone(single_file=...): an ORIGINAL-layout (Stability/CompVis) checkpoint plus a
config-only diffusers folder, loaded through diffusers' ``from_single_file`` with no network.

diffusers ships only the original -> diffusers converters, so the helpers below write the inverse
key mapping (the layout real SD releases use: ``model.diffusion_model.input_blocks.N.0.in_layers.0``,
``first_stage_model.encoder.mid.attn_1.q`` as 1x1 convs, OpenCLIP ``in_proj_weight`` ...), generic
enough for the tiny configs and, as the first test checks, for the full-size SD 2.1 / SDXL UNets.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from tadm.components.backbones.stable_diffusion import StableDiffusionBackbone
from tadm.testing.twins.full_size_architectures import FULL_SIZE_UNETS
from tadm.testing.twins.unet_twins import build_tiny_components, save_tiny_pipeline

# ---------------------------------------------------------------------------------------------------
# diffusers -> original (LDM) key layout


_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_to_ldm(sd: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel keys -> ``model.diffusion_model.*`` (openaimodel numbering)."""
    n = config["layers_per_block"] + 1  # input/output slots per level (resnets + down/upsampler)
    attn_up = {int(k.split(".")[1]) for k in sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, value in sd.items():
        top, _, leaf = key.rpartition(".")
        if top in _UNET_TOP:
            new = f"{_UNET_TOP[top]}.{leaf}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            slot = 2 if int(m[1]) in attn_up else 1  # after the attention, if the level has one
            new = f"output_blocks.{int(m[1]) * n + n - 1}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no original name for UNet key {key!r}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(sd: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL keys -> ``first_stage_model.*`` (decoder levels counted bottom-up,
    mid-block attention as 1x1 convolutions)."""
    last = len(config["up_block_types"]) - 1
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", new):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", new):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", new):
            new = f"decoder.up.{last - int(m[1])}.block.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", new):
            new = f"decoder.up.{last - int(m[1])}.upsample.{m[2]}"
        out[f"first_stage_model.{new}"] = value
    return out


def clip_to_ldm(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """transformers CLIPTextModel -> OpenAI-CLIP layout (``cond_stage_model.transformer.text_model.*``)."""
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in sd.items()}


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def openclip_to_ldm(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """transformers CLIPTextModel(WithProjection) -> OpenCLIP layout (``resblocks``, fused ``in_proj``)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:  # SDXL's second encoder; OpenCLIP stores x @ P, not P x
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{leaf}"] = sd.pop(f"{src}self_attn.out_proj.{leaf}")
            for hf, oc in _OPENCLIP_LAYER.items():
                out[f"{dst}{oc}.{leaf}"] = sd.pop(f"{src}{hf}.{leaf}")
    assert not sd, f"unmapped text-encoder keys: {sorted(sd)[:5]}"
    return {prefix + k: v for k, v in out.items()}


#: family -> (text encoder subfolder, original prefix, converter)
TEXT_LAYOUT = {
    "sd15": [("text_encoder", "cond_stage_model.transformer.", clip_to_ldm)],
    "sd21": [("text_encoder", "cond_stage_model.model.", openclip_to_ldm)],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.", clip_to_ldm),
        ("text_encoder_2", "conditioner.embedders.1.model.", openclip_to_ldm),
    ],
}


def original_single_file(comps: dict[str, Any], family: str, text: bool = True) -> dict[str, Tensor]:
    """One original-layout state dict holding the UNet, the VAE and (``text``) the text encoders."""
    out = {
        **unet_to_ldm(comps["unet"].state_dict(), dict(comps["unet"].config)),
        **vae_to_ldm(comps["vae"].state_dict(), dict(comps["vae"].config)),
    }
    if text:
        for sub, prefix, convert in TEXT_LAYOUT[family]:
            out.update(convert(comps[sub].state_dict(), prefix))
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------


def test_inverse_mapping_round_trips_through_diffusers_converters() -> None:
    """The helpers are exact inverses of diffusers' own converters (tiny and full-size layouts)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    comps = build_tiny_components("tiny-sdxl", parts=["vae", "unet"])
    cases = [(comps["unet"], unet_to_ldm, convert_ldm_unet_checkpoint)]
    cases.append((comps["vae"], vae_to_ldm, convert_ldm_vae_checkpoint))
    with torch.device("meta"):  # the full-size SD 2.1 UNet's key layout, without its 3.5 GB
        cases.append(
            (UNet2DConditionModel(**FULL_SIZE_UNETS["sd21-base"]), unet_to_ldm, convert_ldm_unet_checkpoint)
        )
    for model, to_ldm, to_diffusers in cases:
        sd = model.state_dict()
        ldm = to_ldm(sd, dict(model.config))
        back = to_diffusers(ldm, dict(model.config))
        assert set(back) == set(sd)
        assert all(back[k] is sd[k] or torch.equal(back[k], sd[k]) for k in sd if not sd[k].is_meta)
    # the names real SD releases use (v1/v2 detection keys of diffusers' single-file loader)
    full = unet_to_ldm(cases[2][0].state_dict(), dict(cases[2][0].config))
    assert "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight" in full
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in full
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" in full


CASES = {  # tiny preset -> (family preset, whether the file holds the text encoders)
    "tiny-sd15": ("sd15", True),
    "tiny-sd21": ("sd21", True),
    "tiny-sdxl": ("sdxl", True),
    "tiny-sdxl-no-text": ("sdxl", False),
}


def _config_only(preset: str, folder: Path, drop_text_weights: bool) -> Path:
    """A diffusers folder without UNet / VAE (and text-encoder) weights: configs, tokenizers, scheduler."""
    save_tiny_pipeline(preset, folder)
    subs = ["unet", "vae"] + (["text_encoder", "text_encoder_2"] if drop_text_weights else [])
    for sub in subs:
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
    return folder


@pytest.mark.parametrize("tiny", list(CASES))
def test_single_file_weights_replace_the_folders(tiny: str, tmp_path: Path, one_thread: None) -> None:
    family, text_in_file = CASES[tiny]
    tiny = tiny.removesuffix("-no-text")
    folder = _config_only(tiny, tmp_path / "configs", drop_text_weights=text_in_file)
    ref = build_tiny_components(tiny, seed=4242)  # other weights than the folder was saved with
    for m in ref.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    path = tmp_path / "model.safetensors"
    save_file(original_single_file(ref, family, text=text_in_file), str(path))

    bb = StableDiffusionBackbone(preset=family, pretrained=str(folder), single_file=str(path))
    assert bb.backbone_id == f"stable_diffusion:{family}:{folder}+single_file=model.safetensors"
    if text_in_file:
        bb.load(["vae", "unet", "text"])
    else:  # the folder's own text-encoder weights are used, and the user is told so
        with pytest.warns(UserWarning) as caught:
            bb.load(["vae", "unet", "text"])
        for sub in ("text_encoder", "text_encoder_2"):
            assert any(
                f"holds no {sub} " in str(w.message) and f"configs/{sub}'" in str(w.message) for w in caught
            )
    assert bb.prediction_type == ref["scheduler"].config.prediction_type  # scheduler: from the folder

    for name in ("unet", "vae"):
        got, want = getattr(bb, name).state_dict(), ref[name].state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}.{k}"

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = bb.encode(x)
        z_ref = ref["vae"].encode(x).latent_dist.mean * ref["vae"].config.scaling_factor
        torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
        eps = bb.predict(z, torch.tensor([50.0, 120.0]))
        if text_in_file:  # the empty-prompt context comes from the single file's encoder(s)
            ids = ref["tokenizer"]("", padding="max_length", max_length=77, return_tensors="pt").input_ids
            out = ref["text_encoder"](ids, output_hidden_states=True)
            want = out[0]
            if family == "sdxl":
                ids2 = ref["tokenizer_2"]("", padding="max_length", max_length=77, return_tensors="pt")
                out2 = ref["text_encoder_2"](ids2.input_ids, output_hidden_states=True)
                want = torch.cat([out.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
                torch.testing.assert_close(bb.pooled_prompt_embeds, out2[0], rtol=0, atol=0)
            torch.testing.assert_close(bb.prompt_embeds, want, rtol=0, atol=0)
        kwargs: dict[str, Any] = {}
        if family == "sdxl":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": bb.pooled_prompt_embeds.expand(2, -1),
                "time_ids": torch.tensor([64.0, 64, 0, 0, 64, 64]).expand(2, -1),
            }
        ctx = bb.prompt_embeds.expand(2, -1, -1)
        eps_ref = ref["unet"](z, torch.tensor([50.0, 120.0]), ctx, **kwargs).sample
    torch.testing.assert_close(eps, eps_ref, rtol=0, atol=0)


def test_sd21_open_clip_text_encoder_from_single_file(tmp_path: Path) -> None:
    """SD 2.x stores OpenCLIP (fused q/k/v): the split encoder equals the original one, weight for weight."""
    folder = _config_only("tiny-sd21", tmp_path / "configs", drop_text_weights=True)
    ref = build_tiny_components("tiny-sd21", seed=7)
    path = tmp_path / "v2.safetensors"
    single = original_single_file(ref, "sd21")
    single["cond_stage_model.model.text_projection"] = torch.randn(32, 32)  # in real files, unused by SD 2
    save_file(single, str(path))
    bb = StableDiffusionBackbone(preset="sd21", pretrained=str(folder), single_file=str(path))
    loader = bb._loader()
    sub = loader.read_single_file(["text"])["text_encoder"]
    enc = loader.from_single_file("text_encoder", sub)
    want = ref["text_encoder"].state_dict()
    assert set(enc.state_dict()) == set(want)
    assert all(torch.equal(enc.state_dict()[k], want[k]) for k in want)


def test_stage1_reads_only_the_vae_and_ckpt_files_work(tmp_path: Path) -> None:
    folder = _config_only("tiny-sd15", tmp_path / "configs", drop_text_weights=True)
    ref = build_tiny_components("tiny-sd15", seed=11)
    path = tmp_path / "v1-5.ckpt"  # pickled Lightning-style {"state_dict": ...}, as the .ckpt releases
    torch.save({"state_dict": original_single_file(ref, "sd15"), "global_step": 1}, path)
    bb = StableDiffusionBackbone(preset="sd15", pretrained=str(folder), single_file=str(path))
    bb.load_for_stage("rescaler")
    assert bb.loaded_parts == {"vae"} and bb.unet is None
    assert torch.equal(bb.vae.decoder.conv_out.weight, ref["vae"].decoder.conv_out.weight)


def test_single_file_errors_name_the_file(tmp_path: Path) -> None:
    folder = _config_only("tiny-sd15", tmp_path / "configs", drop_text_weights=True)
    missing = tmp_path / "nope.safetensors"
    bb = StableDiffusionBackbone(preset="sd15", pretrained=str(folder), single_file=str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        bb.load(["vae"])
    # pretrained must be a local folder with the configs (a hub id would need the network)
    with pytest.raises(ValueError, match="local diffusers folder"):
        StableDiffusionBackbone(preset="sd15", single_file=str(missing))

    ref = build_tiny_components("tiny-sd15", seed=3)
    unet_only = tmp_path / "unet_only.safetensors"
    full = original_single_file(ref, "sd15")
    save_file({k: v for k, v in full.items() if k.startswith("model.")}, str(unet_only))
    bb = StableDiffusionBackbone(preset="sd15", pretrained=str(folder), single_file=str(unet_only))
    with pytest.raises(ValueError, match=r"unet_only.safetensors' holds no VAE weights.*`vae`"):
        bb.load(["vae"])
    assert bb.vae is None

    truncated = tmp_path / "truncated.safetensors"  # a tensor short: never a half-random model
    save_file({k: v for k, v in full.items() if "out.2.bias" not in k}, str(truncated))
    bb = StableDiffusionBackbone(preset="sd15", pretrained=str(folder), single_file=str(truncated))
    with pytest.raises(ValueError, match=r"truncated.safetensors' lacks 1 of unet's tensors.*conv_out.bias"):
        bb.load(["unet"])

    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read single file .*bogus.safetensors"):
        StableDiffusionBackbone(preset="sd15", pretrained=str(folder), single_file=str(bogus)).load(["vae"])

    shutil.rmtree(folder / "unet")  # the config the file's UNet needs
    bb = StableDiffusionBackbone(preset="sd15", pretrained=str(folder), single_file=str(unet_only))
    with pytest.raises(FileNotFoundError, match=r"unet/config.json"):
        bb.load(["unet"])
