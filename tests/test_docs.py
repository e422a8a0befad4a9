"""README.md and docs/ checked against the code, so that they cannot rot silently.

- every ``--flag`` exists in the command line it is given to (``python -m train``, ``lowmem-optim
  memory|fit|traffic``, ``python -m train.sweep|tune|report|quickstart``, a script under ``scripts/``); a flag
  named outside a command must exist in at least one of the project's command lines;
- every ``scripts/...``, ``configs/...``, ``tests/...``, ``docs/...``, ``lowmem_optim/...`` and
  ``train/...`` path exists (``{a,b}`` alternatives expanded), and every relative link and its
  ``#anchor`` resolves;
- every ```` ```python ```` block compiles, and blocks whose info string is ``python run`` run
  on CPU (keep them tiny);
- a page's blocks marked ``session`` (```` ```bash session ````, ```` ```python session ````) run
  in order in one fresh folder (``configs/`` at hand), in this process: each ``python -m train``
  command line of a bash block through :func:`train.main`, each python block as a script;
- the hyperparameter lists of docs/optimizers.md are what ``scripts/docs_hparams.py`` writes from the
  declarations;
- the README's optimizer table lists every registry name, and its "state bytes / param" column
  matches the bytes each optimizer really holds for one 512 x 512 float32 weight at rank 128.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
PATH = re.compile(r"(?<![\w./-])((?:scripts|configs|tests|docs|lowmem_optim|train)/[\w.{},/*<>-]*[\w}*>])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
#: a command's first word (after environment assignments) that takes flags this test does not check
FOREIGN = re.compile(r"^(?:\w+=\S*\s+)*(?:pip|pytest|wandb|git|nvidia-smi|torchrun|python3? -m pytest)\b")


def _help_flags(run, argv: list[str]) -> frozenset[str]:
    """The option strings a command line's ``--help`` lists (it exits: SystemExit is caught)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        run(argv)
    return frozenset(FLAG.findall(out.getvalue()))


@cache
def cli_flags(cli: str) -> frozenset[str]:
    """Flags of one of the project's command lines, from its own parser."""
    if cli == "train":
        from train.config import build_parser

        return _help_flags(build_parser().parse_args, ["--help"])
    if cli in ("memory", "fit", "traffic"):
        from lowmem_optim.tools.cli import main

        return _help_flags(main, [cli, "--help"])
    if cli == "quickstart":  # unknown flags go on to every training run
        from train.quickstart import main

        return _help_flags(main, ["--help"]) | cli_flags("train")
    if cli in ("sweep", "tune", "report"):
        module = __import__(f"train.{cli}", fromlist=["main"])
        return _help_flags(module.main, ["--help"])
    if cli in ("export", "eval"):
        from train import main

        return _help_flags(main, [cli, "--help"])
    return script_flags(cli)


