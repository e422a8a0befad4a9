"""Run a wandb sweep configuration offline: expand its trials, train each one, write the report.

    python -m train.sweep configs/sweeps/tiny.yaml [--parallel N] [--output-root runs/sweeps/tiny]
    python -m train.sweep configs/sweeps/cpu_small.yaml --set optimizer=dct_adamw --set "seed=[0, 1]"

The YAML is the one ``wandb sweep`` takes. Its trials are expanded with wandb's semantics:

- ``grid``: every combination of the parameters' values, parameters in sorted name order, the
  last name varying fastest; ``values``, ``value``, ``int_uniform`` (min..max inclusive) and
  ``q_uniform`` (``numpy.arange(min, max, q)``, max excluded) are allowed, as in wandb.
  ``run_cap`` (or ``--count``) keeps the first trials.
- ``random``: ``run_cap`` (or ``--count``) trials, each parameter drawn in sorted name order as
  ``ppf(u)`` of its distribution with ``u`` from ``random.Random(--sample-seed)``; a
  distribution is inferred as wandb does when the key is absent (``values`` -> categorical,
  ``value`` -> constant, integer ``min``/``max`` -> int_uniform, else uniform).
- ``bayes`` needs wandb's controller (``wandb sweep`` + ``wandb agent``): refused here.

``--set KEY=VALUE`` replaces (or adds) one parameter before the trials are expanded: a YAML
flow list (``"lr=[0.001, 0.01]"``) becomes its ``values``, anything else its ``value``; so one
YAML holds a benchmark's protocol and each variant of it is a command line.

Each trial runs the YAML's ``command`` (default ``${env} ${interpreter} ${program} ${args}``)
in a subprocess, with ``${args}`` rendered as wandb's agent renders it (``--key=value``,
booleans ``True``/``False``), ``--output-dir`` set to the trial's folder and ``--wandb``
set to ``offline`` (with ``WANDB_MODE=offline`` and ``WANDB_DIR`` in the trial folder, for a
later ``wandb sync``) or ``off``. A failed trial is recorded (return code, log) and the sweep
goes on. Trials recorded as done with the same parameters are skipped, and a trial whose folder
holds an earlier attempt's checkpoints or metrics (interrupted, preempted) is rerun with
``--resume=True``, so an interrupted sweep resumes by running the same command again.

A grid is counted before it is built: more than :data:`MAX_GRID_TRIALS` combinations is refused
(``--dry-run`` too), as is a parameter with an empty list of values.

Output: ``<output-root>/<trial>/`` (``metrics.jsonl``, ``config.json``, ``train.log``,
``trial.json``), ``<output-root>/sweep.json`` (every trial's record) and
``<output-root>/report/`` (``python -m train.report``). Exit status 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from train.checkpoint import latest

METHODS = ("grid", "random", "bayes")
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
WANDB_MODES = ("offline", "off")
#: a larger grid is a mistake (a range of floats read as integers, a forgotten value list), not a sweep
MAX_GRID_TRIALS = 100_000


def _q(value: float, q: float | int) -> float | int:
    """wandb's quantization: round(x / q) * q, an int when q is an int."""
    rounded = round(value / q) * q
    return int(rounded) if isinstance(q, int) else float(rounded)


def _log_uniform(lo: float, hi: float, u: float) -> float:
    return math.exp(lo + u * (hi - lo))


def _normal(spec: dict[str, Any], u: float) -> float:
    return NormalDist(spec.get("mu", 0.0), spec.get("sigma", 1.0)).inv_cdf(u)


def _categorical_w_probabilities(spec: dict[str, Any], u: float) -> Any:
    total = 0.0
    for value, p in zip(spec["values"], spec["probabilities"]):
        total += p
        if u < total:
            return value
    return spec["values"][-1]


#: distribution name -> its inverse CDF at u in (0, 1), over the parameter's spec (wandb's names)
SAMPLERS: dict[str, Callable[[dict[str, Any], float], Any]] = {
    "constant": lambda s, u: s["value"],
    "categorical": lambda s, u: s["values"][min(int(u * len(s["values"])), len(s["values"]) - 1)],
    "categorical_w_probabilities": _categorical_w_probabilities,
    "int_uniform": lambda s, u: s["min"] + min(int(u * (s["max"] - s["min"] + 1)), s["max"] - s["min"]),
    "uniform": lambda s, u: s["min"] + u * (s["max"] - s["min"]),
    "q_uniform": lambda s, u: _q(s["min"] + u * (s["max"] - s["min"]), s.get("q", 1.0)),
    "log_uniform": lambda s, u: _log_uniform(s["min"], s["max"], u),
    "log_uniform_values": lambda s, u: _log_uniform(math.log(s["min"]), math.log(s["max"]), u),
    "q_log_uniform_values": lambda s, u: _q(_log_uniform(math.log(s["min"]), math.log(s["max"]), u), s.get("q", 1.0)),
    "normal": _normal,
    "q_normal": lambda s, u: _q(_normal(s, u), s.get("q", 1.0)),
    "log_normal": lambda s, u: math.exp(_normal(s, u)),
    "q_log_normal": lambda s, u: _q(math.exp(_normal(s, u)), s.get("q", 1.0)),
}


