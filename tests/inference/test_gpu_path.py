"""What the CPU can prove about the GPU inference path (issue 25): one VAE call per tile when an image is one
VAE tile, no host synchronisation anywhere in the tiled round trip, what ``--compile`` compiles traces as one
graph per network, and ``--compile`` == eager.

A host synchronisation is what makes the CPU wait for the GPU inside the tile loop, so that it cannot queue
the next tile's kernels while the GPU works: reading a value (``.item()``, ``float(t)``, ``bool(t)``,
indexing with a 0-dim tensor: all ``aten::_local_scalar_dense``), an op whose output size depends on the data
(``nonzero``, boolean masks, ``unique``), a copy to the host (``.cpu()``, ``.numpy()``, ``.tolist()``) and a
tensor made from Python data on the device (``torch.tensor([...], device=cuda)``: a blocking host-to-device
copy, ``aten::lift_fresh``). On the CPU none of them waits for anything, but all of them are visible to a
``TorchDispatchMode`` or as Python calls, so :class:`HostSyncCounter` counts them where they would happen on a
GPU.
"""

from __future__ import annotations

import collections
import logging
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from tadm.components.aligners.tpm import TimestepPredictionModule
from tadm.components.rescalers.dfrm import DFRM
from tadm.inference import device_memory, pipeline
from tadm.inference.tiling import NO_TILING, Tiling, tile_starts
from tadm.model import TADMModel
from tadm.model.enhancer import HybridScheduler
from tadm.ops.diffusion import FlowTime
from tadm.testing.twins.unet_twins import StableDiffusionTwin

#: aten ops that wait for the device on a GPU (their CPU twins run the same calls)
SYNCING_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), float(), int(), bool(), a 0-dim tensor as an index
        "is_nonzero",
        "nonzero",
        "nonzero_static",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "lift_fresh",  # torch.tensor / as_tensor of Python data: a blocking host-to-device copy on a GPU
        "lift_fresh_copy",
    }
)
#: indexing ops that wait for the device when an index is a boolean mask (its size is the mask's count)
MASK_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
#: Tensor methods that copy to the host (on a CPU tensor they dispatch nothing, so they are patched)
HOST_COPIES = ("cpu", "numpy", "tolist")


class HostSyncCounter(TorchDispatchMode):
    """Counts the syncing aten ops and host copies made while active, each with where it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.found: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS:
            self.record(name)
        elif name in MASK_INDEXING and _has_mask(args[1] if len(args) > 1 else ()):
            self.record(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames[-3:][::-1])
        self.found[f"{what} at {where}"] += 1


@contextmanager
def counting_host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostSyncCounter]:
    """A :class:`HostSyncCounter` plus counting wrappers of the host-copy Tensor methods, while in the block."""
    counter = HostSyncCounter()
    with monkeypatch.context() as patch:
        for method in HOST_COPIES:
            patch.setattr(torch.Tensor, method, _counted(getattr(torch.Tensor, method), method, counter))
        with counter:
            yield counter


def _has_mask(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _counted(fn: Callable[..., Any], what: str, counter: HostSyncCounter) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter.record(f".{what}()")
        return fn(*args, **kwargs)

    return wrapper


def _tiny_enhancer(preset: str) -> TADMModel:
    """A stage-2 model on a tiny twin (``tiny-sd21``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``): slim DFRM
    over the backbone's latent channels, TPM, hybrid scheduler with its Refiner."""
    from tadm.testing.twins.flow_twins import FluxTwin, SD3Twin

    torch.manual_seed(0)
    flow = {"tiny-sd3": SD3Twin, "tiny-flux": FluxTwin}
    backbone = flow[preset]() if preset in flow else StableDiffusionTwin(preset)
    model = TADMModel(
        backbone=backbone,
        rescaler=DFRM(
            scale=16, latent_channels=backbone.latent_channels, width=16, num_resblocks=1, num_couplings=2
        ),
        stage="enhancer",
        aligner=TimestepPredictionModule(),
    )
    return model.load_parts().eval()


