"""The reference pretraining loop: ``python -m train --model-config configs/llama_60m.json ...``.

:func:`main` runs the command line in-process (tests use it); :func:`train.loop.train` takes a
:class:`train.config.TrainConfig`.
"""

from __future__ import annotations

from typing import Any


class RunStopped(RuntimeError):
    """The run stopped for a reason stated in one line (a non-finite loss, a failed checkpoint
    write); what was saved before is intact. ``python -m train`` prints it and exits 1."""


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse ``argv`` (default ``sys.argv[1:]``) and train; returns rank 0's metrics records."""
    from train.config import parse_args
    from train.loop import train

    return train(parse_args(argv))