def distribution(name: str, spec: dict[str, Any]) -> str:
    """The parameter's distribution: its ``distribution`` key, or inferred from its keys as wandb does."""
    if not isinstance(spec, dict) or "parameters" in spec:
        raise ValueError(
            f"Invalid parameter {name!r}: {spec!r} (allowed: a dict with value, values or "
            "distribution/min/max; nested parameters are not command-line flags)"
        )
    if "distribution" in spec:
        kind = spec["distribution"]
    elif "value" in spec:
        kind = "constant"
    elif "values" in spec:
        kind = "categorical_w_probabilities" if "probabilities" in spec else "categorical"
    elif "min" in spec and "max" in spec:
        both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        kind = "int_uniform" if both_int else "uniform"
    else:
        raise ValueError(f"Invalid parameter {name!r}: {spec!r} (allowed: value, values, or min and max)")
    if kind not in SAMPLERS:
        raise ValueError(f"Invalid distribution of parameter {name!r}: {kind!r} (allowed: {', '.join(SAMPLERS)})")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ValueError(f"Invalid values of parameter {name!r}: {spec['values']!r} (allowed: a non-empty list)")
    return kind


def grid_size(name: str, spec: dict[str, Any]) -> int:
    """How many values :func:`grid_values` gives, counted without building them."""
    kind = _grid_distribution(name, spec)
    if kind == "constant":
        return 1
    if kind == "categorical":
        return len(spec["values"])
    if kind == "int_uniform":
        return max(0, spec["max"] - spec["min"] + 1)
    return max(0, math.ceil((spec["max"] - spec["min"]) / spec.get("q", 1.0)))  # numpy.arange's length


def grid_values(name: str, spec: dict[str, Any]) -> list[Any]:
    """The values a grid search takes for one parameter (wandb: discrete distributions only)."""
    kind = _grid_distribution(name, spec)
    if kind == "constant":
        return [spec["value"]]
    if kind == "categorical":
        return list(spec["values"])
    if kind == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    return np.arange(spec["min"], spec["max"], spec.get("q", 1.0)).tolist()


def _grid_distribution(name: str, spec: dict[str, Any]) -> str:
    kind = distribution(name, spec)
    if kind in GRID_DISTRIBUTIONS:
        return kind
    raise ValueError(
        f"Invalid distribution of parameter {name!r} for method grid: {kind!r} "
        f"(allowed: {', '.join(GRID_DISTRIBUTIONS)})"
    )


def _uniform_open(rng: random.Random) -> float:
    """u in (0, 1): the normal family's inverse CDF is infinite at 0."""
    u = rng.random()
    while u == 0.0:
        u = rng.random()
    return u


def load_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep configuration from a YAML file, with its method and parameters checked."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"Invalid sweep file {str(path)!r}: {err.strerror or err}") from err
    except yaml.YAMLError as err:  # a syntax error, or a tag safe_load does not construct (never executed)
        raise ValueError(f"Invalid sweep file {str(path)!r}: {str(err).splitlines()[0]}") from err
    if not isinstance(config, dict):
        raise ValueError(f"Invalid sweep file {str(path)!r}: not a mapping")
    if config.get("method") not in METHODS:
        raise ValueError(f"Invalid method in {str(path)!r}: {config.get('method')!r} (allowed: {', '.join(METHODS)})")
    if not isinstance(config.get("parameters"), dict) or not config["parameters"]:
        raise ValueError(f"Invalid parameters in {str(path)!r}: a non-empty mapping is required")
    build_command(config, {})  # a bad command template is refused before any trial runs
    return config


def with_parameters(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``config`` with each parameter of ``values`` replaced (or added): a list as its ``values``,
    anything else as its ``value``."""
    replaced = {key: {"values": v} if isinstance(v, list) else {"value": v} for key, v in values.items()}
    return {**config, "parameters": {**config["parameters"], **replaced}}


def override(config: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``config`` with each ``KEY=VALUE`` of ``--set`` as its parameter KEY (see the module docstring)."""
    import yaml

    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"Invalid --set: {assignment!r} (allowed: KEY=VALUE or KEY=[V1, V2, ...])")
        values[key] = yaml.safe_load(text)
        if values[key] == []:
            raise ValueError(f"Invalid --set: {assignment!r} (allowed: KEY=VALUE or KEY=[V1, V2, ...])")
    return with_parameters(config, values)


