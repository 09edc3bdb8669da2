"""Memory and cost of one stage-2 training step of a recipe + ``configs/hardware/one_gpu_24gb.yaml`` on the
FULL-SIZE SD 2.1 architecture (random weights, no download), measured on the CPU (issue 15).

    flock /tmp/tadm-heavy.lock .venv/bin/python benchmarks/train_memory.py          # tadm recipe, ~15-20 min
    flock /tmp/tadm-heavy.lock .venv/bin/python benchmarks/train_memory.py \\
        --recipe configs/experiments/release/enhancer_x16.yaml                     # the release's recipe
    ... benchmarks/train_memory.py --config configs/hardware/adamw_8bit.yaml        # needs bitsandbytes
    ... benchmarks/train_memory.py --set data.init_args.batch_size=4 --set trainer.accumulate_grad_batches=4

The model, its optimiser, the micro-batch (``data.init_args.batch_size`` crops of ``crop_size`` px) and the
precision all come from the composed YAML, parsed by tadm's own CLI; only the weights are replaced: the
backbone's loader is swapped for one that builds the real diffusers UNet / VAE architectures with random
weights (``FULL_SIZE_*`` in ``tadm/testing/twins/full_size_architectures.py``) and a random empty-prompt embedding (the
text encoder runs once at load time and is freed, so it costs training nothing), and LPIPS / DISTS get a
random VGG16 (``tadm/testing/twins/vgg16_stand_in.py``). ``bf16-mixed`` runs the step under CPU autocast to bfloat16, as
Lightning does; fp32 weights, as Lightning keeps them.

After a warm-up micro-step (forward + backward of one micro-batch) and optimiser step, and a timed
micro-step that leaves its gradients (as micro-steps 2..accumulate find them):

1. memory: weights, buffers, gradients and optimiser state are counted from the tensors themselves; one
   more micro-step and optimiser step run under ``LivePeak`` (below), which follows every storage an
   operator creates until it is freed: the peak of those (activations saved for backward, the
   recomputation of gradient checkpointing, temporaries) is added. The sum is the tensor memory a GPU
   holds at the peak of a steady-state step; the CUDA context, library workspaces and the caching
   allocator's fragmentation come on top (see benchmarks/README.md);
2. time: wall clock of the second micro-step and of the optimiser step, on this CPU;
3. FLOPs of one micro-step under ``torch.utils.flop_counter.FlopCounterMode`` (matmul / conv / attention,
   including gradient checkpointing's recomputation). GPU-hours per 10k optimiser steps are those FLOPs x
   accumulate_grad_batches x 10k at an ASSUMED fraction (``--util``) of a GPU's dense bf16 peak: an
   estimate, not a measurement.

Peak RSS (``ru_maxrss``) of this process is printed too: it includes Python, the libraries and the build.
Prints a table and one ``RESULT {json}`` line; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = "configs/experiments/enhancer_x16.yaml"
HARDWARE = "configs/hardware/one_gpu_24gb.yaml"
#: dense bf16 tensor-core peaks (TFLOP/s, fp32 accumulate) from the vendors' data sheets
GPUS = {"RTX 4090": 165.2, "A100": 312.0, "H100 SXM": 989.0}
GIB = 1024**3


def full_size_loader(device: str | None = None) -> None:
    """Make ``stable_diffusion`` backbones build the real architectures with random weights (initialised on
    ``device``: on a GPU that takes a second where the CPU takes half a minute for SDXL's UNet)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from tadm.components.backbones.stable_diffusion import unet_backbone, unet_weight_loading
    from tadm.components.backbones.stable_diffusion.unet_presets import TEXT_SUBFOLDERS
    from tadm.testing.twins.full_size_architectures import FULL_SIZE_UNETS, FULL_SIZE_VAE

    def load(self: Any, todo: list[str]) -> dict[str, Any]:
        if self.preset.family not in ("sd21", "sdxl"):
            raise SystemExit(f"no full-size architecture for family {self.preset.family!r} here")
        torch.manual_seed(0)
        with torch.device(device) if device else contextlib.nullcontext():
            return _build(self, todo)

    def _build(self: Any, todo: list[str]) -> dict[str, Any]:
        new: dict[str, Any] = {}
        if "vae" in todo:
            new["vae"] = AutoencoderKL(**FULL_SIZE_VAE, scaling_factor=self.preset.scaling_factor)
        if "unet" in todo:
            config = dict(FULL_SIZE_UNETS["sdxl" if self.preset.family == "sdxl" else "sd21-base"])
            if self.preset_name == "sd21":  # the 768-px v-prediction model: same shapes, upcast attention
                config.update(sample_size=96, upcast_attention=True)
            new["unet"] = UNet2DConditionModel(**config)
            new["scheduler"] = DDPMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                prediction_type="v_prediction" if self.preset_name == "sd21" else "epsilon",
            )
        if "text" in todo:
            for encoder, tokenizer in TEXT_SUBFOLDERS[self.preset.family]:
                new[encoder] = new[tokenizer] = None
        return new

    def empty_prompt(self: Any, parts: Any) -> tuple[Any, Any]:
        pooled = torch.randn(1, 1280) if self.preset.family == "sdxl" else None
        return torch.randn(1, 77, self.preset.context_dim), pooled

    unet_weight_loading.UNetWeightLoader.load = load  # type: ignore[method-assign]
    unet_backbone.StableDiffusionBackbone._encode_empty_prompt = empty_prompt  # type: ignore[method-assign]


