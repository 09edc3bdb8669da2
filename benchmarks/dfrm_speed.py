"""DFRM speed and memory on this machine: parameters, one stage-1 training step and one
downscale + upscale, at x16 and x32, for the paper-size DFRM and the quickstart's slim one.

    .venv/bin/python benchmarks/dfrm_speed.py [--size 512] [--batch 1] [--repeats 3]

Prints a table; nothing is asserted (numbers depend on the machine). Ratios within one run are
the meaningful figures.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from tadm.components.rescalers.dfrm import DFRM
from tadm.training.losses import DEFAULT_STAGE1_WEIGHTS, get_distance, weighted_sum

VARIANTS = {
    "paper": {},
    "quickstart": {"width": 128, "num_resblocks": 2, "num_couplings": 8},
}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent-channels", type=int, default=4, help="4 = SD VAE, 192 = space_to_depth")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, HR {args.size}x{args.size}, batch {args.batch}"
    )
    print(f"{'variant':<11} {'scale':>5} {'params (M)':>10} {'train step (s)':>14} {'down+up (s)':>11}")
    dist = get_distance("mse")
    for name, kw in VARIANTS.items():
        for scale in (16, 32):
            m = DFRM(scale=scale, latent_channels=args.latent_channels, **kw)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
            x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
            z = torch.randn(args.batch, args.latent_channels, args.size // 8, args.size // 8)

            def step(m=m, opt=opt, x=x, z=z) -> None:
                loss = weighted_sum(m.training_losses(x, z, dist), DEFAULT_STAGE1_WEIGHTS)
                opt.zero_grad()
                loss.backward()
                opt.step()

            def infer(m=m, x=x, z=z) -> None:
                with torch.no_grad():
                    m.upscale(m.downscale(x, z))

            m.train()
            t_train = _timed(step, args.repeats)
            m.eval()
            t_inf = _timed(infer, args.repeats)
            params = sum(p.numel() for p in m.parameters()) / 1e6
            print(f"{name:<11} {scale:>5} {params:>10.2f} {t_train:>14.3f} {t_inf:>11.3f}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"peak RSS of this process: {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