def expand(config: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials of a sweep, each a ``{flag name: value}`` dict, in the order wandb proposes them.

    ``count`` overrides the configuration's ``run_cap``; random search needs one of the two.
    """
    method, params = config["method"], config["parameters"]
    cap = count if count is not None else config.get("run_cap")
    if cap is not None and (not isinstance(cap, int) or cap < 1):
        raise ValueError(f"Invalid count / run_cap: {cap!r} (allowed: an int >= 1)")
    names = sorted(params)
    if method == "grid":
        sizes = {n: grid_size(n, params[n]) for n in names}
        if math.prod(sizes.values()) > MAX_GRID_TRIALS:
            shown = " x ".join(f"{n} {size}" for n, size in sizes.items())
            raise ValueError(
                f"Invalid grid: {math.prod(sizes.values())} trials ({shown}; allowed: at most {MAX_GRID_TRIALS}); "
                "narrow the parameters' values, or use method random with run_cap"
            )
        empty = [n for n, size in sizes.items() if not size]
        if empty:
            raise ValueError(f"Invalid grid: parameter {empty[0]!r} takes no value (allowed: min < max)")
        combos = itertools.product(*(grid_values(n, params[n]) for n in names))
        return [dict(zip(names, combo)) for combo in itertools.islice(combos, cap)]
    if method == "random":
        if cap is None:
            raise ValueError(
                "Invalid random sweep: no run_cap in the file and no --count (random search is endless without one)"
            )
        kinds = {n: distribution(n, params[n]) for n in names}
        rng = random.Random(seed)
        return [{n: SAMPLERS[kinds[n]](params[n], _uniform_open(rng)) for n in names} for _ in range(cap)]
    raise ValueError(
        f"Invalid method for the offline runner: {method!r} (allowed: grid, random; "
        "bayes needs wandb's controller: `wandb sweep` + `wandb agent`)"
    )


def render_args(params: dict[str, Any]) -> dict[str, list[str]]:
    """The agent's argument macros for one trial (wandb renders values with str())."""
    return {
        "args": [f"--{k}={v}" for k, v in params.items()],
        "args_no_hyphens": [f"{k}={v}" for k, v in params.items()],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items() if v is not False],
        "args_json": [json.dumps(params)],
    }