def step_only_args() -> list[str]:
    """CLI overrides for a module built to be stepped by hand: no trainer run, logger, callbacks or checkpoints,
    no ``init_from``, the bundled photos as data read in-process (gpu_training.py uses them too)."""
    return [
        "--model.init_from=null",
        "--trainer.accelerator=cpu",  # nothing runs the trainer: the case moves the model itself
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        f"--data.init_args.train_dir={ROOT / 'assets/samples/train'}",
        f"--data.init_args.val_dir={ROOT / 'assets/samples/val'}",
        "--data.init_args.num_workers=0",
    ]


def build(args: argparse.Namespace) -> Any:
    """tadm's CLI objects for the composed YAML (nothing runs), on the CPU."""
    sys.path.insert(0, str(ROOT))
    from tadm.commands.lightning import TADMCLI
    from tadm.config.plugins import load_plugins
    from tadm.testing.twins.vgg16_stand_in import write_random_vgg16
    from tadm.training.lightning_module import TADMModule

    home = Path(tempfile.mkdtemp(prefix="tadm-train-memory-"))
    write_random_vgg16(home)
    os.environ["TORCH_HOME"] = str(home)
    full_size_loader()
    load_plugins()
    argv = ["--config", args.recipe, "--config", args.hardware]
    for extra in args.config:
        argv += ["--config", extra]
    argv += [*step_only_args(), *(f"--{s}" for s in args.set)]
    import lightning as L

    return TADMCLI(TADMModule, L.LightningDataModule, subclass_mode_data=True, run=False, args=argv)