@cache
def script_flags(path: str) -> frozenset[str]:
    """Flags of a script under scripts/: the string literals its argparse declares (and the training
    CLI's where it extends that parser), or, for a shell script, those of the command line it
    hands its arguments to."""
    source = (REPO / path).read_text()
    if path.endswith(".py"):
        own = frozenset(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", source))
        return own | cli_flags("train") if "parser = build_parser()" in source else own
    own = frozenset(re.findall(r"=\s*\"(--[a-z][\w-]*)\"", source))  # [ "$1" = "--dry-run" ]
    if "-m train.quickstart" in source:
        return own | cli_flags("quickstart")
    if re.search(r"-m train\b(?!\.)", source) or "pretrain_common.sh" in source:
        return own | cli_flags("train")
    return own


def all_flags() -> frozenset[str]:
    scripts = [str(p.relative_to(REPO)) for p in (REPO / "scripts").rglob("*.py")]
    clis = ("train", "export", "eval", "memory", "fit", "traffic", "quickstart", "sweep", "tune", "report", *scripts)
    return frozenset().union(*(cli_flags(c) for c in clis))


#: (pattern of a command, the command line its flags belong to: a name of cli_flags or the matched script)
COMMANDS = [
    (re.compile(r"-m train\.(sweep|tune|report|quickstart)\b"), lambda m: m.group(1)),
    (re.compile(r"-m train (export|eval)\b"), lambda m: m.group(1)),
    (re.compile(r"-m train(?![.\w])(?! (?:export|eval)\b)"), lambda m: "train"),
    (re.compile(r"(?:lowmem-optim|lowmem_optim\.cli) (memory|fit|traffic)\b"), lambda m: m.group(1)),
    (re.compile(r"\b(scripts/[\w/.-]+\.(?:py|sh))\b"), lambda m: m.group(1)),
    (re.compile(r"-m scripts\.bench\.(\w+)"), lambda m: f"scripts/bench/{m.group(1)}.py"),
]


def segments(text: str) -> list[str]:
    """Command-like pieces of a page: logical lines of its shell blocks (continuations joined,
    comments apart) and its inline code spans."""
    pieces = []
    for info, body in FENCE.findall(text):
        if info.split()[:1] in (["bash"], ["sh"], ["console"], []):
            for line in body.replace("\\\n", " ").splitlines():
                pieces += re.split(r"\s#\s|^#\s|;|&&|\|\|", line)
    pieces += re.findall(r"`([^`\n]+)`", FENCE.sub("", text))
    return [p.strip() for p in pieces if p.strip()]


def flag_problems(piece: str) -> list[str]:
    matches = [(m.start(), m.end(), cli(m)) for pattern, cli in COMMANDS for m in pattern.finditer(piece)]
    if not matches:
        if FOREIGN.match(piece):
            return []
        return [
            f"{flag} (in `{piece}`) is no flag of any command line"
            for flag in FLAG.findall(piece)
            if flag not in all_flags()
        ]
    start, end, cli = min(matches)
    allowed = cli_flags(cli)
    return [
        f"{flag} is not a flag of {cli} (in `{piece}`)" for flag in FLAG.findall(piece[end:]) if flag not in allowed
    ]


def _expand(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for alt in match.group(1).split(",") for p in _expand(path[: match.start()] + alt + path[match.end() :])]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_flag_exists_in_the_command_line_it_is_given_to(page: Path):
    problems = [p for piece in segments(page.read_text()) for p in flag_problems(piece)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_named_path_exists(page: Path):
    named = {p for m in PATH.findall(page.read_text()) if not re.search(r"[*<>]|XXXX", m) for p in _expand(m)}
    missing = sorted(p for p in named if not (REPO / p.rstrip("/.")).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path):
    problems = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with that anchor in {resolved.name}")
    assert not problems, f"{page.name}: {problems}"


def python_blocks() -> list[tuple[str, str, str]]:
    blocks = []
    for page in DOCS:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1).split()[:1] == ["python"]:
                line = text.count("\n", 0, m.start()) + 2
                blocks.append((f"{page.name}:{line}", m.group(1).strip(), m.group(2)))
    return blocks


@pytest.mark.parametrize("where, info, body", python_blocks(), ids=[b[0] for b in python_blocks()])
def test_every_python_block_compiles(where: str, info: str, body: str):
    compile(body, where, "exec")


RUNNABLE = [b for b in python_blocks() if b[1].split()[1:2] == ["run"]]


def test_some_block_is_marked_runnable():
    assert RUNNABLE, "no ```python run block in README.md or docs/"


@pytest.mark.parametrize("where, info, body", RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_runnable_python_blocks_run_on_cpu(where: str, info: str, body: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", body], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"


def session_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, body) of the page's blocks marked ``session``, in order."""
    found = FENCE.findall(page.read_text())
    return [(info.split()[0], body) for info, body in found if info.split()[1:2] == ["session"]]


SESSION_PAGES = [page for page in DOCS if session_blocks(page)]


@pytest.mark.parametrize("page", SESSION_PAGES, ids=lambda p: p.name)
def test_session_blocks_run_in_order_in_one_folder(page: Path, tmp_path, monkeypatch):
    from train import main

    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for language, body in session_blocks(page):
            if language == "python":
                exec(compile(body, f"{page.name} session", "exec"), {"__name__": "__main__"})
                continue
            for line in body.replace("\\\n", " ").splitlines():
                command = line.split(" #")[0].strip()
                if not command:
                    continue
                assert command.startswith("python -m train "), f"{page.name}: not a python -m train command: {line}"
                main(shlex.split(command)[3:])
    finally:
        torch.set_num_threads(threads)


def test_the_training_page_has_its_after_training_session():
    # export, load in transformers, evaluate, continue
    assert [language for language, _ in session_blocks(REPO / "docs" / "training.md")] == [
        "bash",
        "python",
        "bash",
        "bash",
    ]


def readme_optimizer_table() -> dict[str, float]:
    """Registry name -> the README's "state bytes / param" of that row."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("|")]
    header = next(i for i, line in enumerate(lines) if "state bytes / param" in line)
    column = [c.strip() for c in lines[header].split("|")].index("state bytes / param")
    rows = {}
    for line in lines[header + 2 :]:
        cells = [c.strip() for c in line.split("|")]
        name = re.match(r"`(\w+)`", cells[1])
        if not name:
            break
        rows[name.group(1)] = float(cells[column])
    return rows


def test_readme_optimizer_table_lists_every_registry_name():
    from lowmem_optim import available_optimizers

    assert sorted(readme_optimizer_table()) == available_optimizers()
    optimizers_page = (REPO / "docs" / "optimizers.md").read_text()
    assert [n for n in available_optimizers() if f"`{n}`" not in optimizers_page] == []


def test_readme_state_bytes_per_parameter_match_the_optimizers():
    from lowmem_optim import build_optimizer
    from lowmem_optim.registry import LOWRANK_OPTIMIZERS, lowrank_defaults

    measured = {}
    for name in readme_optimizer_table():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False))
        rank = {"rank": 128} if name in LOWRANK_OPTIMIZERS and "rank" not in lowrank_defaults(name) else {}
        optimizer = build_optimizer(name, model, **rank)
        weight = model[0].weight
        weight.grad = torch.randn_like(weight)
        optimizer.step()
        state = optimizer.state[weight]
        measured[name] = round(
            sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v)) / weight.numel(), 2
        )
    assert measured == readme_optimizer_table()


def memory_examples() -> list[tuple[str, list[str], str]]:
    """(where, argv, printed table) for each ``lowmem-optim memory`` command block followed by a ```text block."""
    examples = []
    for page in DOCS:
        found = list(FENCE.finditer(page.read_text()))
        for block, output in zip(found, found[1:]):
            command = block.group(2).replace("\\\n", " ")
            if output.group(1).strip() == "text" and "lowmem-optim memory" in command:
                line = next(text for text in command.splitlines() if "lowmem-optim memory" in text)
                argv = shlex.split(line.split("lowmem-optim memory", 1)[1].split(" #")[0])
                examples.append((page.name, argv, output.group(2)))
    return examples


def test_memory_examples_print_what_the_docs_show():
    from lowmem_optim.tools.cli import main

    examples = memory_examples()
    assert examples, "docs/memory.md shows no `lowmem-optim memory` output"
    for where, argv, shown in examples:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["memory", *argv]) == 0
        assert out.getvalue().strip() == shown.strip(), f"{where}: `lowmem-optim memory {shlex.join(argv)}`"
        total = int(re.search(r"^total\s+([\d,]+) B", shown, re.M).group(1).replace(",", ""))
        assert f"{total / 2**30:.2f} GiB" in (REPO / "README.md").read_text(), "README's 7B prediction differs"


def test_optimizer_hyperparameter_lists_match_the_declarations():
    spec = importlib.util.spec_from_file_location("docs_hparams", REPO / "scripts" / "docs_hparams.py")
    docs_hparams = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs_hparams)
    text = docs_hparams.PAGE.read_text()
    assert docs_hparams.render(text) == text, "docs/optimizers.md is out of date: run python scripts/docs_hparams.py"