def build_command(config: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The trial's command line: the configuration's ``command`` with its macros filled in."""
    template = config.get("command", DEFAULT_COMMAND)
    if not isinstance(template, list):
        raise ValueError(f"Invalid command: {template!r} (allowed: a list, e.g. {DEFAULT_COMMAND})")
    template = [str(c) for c in template]
    if not {"${args}", "${args_no_boolean_flags}"} & set(template):
        raise ValueError("Invalid command: it must pass the flags with ${args} or ${args_no_boolean_flags}")
    macros = {"env": [], "interpreter": [sys.executable], **render_args(params)}
    if "program" in config:
        macros["program"] = [config["program"]]
    command: list[str] = []
    for chunk in template:
        chunk = re.sub(r"\$\{envvar:([A-Z0-9_]*)\}", lambda m: os.environ.get(m.group(1), m.group(1)), chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            if chunk[2:-1] not in macros:
                raise ValueError(
                    f"Invalid command macro {chunk!r} (allowed: {', '.join('${' + m + '}' for m in macros)})"
                )
            command += macros[chunk[2:-1]]
        else:
            command.append(chunk)
    return command


def trial_name(index: int, params: dict[str, Any], varying: list[str]) -> str:
    """``003_optimizer-galore_adamw_lr-0.01``: the index and the parameters that vary."""
    parts = [f"{index:03d}"] + [f"{k}-{params[k]}" for k in varying]
    return re.sub(r"[^A-Za-z0-9_.=-]", "", "_".join(parts))[:120]


class SweepRunner:
    """Runs the trials of one sweep under ``root`` and keeps their records in ``root/sweep.json``."""

    def __init__(self, config: dict[str, Any], trials: list[dict[str, Any]], root: Path, wandb: str = "offline"):
        if wandb not in WANDB_MODES:
            raise ValueError(f"Invalid --wandb: {wandb!r} (allowed: {', '.join(WANDB_MODES)})")
        self.config, self.trials, self.root, self.wandb = config, trials, root, wandb
        varying = [k for k in sorted(config["parameters"]) if len({json.dumps(t[k]) for t in trials}) > 1]
        self.names = [trial_name(i, t, varying) for i, t in enumerate(trials)]
        self.records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def command(self, index: int) -> list[str]:
        """Trial ``index``'s command line, writing into its own folder with the runner's wandb mode
        (and resuming an earlier attempt found there)."""
        trial_dir = self.root / self.names[index]
        outputs: dict[str, Any] = {"output-dir": str(trial_dir), "wandb": self.wandb}
        if _attempted(trial_dir):
            outputs["resume"] = True
        return build_command(self.config, {**self.trials[index], **outputs})

    def run(self, parallel: int = 1) -> list[dict[str, Any]]:
        """Run every trial, ``parallel`` at a time; returns the records in trial order."""
        if parallel < 1:
            raise ValueError(f"Invalid --parallel: {parallel!r} (allowed: an int >= 1)")
        self.root.mkdir(parents=True, exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // parallel)
        pool = ThreadPoolExecutor(max_workers=parallel)
        try:
            list(pool.map(lambda i: self._run_trial(i, threads), range(len(self.trials))))
        finally:  # interrupted (Ctrl-C): start no further trial; the running ones save and stop on their own
            pool.shutdown(wait=True, cancel_futures=True)
        return [self.records[n] for n in self.names]

    def _run_trial(self, index: int, threads: int) -> None:
        name, params = self.names[index], self.trials[index]
        trial_dir = self.root / name
        record_path = trial_dir / "trial.json"
        if record_path.exists():
            earlier = json.loads(record_path.read_text())
            if earlier.get("status") == "ok" and earlier.get("params") == params:
                self._record(name, {**earlier, "skipped": True})
                return
        trial_dir.mkdir(parents=True, exist_ok=True)
        command = self.command(index)
        env = {
            **os.environ,
            "WANDB_MODE": "offline" if self.wandb == "offline" else "disabled",
            "WANDB_DIR": str(trial_dir),
            "WANDB_SILENT": "true",
        }
        # N trials at a time share the cores instead of each taking all of them
        env.setdefault("OMP_NUM_THREADS", str(threads))
        start = time.time()
        with open(trial_dir / "train.log", "w") as log:
            returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        record = {
            "name": name,
            "params": params,
            "status": "ok" if returncode == 0 else "failed",
            "returncode": returncode,
            "seconds": round(time.time() - start, 2),
            "command": command,
            "log": str(trial_dir / "train.log"),
        }
        record_path.write_text(json.dumps(record, indent=2))
        self._record(name, record)
        print(f"[sweep] {name}: {record['status']} (rc={returncode}, {record['seconds']} s)", flush=True)

    def _record(self, name: str, record: dict[str, Any]) -> None:
        with self._lock:
            self.records[name] = record
            ordered = [self.records[n] for n in self.names if n in self.records]
            (self.root / "sweep.json").write_text(json.dumps({"trials": ordered}, indent=2))


def _attempted(trial_dir: Path) -> bool:
    """Whether an earlier attempt of the trial (stopped before it finished) left checkpoints or metrics."""
    metrics = trial_dir / "metrics.jsonl"
    return latest(trial_dir) is not None or (metrics.exists() and metrics.stat().st_size > 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.sweep", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("sweep", help="a wandb sweep YAML, e.g. configs/sweeps/tiny.yaml")
    parser.add_argument("--parallel", type=int, default=1, help="trials run at the same time")
    parser.add_argument("--output-root", default=None, help="trials' folder (default: runs/sweeps/<yaml name>)")
    parser.add_argument("--count", type=int, default=None, help="number of trials (overrides run_cap)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the random search's draws")
    parser.add_argument("--wandb", default="offline", choices=WANDB_MODES, help="wandb mode of the trials")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="replace one parameter: KEY=VALUE, or KEY=[V1, V2] for several values (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the trials' commands, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parallel < 1:
        raise ValueError(f"Invalid --parallel: {args.parallel!r} (allowed: an int >= 1)")
    config = override(load_sweep(args.sweep), args.set)
    trials = expand(config, count=args.count, seed=args.sample_seed)
    root = Path(args.output_root or Path("runs/sweeps") / Path(args.sweep).stem)
    runner = SweepRunner(config, trials, root, wandb=args.wandb)
    if args.dry_run:
        for index, name in enumerate(runner.names):
            print(name, " ".join(runner.command(index)))
        return 0
    records = runner.run(parallel=args.parallel)
    from train.report import write_report

    write_report(root, root / "report")
    failed = [r["name"] for r in records if r["status"] != "ok"]
    print(
        f"[sweep] {len(records) - len(failed)}/{len(records)} trials ok; report in {root / 'report'}"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


def exit_status(command: Callable[[list[str] | None], int], argv: list[str] | None, name: str) -> int:
    """A sweep command's exit status: a bad file or flag is one line and 2; Ctrl-C one line and 130
    (the trials done are kept: the same command resumes)."""
    try:
        return command(argv)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {name} interrupted; run the same command again to resume it", file=sys.stderr)
        return 130


def main_exit_status(argv: list[str] | None = None) -> int:
    """``python -m train.sweep`` with :func:`exit_status`."""
    return exit_status(main, argv, "sweep")


if __name__ == "__main__":
    sys.exit(main_exit_status())