#: several tiles in every tiling at 144x208 px: enhancer 2x3, VAE 2x2 (synchronised statistics), DFRM 2x2
MANY_TILES = Tiling(latent_tile=16, latent_overlap=8, vae_tile=128, vae_overlap=32, lr_tile=8, lr_overlap=3)


def test_the_sync_counter_sees_what_would_wait_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter can fail: each kind of host synchronisation planted in a step is counted once."""
    x = torch.rand(4)
    plants: list[Callable[[], object]] = [
        lambda: x.sum().item(),
        lambda: float(x.max()),
        lambda: bool(x.any()),
        lambda: x[x > 0.5],
        lambda: x.nonzero(),
        lambda: x[torch.tensor(1)],
        lambda: torch.tensor([1.0, 2.0], device=x.device),
        lambda: torch.as_tensor(0.5, device=x.device),
        lambda: x.cpu(),
        lambda: x.tolist(),
        lambda: x.numpy(),
    ]
    for i, plant in enumerate(plants):
        with counting_host_syncs(monkeypatch) as counter:
            plant()
        assert sum(counter.found.values()) >= 1, f"plant {i} not counted"
    with counting_host_syncs(monkeypatch) as counter:  # what the pipeline does instead
        (x * 2 + torch.full((), 0.5)).clamp(0, 1).sum(dim=0)
        x[1:3].fill_(2.0)
    assert not counter.found, counter.found


@pytest.mark.parametrize("mode", ["hybrid", "learned_t"])
def test_the_hybrid_scheduler_on_flow_time_makes_no_host_synchronisation(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SD 3 / FLUX's time convention in the enhancer step (the round-trip test below runs the SD twins): the
    fixed t0 is mapped once (``attach_time``) and filled on the device, never copied from the host per tile."""
    scheduler = HybridScheduler(mode=mode).eval()  # type: ignore[arg-type]
    flow = FlowTime(shift=3.0)
    scheduler.attach_time(flow)
    z, out, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.full((2,), 120.0)
    with torch.no_grad(), counting_host_syncs(monkeypatch) as counter:
        scheduler(z, out, t, flow)
    assert not counter.found, counter.found


