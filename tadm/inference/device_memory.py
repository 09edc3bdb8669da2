"""Whether a latent fits the GPU to be decoded whole (``Tiling.vae_whole``).

Tiles bound memory, but a tiled decode with image-wide GroupNorm statistics runs the decoder twice (a
statistics pass, then the output pass), and per-tile statistics shift colours. An image decoded whole
needs neither and is the exact result the tiles approximate. On a GPU with room for it (a 2048-px image
on an 80 GB card), :func:`fits_whole` says so from the free memory and a conservative estimate of the
decoder's peak; the pipeline still falls back to tiles if the device runs out of memory anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: tensor peak of SD's VAE decoder per output pixel and image: 3072 bytes measured in fp32 on the full-size
#: architecture (``benchmarks/vae_decode_memory.py``; bf16 autocast keeps GroupNorm and SiLU in fp32, so it
#: needs no more), plus 25 % for the caching allocator
DECODER_BYTES_PER_PIXEL = 3840
#: the mid-block's single-head self-attention over all latent pixels: its head (512) is wider than flash
#: attention takes, so assume the math kernel's fp32 (tokens x tokens) scores and their softmax
ATTENTION_BYTES_PER_SCORE = 8
#: the most elements one activation may have: above 2^31 some CUDA kernels index with 32 bits; the decoder's
#: widest full-resolution activation has 256 channels
MAX_ELEMENTS = 2**31 - 1
WIDEST_CHANNELS = 256


def decode_bytes(batch: int, height: int, width: int, factor: int) -> int:
    """The memory assumed for decoding a (batch, C, height, width) latent of a VAE with downsampling
    ``factor`` in one call."""
    tokens = height * width
    return batch * (
        tokens * factor * factor * DECODER_BYTES_PER_PIXEL + tokens * tokens * ATTENTION_BYTES_PER_SCORE
    )


def decode_fits(batch: int, height: int, width: int, factor: int, free: int) -> bool:
    """Whether that decode fits ``free`` bytes (:func:`decode_bytes`) with no activation over 2^31 elements
    (about 8.4 megapixels in a batch)."""
    pixels = batch * height * width * factor * factor
    return pixels * WIDEST_CHANNELS <= MAX_ELEMENTS and decode_bytes(batch, height, width, factor) <= free


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can use on a CUDA device: the driver's free memory plus what PyTorch's caching
    allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def fits_whole(z: Tensor, factor: int) -> bool:
    """Whether the latent batch ``z`` (B, C, h, w) of a VAE with downsampling ``factor`` can be decoded in
    one call: on a CUDA device, by :func:`decode_fits` and its free memory now. Never on other devices (a
    CPU's tiles keep the resident memory bounded)."""
    if z.device.type != "cuda":
        return False
    return decode_fits(z.shape[0], z.shape[-2], z.shape[-1], factor, free_bytes(z.device))
