"""Time of one subspace refresh per projector, on LLaMA-7B-shaped matrices, as ratios in one run.

Protocol: a Gaussian gradient of each shape (seed 0) in ``--dtype`` on ``--device``; each
projector's ``refresh`` (what the optimizer runs: choose the subspace and store it), proj_type
"std", rank ``--rank``: exact SVD (``torch.linalg.svd``, GaLore's), randomized SVD (oversample
10, 2 power iterations), DCT by one product with the cached basis, and DCT by FFT (Makhoul).
One warm-up call per method on that shape builds the DCT basis cache and FFT plans (the exact
SVD is warmed up on a 256 x 256 matrix instead: a full warm-up would double the run); then
the median of ``--repeats`` timed calls. Also checks that both DCT paths select the same
indices. One intra-op thread by default (``--threads``). Prints a Markdown table (seconds, and
the exact SVD's time over each method's).

    python -m scripts.bench.projection_cost [--shapes 4096x4096,4096x11008] [--rank 1024]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from lowmem_optim.parts import defaults
from lowmem_optim.projection import DCTProjector, RandomizedSVDProjector, SVDProjector
from scripts.bench.toolkit import markdown_table, median_seconds, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008")
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (on a shared machine more mostly wait on each other)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)

    def refresh_by(projector: Any, **extra: Any) -> Callable[[torch.Tensor, dict], Any]:
        parts = [part for part in (projector, projector.storage) if part is not None]
        group = {**defaults(*parts), "rank": args.rank, "proj_type": "std", **extra}
        return lambda grad, state: projector.refresh(grad, state, group, 0)

    methods = {
        "exact SVD": refresh_by(SVDProjector()),
        "randomized SVD": refresh_by(RandomizedSVDProjector()),
        "DCT matmul": refresh_by(DCTProjector(), dct_fft_threshold=10**9),
        "DCT FFT": refresh_by(DCTProjector(), dct_fft_threshold=1),
    }
    methods["exact SVD"](torch.randn(256, 256, device=device, dtype=dtype), {})
    print(
        f"device {device} ({torch.get_num_threads()} threads), dtype {args.dtype}, rank {args.rank}, "
        f"torch {torch.__version__}, median of {args.repeats} timed call(s)"
    )
    results = []
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        grad = torch.randn(m, n, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        row = {"shape": shape}
        states = {}
        for name, refresh in methods.items():
            state = states[name] = {}
            run, warmup = partial(refresh, grad, state), int(name != "exact SVD")
            row[name] = median_seconds(run, args.repeats, device, warmup=warmup, before=state.clear)
            print(f"  {shape} {name}: {row[name]:.4f} s", flush=True)
        row["dct_paths_same_indices"] = bool(
            torch.equal(states["DCT matmul"]["proj_index"], states["DCT FFT"]["proj_index"])
        )
        results.append(row)
    names = list(methods)
    columns = ["shape", *(f"{n} (s)" for n in names), *(f"SVD / {n}" for n in names[1:]), "DCT paths same indices"]
    cells = [
        [row["shape"], *(f"{row[n]:.3g}" for n in names), *(f"{row['exact SVD'] / row[n]:.1f}x" for n in names[1:])]
        + [row["dct_paths_same_indices"]]
        for row in results
    ]
    print("\n" + markdown_table(columns, cells))
    write_json(args.json, {"device": str(device), "dtype": args.dtype, "rank": args.rank, "results": results})


if __name__ == "__main__":
    main()