@pytest.mark.parametrize("preset", ["tiny-sd21", "tiny-sdxl"])
def test_no_host_synchronisation_in_the_tiled_round_trip(
    preset: str, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """Downscale and upscale, every stage on several tiles (VAE tiles with synchronised GroupNorm statistics),
    without one op that would make the CPU wait for the GPU."""
    model = _tiny_enhancer(preset)
    x = torch.rand(1, 3, 144, 208) * 2 - 1
    assert len(tile_starts(18, 16, 8)) * len(tile_starts(26, 16, 8)) == 6  # enhancer tiles
    with torch.no_grad(), counting_host_syncs(monkeypatch) as counter:
        trip = pipeline.round_trip(model.backbone, model.rescaler, x, model.enhance_fn, MANY_TILES)
    assert trip.reconstruction.shape == x.shape and trip.timesteps is not None
    assert not counter.found, "\n".join(f"{n} x {w}" for w, n in counter.found.items())


@pytest.mark.parametrize("twin", ["sd3", "flux"])
def test_no_host_synchronisation_in_the_flow_backbones_tiled_round_trip(
    twin: str, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """The same on the SD 3 and FLUX twins (16-channel latents, flow time): before 2026-12-08 each enhancer
    tile copied the hybrid scheduler's fixed t0 from the host."""
    model = _tiny_enhancer(f"tiny-{twin}")
    x = torch.rand(1, 3, 144, 208) * 2 - 1
    with torch.no_grad(), counting_host_syncs(monkeypatch) as counter:
        trip = pipeline.round_trip(model.backbone, model.rescaler, x, model.enhance_fn, MANY_TILES)
    assert trip.reconstruction.shape == x.shape and trip.timesteps is not None
    assert not counter.found, "\n".join(f"{n} x {w}" for w, n in counter.found.items())


def test_sdxl_size_conditioning_is_made_on_the_device_with_the_same_values() -> None:
    """SDXL's time_ids (original size, crop offset, target size) are filled in on the device now, not copied
    from a Python list: still (h, w, 0, 0, h, w) of the tile in image pixels, one row per sample."""
    model = _tiny_enhancer("tiny-sdxl")
    unet = model.backbone.unet
    assert unet is not None
    seen: list[Tensor] = []
    unet.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"]), with_kwargs=True
    )
    with torch.no_grad():
        model.backbone.predict(torch.randn(2, 4, 12, 20), torch.tensor([10.0, 200.0]))
    expected = torch.tensor([[96, 160, 0, 0, 96, 160]] * 2, dtype=unet.dtype)
    assert len(seen) == 1 and torch.equal(seen[0], expected)


class _CallCounter:
    """Counts calls of a module's forward (the VAE's encoder / decoder)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


@pytest.mark.parametrize(("size", "tiles"), [((128, 128), 1), ((128, 208), 2), ((144, 208), 4)])
def test_one_vae_call_per_tile_and_no_statistics_pass_for_one_tile(
    size: tuple[int, int], tiles: int, one_thread: None
) -> None:
    """With synchronised GroupNorm statistics the VAE runs every tile twice (statistics, then output) when an
    image has several VAE tiles, and exactly once when it is one tile: no statistics pass at all."""
    model = _tiny_enhancer("tiny-sd21")
    vae = model.backbone.vae
    assert vae is not None
    encoder, decoder = _CallCounter(vae.encoder), _CallCounter(vae.decoder)
    tiling = Tiling(latent_tile=16, latent_overlap=8, vae_tile=128, vae_overlap=32, vae_norm="synced")
    x = torch.rand(1, 3, *size) * 2 - 1
    with torch.no_grad():
        pipeline.round_trip(model.backbone, model.rescaler, x, model.enhance_fn, tiling)
    calls_per_tile = 1 if tiles == 1 else 2
    assert (encoder.calls, decoder.calls) == (tiles * calls_per_tile, tiles * calls_per_tile)


def test_the_default_tiling_decodes_a_512_px_image_once(one_thread: None) -> None:
    """At the GPU benchmark's 512x512 (default 768-px VAE tiles) the decoder runs once, encode too."""
    model = _tiny_enhancer("tiny-sd21")
    vae = model.backbone.vae
    assert vae is not None
    encoder, decoder = _CallCounter(vae.encoder), _CallCounter(vae.decoder)
    y = model.downscale(torch.rand(1, 3, 512, 512) * 2 - 1, Tiling())
    model.upscale(y, (512, 512), Tiling())
    assert (encoder.calls, decoder.calls) == (1, 1)


def test_a_latent_that_fits_the_gpu_is_decoded_whole_with_tiles_as_the_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, one_thread: None
) -> None:
    """``Tiling.vae_whole`` (default): where the GPU has room (faked here: the CPU never decodes whole), a
    latent larger than a VAE tile is decoded in ONE call, exactly the whole-image result, with no statistics
    pass; ``--no-vae-whole`` keeps the tiles; a decode that runs out of memory anyway falls back to the tiles
    with a warning."""
    model = _tiny_enhancer("tiny-sd21")
    backbone, vae = model.backbone, model.backbone.vae
    assert vae is not None
    z = torch.randn(1, 4, 24, 36)  # 192x288 px: 2x3 VAE tiles of 128 px
    tiling = Tiling(vae_tile=128, vae_overlap=32)
    with torch.no_grad():
        tiled = pipeline.decode(backbone, z, tiling)  # on a CPU: tiles
        whole = pipeline.decode(backbone, z, NO_TILING)
        assert (tiled - whole).abs().max() > 1e-3  # the two differ, so the checks below can tell them apart
        monkeypatch.setattr(pipeline, "fits_whole", lambda z, f: True)  # a GPU with room
        decoder = _CallCounter(vae.decoder)
        assert torch.equal(pipeline.decode(backbone, z, tiling), whole) and decoder.calls == 1
        assert torch.equal(pipeline.decode(backbone, z, replace(tiling, vae_whole=False)), tiled)
        decode = backbone.decode

        def out_of_memory_when_whole(latent: Tensor) -> Tensor:
            if latent.shape[-1] > 16:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return decode(latent)

        monkeypatch.setattr(backbone, "decode", out_of_memory_when_whole)
        with caplog.at_level(logging.WARNING, logger="tadm.inference.pipeline"):
            assert torch.equal(pipeline.decode(backbone, z, tiling), tiled)
    assert "the 36x24 latent (batch 1) did not fit the free GPU memory after all" in caplog.text