class LivePeak(TorchDispatchMode):
    """Bytes of the tensor storages that operators create inside this mode and that are still alive, and
    their peak. Storages that existed before (weights, gradients, optimiser state, the batch) are passed to
    ``ignore`` so an in-place op returning one of them does not count it. A freed storage leaves the count
    through a weak-reference callback: the same bookkeeping as PyTorch's MemTracker, which refuses models
    with frozen parameters and modules called twice in one step (LPIPS / DISTS run their VGG twice)."""

    def __init__(self, ignore: Any) -> None:
        super().__init__()
        self.static = {st.data_ptr() for st in (t.untyped_storage() for t in ignore)}
        self.refs: dict[int, weakref.ref] = {}
        self.live = self.peak = 0
        self.marks: dict[str, int] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self.refs.pop(key, None)
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, nbytes = id(st), st.nbytes()
        if key in self.refs or nbytes == 0 or st.data_ptr() in self.static:
            return
        self.refs[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._freed(k, n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def mark(self, name: str) -> None:
        self.marks[name] = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, help="the stage-2 recipe (default %(default)s)")
    ap.add_argument("--hardware", default=HARDWARE, help="composed onto it (default %(default)s)")
    ap.add_argument("--config", action="append", default=[], help="more YAML composed after those")
    ap.add_argument(
        "--set", action="append", default=[], help="a dotted override, e.g. trainer.precision=32-true"
    )
    ap.add_argument("--util", type=float, default=0.35, help="assumed fraction of the GPU's bf16 peak")
    ap.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's top ops of a micro-step"
    )
    args = ap.parse_args()
    os.chdir(ROOT)  # the YAML paths are relative to the repository, as in the docs

    t0 = time.perf_counter()
    cli = build(args)
    build_s = time.perf_counter() - t0
    model = cli.model
    cfg = cli.config
    batch, crop = cfg["data"]["init_args"]["batch_size"], cfg["data"]["init_args"]["crop_size"]
    accumulate = cfg["trainer"]["accumulate_grad_batches"]
    precision = str(cfg["trainer"]["precision"])
    checkpointing = bool(getattr(model.backbone.unet, "is_gradient_checkpointing", False))
    params = model.trainable_parameters()
    opt = model.optimizer_factory(params) if model.optimizer_factory else torch.optim.AdamW(params, lr=1e-4)
    trainable_ids = {id(p) for p in params}
    trainable_b = tensor_bytes(params)
    frozen_b = tensor_bytes(p for p in model.parameters() if id(p) not in trainable_ids)
    buffer_b = tensor_bytes(model.buffers())
    model.train()
    torch.manual_seed(0)
    x = torch.rand(batch, 3, crop, crop) * 2 - 1
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in precision)

    def forward() -> torch.Tensor:
        with autocast:
            return model.training_step({"image": x}, 0)

    def optimizer_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    # warm-up: a micro-step and an optimiser step (creates the optimiser state), then a timed micro-step
    # that leaves its gradients, as micro-steps 2..accumulate of every optimiser step find them
    t0 = time.perf_counter()
    forward().backward()
    first_s = time.perf_counter() - t0
    optimizer_step()
    t0 = time.perf_counter()
    forward().backward()
    micro_s = time.perf_counter() - t0
    grads = [p.grad for p in params if p.grad is not None]
    grad_b, opt_b = tensor_bytes(grads), optimizer_state_bytes(opt)
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    static = [*model.parameters(), *model.buffers(), *grads, *state, x]
    # 1. memory: what one more micro-step creates on top of the static tensors (activations, temporaries),
    #    then the optimiser step's temporaries
    with LivePeak(static) as micro:
        loss = forward()
        micro.mark("end of forward")
        loss.backward()
        del loss
    t0 = time.perf_counter()
    with LivePeak(static) as step:
        optimizer_step()
    opt_s = time.perf_counter() - t0
    # 2. FLOPs of one micro-step (forward, backward, checkpointing's recomputation)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        forward().backward()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward().backward()
        opt.zero_grad(set_to_none=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    steady = frozen_b + trainable_b + buffer_b + grad_b + opt_b
    dynamic = max(micro.peak, step.peak)
    step_flops = flops * accumulate
    result: dict[str, Any] = {
        "recipe": args.recipe,
        "configs": [args.hardware, *args.config],
        "set": args.set,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        "precision": precision,
        "micro_batch": batch,
        "crop": crop,
        "accumulate": accumulate,
        "gradient_checkpointing": checkpointing,
        "optimizer": type(opt).__module__ + "." + type(opt).__qualname__,
        "build_s": build_s,
        "trainable_M": sum(p.numel() for p in params) / 1e6,
        "GiB": {
            "frozen weights": frozen_b / GIB,
            "trained weights": trainable_b / GIB,
            "buffers": buffer_b / GIB,
            "gradients": grad_b / GIB,
            "optimiser state": opt_b / GIB,
            "activations at end of forward": micro.marks["end of forward"] / GIB,
            "micro-step peak above static": micro.peak / GIB,
            "optimiser-step peak above static": step.peak / GIB,
            "tensor peak": (steady + dynamic) / GIB,
        },
        "peak_rss_GiB": rss_gib(),
        "first_micro_step_s": first_s,
        "micro_step_s": micro_s,
        "optimizer_step_s": opt_s,
        "micro_step_TFLOP": flops / 1e12,
        "util": args.util,
        "gpu_hours_per_10k_steps": {
            gpu: step_flops * 10_000 / (tflops * 1e12 * args.util) / 3600 for gpu, tflops in GPUS.items()
        },
    }
    print(f"{result['machine']}; {args.recipe} + {', '.join(result['configs'])} {' '.join(args.set)}")
    print(
        f"micro-batch {batch} x {crop} px, accumulate {accumulate}, {precision}, gradient checkpointing "
        f"{checkpointing}, {result['optimizer']}, {result['trainable_M']:.1f} M trained; build {build_s:.0f} s"
    )
    print("memory, GiB (steady state: weights + buffers + gradients + optimiser state + the step's peak):")
    for kind, value in result["GiB"].items():
        print(f"  {kind:<34} {value:7.2f}")
    print(
        f"peak RSS of this process {result['peak_rss_GiB']:.2f} GiB (Python, libraries, the build included)"
    )
    print(
        f"time on this CPU: micro-step {micro_s:.1f} s (first {first_s:.1f} s), optimiser step {opt_s:.2f} s"
    )
    print(f"FLOPs: {flops / 1e12:.2f} TFLOP per micro-step, {step_flops / 1e12:.1f} per optimiser step")
    for gpu, hours in result["gpu_hours_per_10k_steps"].items():
        print(
            f"  {gpu:<9} {hours:6.1f} GPU-hours per 10k optimiser steps at {args.util:.0%} of its bf16 peak"
        )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
