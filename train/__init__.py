"""The reference pretraining loop: ``python -m train --model-config configs/llama_60m.json ...``.

After training, ``python -m train export ...`` writes a Hugging Face folder
(:mod:`train.export`) and ``python -m train eval ...`` reports a model's validation loss
(:mod:`train.evaluate`).

:func:`main` runs the command line in-process (tests use it); :func:`train.loop.train` takes a
:class:`train.config.TrainConfig`.
"""

from __future__ import annotations

import sys
from typing import Any

#: ``python -m train <command> ...``: the module whose ``main(argv)`` runs it
COMMANDS = {"export": "train.export", "eval": "train.evaluate"}


class RunStopped(RuntimeError):
    """The run stopped for a reason stated in one line (a non-finite loss, a failed checkpoint
    write); what was saved before is intact. ``python -m train`` prints it and exits 1."""


def main(argv: list[str] | None = None) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) and train; returns rank 0's metrics records.
    A first word of :data:`COMMANDS` runs that command instead, returning what it returns."""
    import importlib

    from train.config import parse_args
    from train.loop import train

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
    return train(parse_args(argv))