def test_whole_decodes_fit_by_free_memory_and_32_bit_indexing() -> None:
    """What :func:`fits_whole` allows: on a CPU nothing; on a GPU a decode whose assumed peak (bytes per output
    pixel, plus the mid-block attention's scores) is within the free memory, and never an activation over
    2^31 elements (8K is tiled, and a batch counts all its images)."""
    fits, gib = device_memory.decode_fits, 2**30
    assert not device_memory.fits_whole(torch.zeros(1, 4, 8, 8), 8)  # a CPU tensor: tiles
    need = device_memory.decode_bytes(1, 256, 256, 8)  # 2048 x 2048 px
    assert fits(1, 256, 256, 8, need) and not fits(1, 256, 256, 8, need - 1)
    assert fits(1, 256, 256, 8, 75 * gib) and not fits(1, 256, 256, 8, 20 * gib)  # an 80 / a 24 GB card
    assert fits(1, 128, 128, 8, 20 * gib) and not fits(8, 256, 256, 8, 75 * gib)  # 1024 px; a batch of 8
    assert not fits(1, 540, 960, 8, 2**50) and fits(1, 270, 480, 8, 2**50)  # 8K never; 4K with the memory
    assert device_memory.decode_bytes(2, 64, 64, 8) == 2 * device_memory.decode_bytes(1, 64, 64, 8)


def test_vae_whole_is_on_by_default_and_off_with_its_negative_flag() -> None:
    import argparse

    from tadm.commands.common import add_model_arguments, tiling_from_args

    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    assert Tiling().vae_whole and tiling_from_args(ap.parse_args(["--ckpt", "x.ckpt"])).vae_whole
    assert not tiling_from_args(ap.parse_args(["--ckpt", "x.ckpt", "--no-vae-whole"])).vae_whole


