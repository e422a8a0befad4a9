"""Tune each setting's learning rate in two stages, every run a trial of one protocol sweep.

    OMP_NUM_THREADS=1 python -m train.tune configs/tuning/quality.yaml --parallel 2 [--only muon adamw] [--stage grid]

A tuning file (YAML) names the protocol sweep, the seeds of stage 2 and the settings, each the
sweep parameters it sets besides ``lr`` and ``seed`` and its lr grid::

    sweep: configs/sweeps/quality.yaml
    seeds: [1, 2]
    settings:
      muon: {set: {optimizer: muon, rank: null}, lr: [5.0e-3, 1.0e-2, 2.0e-2]}

1. ``grid``: each setting's lr grid at the sweep's own ``seed``, into ``<output-root>/<setting>``;
2. ``seeds``: the tuning file's seeds at the setting's best lr (the lowest final validation
   loss of its grid, read from the stage-1 report's ``tuned.json``), into the same folder.

Each stage of a setting is a sweep run by :mod:`train.sweep` (trials already done are skipped,
interrupted ones resumed; its report written beside them); then :mod:`train.report` tables
every setting together in ``<output-root>/report`` (``tuned.md``, ``tuned.json``,
``tuned_vs_state.png``: :mod:`train.tuned`). Exit status 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from train.report import write_report
from train.sweep import WANDB_MODES, SweepRunner, exit_status, expand, load_sweep, with_parameters

KEYS = ("sweep", "seeds", "settings")
SETTING_KEYS = ("set", "lr")
STAGES = ("grid", "seeds", "all")


def _check_keys(where: str, mapping: Any, keys: tuple[str, ...]) -> None:
    """One error naming the first key unknown or missing, unless ``mapping`` has exactly ``keys``."""
    if not isinstance(mapping, dict):
        raise ValueError(f"Invalid {where}: {mapping!r} (allowed: a mapping with the keys {', '.join(keys)})")
    unknown, missing = [k for k in mapping if k not in keys], [k for k in keys if k not in mapping]
    if unknown or missing:
        problem = f"unknown key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise ValueError(f"Invalid {where}: {problem} (allowed: {', '.join(keys)})")


def load_tuning(path: str | Path) -> dict[str, Any]:
    """The tuning file, checked, with its protocol sweep loaded in place of its path."""
    import yaml

    try:
        tuning = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid tuning file {str(path)!r}: {str(err).splitlines()[0]}") from err
    _check_keys(f"tuning file {str(path)!r}", tuning, KEYS)
    sweep = load_sweep(tuning["sweep"])
    seed = sweep["parameters"].get("seed")
    if not isinstance(seed, dict) or type(seed.get("value")) is not int:
        raise ValueError(f"Invalid sweep {tuning['sweep']!r}: parameter seed {seed!r} (allowed: one int value)")
    seeds = tuning["seeds"]  # above the grid's seed: the report reads a setting's grid at its lowest seed
    if not isinstance(seeds, list) or not seeds or any(type(s) is not int or s <= seed["value"] for s in seeds):
        raise ValueError(f"Invalid seeds: {seeds!r} (allowed: a non-empty list of ints above the sweep's seed)")
    settings = tuning["settings"]
    if not isinstance(settings, dict) or not settings:
        raise ValueError(f"Invalid settings: {settings!r} (allowed: a non-empty mapping of name -> set, lr)")
    for name, setting in settings.items():
        _check_setting(name, setting)
    return {**tuning, "sweep": sweep}


def _check_setting(name: str, setting: Any) -> None:
    _check_keys(f"setting {name!r}", setting, SETTING_KEYS)
    if not isinstance(setting["set"], dict) or {"lr", "seed"} & set(setting["set"]):
        raise ValueError(f"Invalid set of setting {name!r}: {setting['set']!r} (allowed: parameters but lr, seed)")
    lrs = setting["lr"]  # a number: YAML reads 1e-3 (no point) as a string
    if not isinstance(lrs, list) or not lrs or not all(type(lr) in (int, float) and lr > 0 for lr in lrs):
        raise ValueError(f"Invalid lr of setting {name!r}: {lrs!r} (allowed: a non-empty list of numbers > 0)")


def best_lr(folder: Path) -> float:
    """The best lr of a setting's grid, from the report of its folder."""
    path = folder / "report" / "tuned.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    if len(rows) != 1:
        raise ValueError(
            f"Invalid --stage seeds for {folder.name!r}: {path} holds {len(rows)} settings' results "
            "(allowed: 1, from its --stage grid)"
        )
    return float(rows[0]["best_lr"])


def run_stage(tuning: dict[str, Any], name: str, values: dict[str, Any], args: argparse.Namespace) -> int:
    """One stage of a setting as a sweep of the protocol; returns the number of failed trials."""
    config = with_parameters(tuning["sweep"], {**tuning["settings"][name]["set"], **values})
    folder = args.output_root / name
    runner = SweepRunner(config, expand(config), folder, wandb=args.wandb)
    if args.dry_run:
        print("\n".join(f"{n} {' '.join(runner.command(i))}" for i, n in enumerate(runner.names)), flush=True)
        return 0
    records = runner.run(parallel=args.parallel)
    write_report(folder, folder / "report")
    skipped, failed = sum(bool(r.get("skipped")) for r in records), sum(r["status"] != "ok" for r in records)
    print(f"[tune] {name} {values}: {len(records)} trials, {skipped} skipped (done), {failed} failed", flush=True)
    return failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("tuning", help="a tuning YAML, e.g. configs/tuning/quality.yaml")
    parser.add_argument("--parallel", type=int, default=1, help="trials run at the same time")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these settings only")
    parser.add_argument("--stage", choices=STAGES, default="all", help="grid, seeds at the best lr, or both")
    parser.add_argument("--output-root", type=Path, default=None, help="default: runs/<tuning file's name>")
    parser.add_argument("--wandb", default="off", choices=WANDB_MODES, help="wandb mode of the trials")
    parser.add_argument("--dry-run", action="store_true", help="print the trials' commands, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tuning = load_tuning(args.tuning)
    unknown = sorted(set(args.only or ()) - set(tuning["settings"]))
    if unknown:
        raise ValueError(f"Invalid --only: {', '.join(unknown)} (allowed: {', '.join(tuning['settings'])})")
    args.output_root = args.output_root or Path("runs") / Path(args.tuning).stem
    names = args.only or list(tuning["settings"])
    failed = 0
    for name in names if args.stage in ("grid", "all") else ():
        failed += run_stage(tuning, name, {"lr": tuning["settings"][name]["lr"]}, args)
    for name in names if args.stage in ("seeds", "all") else ():
        if args.dry_run and not (args.output_root / name / "report" / "tuned.json").exists():
            print(f"{name}: seeds {tuning['seeds']} at the best lr of its grid, once the grid has run")
            continue
        failed += run_stage(tuning, name, {"lr": [best_lr(args.output_root / name)], "seed": tuning["seeds"]}, args)
    if not args.dry_run:
        write_report(args.output_root, args.output_root / "report")
        print(f"[tune] {failed} trials failed; report in {args.output_root / 'report'}", flush=True)
    return 1 if failed else 0


def main_exit_status(argv: list[str] | None = None) -> int:
    """``python -m train.tune`` with :func:`train.sweep.exit_status`."""
    return exit_status(main, argv, "tuning")


if __name__ == "__main__":
    sys.exit(main_exit_status())
