"""The real full-size architectures' diffusers configs, without weights: benchmarks build them with random
weights to measure time, memory and checkpoint size without a download.

``FULL_SIZE_VAE`` / ``FULL_SIZE_UNETS`` are the Stable Diffusion VAE and UNets (SD 2.1-base, SDXL);
``FULL_SIZE_DIT_VAE`` / ``FULL_SIZE_TRANSFORMERS`` the 16-channel VAE and the SD 3.5 / FLUX.1 transformers.
"""

from __future__ import annotations

#: diffusers configs of the real full-size architectures (no weights): benchmarks build them with
#: random weights to measure cost without a download
FULL_SIZE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
FULL_SIZE_UNETS = {
    "sd21-base": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=1024,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}  # fmt: skip


#: diffusers configs of the real full-size architectures (no weights), for benchmarks
FULL_SIZE_DIT_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
FULL_SIZE_TRANSFORMERS: dict[str, dict] = {
    "sd35-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    "sd35-large": dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm",
    ),
    "flux1-dev": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}  # fmt: skip