def _graphs(fn: Callable[..., Any], *args: Any) -> tuple[int, list[str]]:
    """How many graphs torch.compile would make of ``fn(*args)``, and why it broke between them (dynamo
    only: no code is generated, so this is cheap)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_count, [b.reason.splitlines()[0] for b in explained.break_reasons]


def test_what_compile_wraps_traces_as_one_graph_each(one_thread: None) -> None:
    """``--compile`` pays off where dynamo sees whole networks: each graph break is a return to Python (on a
    GPU at 512 px, kernel launches one by one again). The rescaler's upscale, the aligner and the hybrid
    scheduler each trace as ONE graph: the fixed branch on DDPM and on flow time, ``learned_t`` with a map.
    (The UNet: in the slow compiled-upscale test below.)"""
    model = _tiny_enhancer("tiny-sd21")
    y = torch.rand(1, 3, 4, 4) * 2 - 1
    with torch.no_grad():
        z = model.rescaler.upscale(y)
        assert _graphs(model.rescaler.upscale, y) == (1, [])
        assert _graphs(model.aligner, model.aligner_input(z), None) == (1, [])
        out = torch.randn_like(z)
        t = model.aligner(z)
        time = model.backbone.time_convention
        assert time is not None and model.enhancer is not None
        assert _graphs(model.enhancer, z, out, t, time) == (1, [])
        learned = HybridScheduler(mode="learned_t").eval()
        assert _graphs(learned, z, out, t.view(-1, 1, 1, 1).expand(-1, 1, *z.shape[-2:]), time) == (1, [])
        flow = FlowTime(shift=3.0)
        scheduler = HybridScheduler().eval()
        # unattached, the flow convention maps t0 on host tensors in every call: a break each time
        assert _graphs(scheduler, z, out, t, flow)[0] > 1
        scheduler.attach_time(flow)  # what TADMModel.load_parts does
        assert _graphs(scheduler, z, out, t, flow) == (1, [])


def test_prepare_inference_compiles_the_networks_of_the_upscale_but_the_vae(one_thread: None) -> None:
    """``load_codec(compile=True)`` / ``tadm upscale --compile``: UNet, the rescaler's upscale, aligner and
    hybrid scheduler are compiled (lazily: nothing is generated until a call), once however often it is
    asked; the VAE is not (its tiles share GroupNorm statistics through the dispatcher); the modules keep
    their types and state-dict keys."""
    model = _tiny_enhancer("tiny-sd21")
    keys = set(model.state_dict())
    aligner, enhancer = model.aligner, model.enhancer
    assert aligner is not None and enhancer is not None
    assert aligner._compiled_call_impl is None and "upscale" not in vars(model.rescaler)
    model.prepare_inference(compile=True)
    unet, vae = model.backbone.unet, model.backbone.vae
    assert unet is not None and vae is not None
    assert isinstance(unet, torch._dynamo.eval_frame.OptimizedModule)
    assert aligner._compiled_call_impl is not None and enhancer._compiled_call_impl is not None
    assert "upscale" in vars(model.rescaler)  # this instance's compiled method
    assert model.aligner is aligner and isinstance(model.enhancer, HybridScheduler)
    assert vae._compiled_call_impl is None and not isinstance(vae, torch._dynamo.eval_frame.OptimizedModule)
    assert {k.replace("unet._orig_mod.", "unet.") for k in model.state_dict()} == keys
    model.prepare_inference(compile=True)  # again: nothing is wrapped twice
    assert model.backbone.unet is unet and not hasattr(unet._orig_mod, "_orig_mod")


@pytest.mark.slow  # torch.compile (inductor) of even the tiny UNet takes 1-2 minutes on a 2-core CPU
def test_compiled_upscale_gives_the_eager_output(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """``--compile`` (``TADMModel.prepare_inference(compile=True)``, what ``load_codec`` does: UNet, DFRM
    upscale, TPM, hybrid scheduler) restores the same image as eager on the tiny SD 2.1 twin, on tiles,
    within float tolerance, without one graph break."""
    from torch._dynamo.utils import counters

    model = _tiny_enhancer("tiny-sd21")
    y = torch.rand(1, 3, 9, 13) * 2 - 1
    with torch.no_grad():
        eager = pipeline.upscale(model.backbone, model.rescaler, y, (144, 208), model.enhance_fn, MANY_TILES)
        torch._dynamo.reset()
        counters.clear()
        model.prepare_inference(compile=True)
        unet = model.backbone.unet
        assert unet is not None and hasattr(unet, "_orig_mod")  # really compiled
        compiled = pipeline.upscale(
            model.backbone, model.rescaler, y, (144, 208), model.enhance_fn, MANY_TILES
        )
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 4  # UNet, DFRM upscale, TPM, hybrid scheduler
    assert eager.timesteps is not None and compiled.timesteps is not None
    torch.testing.assert_close(compiled.image, eager.image, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.timesteps, eager.timesteps)
