"""The tuned quality table: every optimizer of the registry on one small LLaMA, each at its best
learning rate, over three seeds.

    OMP_NUM_THREADS=1 python -m scripts.bench.quality_table --parallel 2 [--only muon adamw] [--stage grid]

Protocol: ``configs/sweeps/quality.yaml`` (its header). Every run is a trial of that sweep
(``python -m train.sweep``, which trains through ``python -m train``); this module only holds
the grids and runs the sweeps in two stages:

1. ``grid``: each setting below over its lr grid at seed 0, into ``<root>/<setting>``;
2. ``seeds``: seeds 1 and 2 at the setting's best lr (read from the stage-1 report's
   ``tuned.json``), into the same folder.

Then ``python -m train.report <root>`` tables them all (``<root>/report/tuned.md``: lr grid,
best lr, mean and spread over seeds, state bytes per matrix parameter, step time against
AdamW from the runs' tokens/s). Rerunning skips the trials already done.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SWEEP = "configs/sweeps/quality.yaml"
FULL_RANK = {"rank": "null"}

#: setting name -> (``--set`` values besides the lr, lr grid around the recipe's lr)
SETTINGS: dict[str, tuple[dict[str, str], list[float]]] = {
    "adamw": ({"optimizer": "adamw"}, [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),
    "adamw8bit": ({"optimizer": "adamw8bit"}, [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),
    "galore_adamw": ({"optimizer": "galore_adamw"}, [1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2]),
    "galore_adamw8bit": ({"optimizer": "galore_adamw8bit"}, [2.5e-3, 5e-3, 1e-2]),
    "galore_adafactor": ({"optimizer": "galore_adafactor"}, [2.5e-3, 5e-3, 1e-2, 2e-2]),
    "q_galore_adamw8bit": ({"optimizer": "q_galore_adamw8bit"}, [2.5e-3, 5e-3, 1e-2]),
    "dct_adamw": ({"optimizer": "dct_adamw"}, [1.25e-3, 2.5e-3, 5e-3, 6.25e-4]),
    "muon": ({"optimizer": "muon", **FULL_RANK}, [5e-3, 1e-2, 2e-2, 4e-2]),
    "auon": ({"optimizer": "auon", **FULL_RANK}, [0.05, 0.1, 0.2, 0.4, 0.025, 0.0125]),
    "hybrid_auon": ({"optimizer": "hybrid_auon", **FULL_RANK}, [0.02, 0.05, 0.1, 0.01, 0.005]),
    # Muon's momentum stored in 2 bytes, 1 byte and half a byte (stochastic rounding)
    # (variants of Muon: at its best lr, 2e-2, and the 8-bit one also at its neighbours)
    "muon_bf16": ({"optimizer": "muon", **FULL_RANK, "momentum-dtype": "bfloat16"}, [2e-2]),
    "muon_8bit": ({"optimizer": "muon", **FULL_RANK, "momentum-dtype": "8bit"}, [1e-2, 2e-2, 4e-2]),
    "muon_4bit": ({"optimizer": "muon", **FULL_RANK, "momentum-dtype": "4bit"}, [2e-2]),
    # Muon inside the rank-64 subspace, with Fira's scaled residual giving back the rest of G
    "muon_rank64_residual": ({"optimizer": "muon", "update-form": "residual"}, [5e-3, 1e-2, 2e-2]),
    "sinkgd": ({"optimizer": "sinkgd", **FULL_RANK}, [3e-4, 1e-3, 3e-3]),
    "scale_sgd": ({"optimizer": "scale_sgd", **FULL_RANK}, [3e-4, 1e-3, 3e-3]),
    "apollo": ({"optimizer": "apollo"}, [2.5e-3, 5e-3, 1e-2, 2e-2]),
    "apollo_mini": ({"optimizer": "apollo_mini", "rank": "1"}, [2.5e-3, 5e-3, 1e-2, 2e-2, 1.25e-3]),
    "fira": ({"optimizer": "fira"}, [2.5e-3, 5e-3, 1e-2, 2e-2]),
    # DCT's columns, chosen again every step as DCTAdamW does, with Fira's residual
    "fira_dct": (
        {"optimizer": "fira", "proj-method": "dct", "update-proj-gap": "1"},
        [2.5e-3, 5e-3, 1e-2, 2e-2, 1.25e-3],
    ),
}


def sweep(root: Path, name: str, sets: dict[str, str], lrs: list[float], seeds: list[int], parallel: int) -> int:
    """Run one setting's trials (lr x seed) as a sweep of the quality protocol."""
    args = [sys.executable, "-m", "train.sweep", SWEEP, "--wandb", "off", "--parallel", str(parallel)]
    args += ["--output-root", str(root / name)]
    for key, value in {**sets, "lr": f"[{', '.join(map(str, lrs))}]", "seed": f"{seeds}"}.items():
        args += ["--set", f"{key}={value}"]
    print(" ".join(args), flush=True)
    return subprocess.run(args).returncode


def best_lr(root: Path, name: str) -> float:
    """The best lr of a setting's stage-1 grid (its sweep's report)."""
    rows = json.loads((root / name / "report" / "tuned.json").read_text())
    if len(rows) != 1:
        raise ValueError(f"{root / name}: expected one setting in its report, found {len(rows)}")
    return float(rows[0]["best_lr"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.quality_table", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/quality"), help="where the runs go")
    parser.add_argument("--only", nargs="+", choices=sorted(SETTINGS), help="these settings only")
    parser.add_argument("--stage", choices=("grid", "seeds", "all"), default="all")
    parser.add_argument("--parallel", type=int, default=2, help="trials at once")
    args = parser.parse_args(argv)
    names = args.only or list(SETTINGS)
    failed = 0
    for name in names if args.stage in ("grid", "all") else ():
        sets, lrs = SETTINGS[name]
        failed += sweep(args.root, name, sets, lrs, [0], args.parallel) != 0
    for name in names if args.stage in ("seeds", "all") else ():
        sets, _ = SETTINGS[name]
        failed += sweep(args.root, name, sets, [best_lr(args.root, name)], [1, 2], args.parallel) != 0
    subprocess.run([sys.executable, "-m", "train.report", str(args.root)], check=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
