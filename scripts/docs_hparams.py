"""Write each named optimizer's hyperparameter list into docs/optimizers.md, from the declarations.

    python scripts/docs_hparams.py           # rewrite the lists in docs/optimizers.md
    python scripts/docs_hparams.py --check   # exit 1 if a list differs from the code (tests/test_docs.py checks it)

Each list is :func:`lowmem_optim.engine.hparams_doc` of a class (every key with that class's
default and one-line doc, then the keys of the parts a group may name instead), written between
``<!-- hparams CLASS -->`` and ``<!-- /hparams -->`` markers, folded in a ``<details>`` block.
A marker pair with an empty body is filled; every registered class of the package must have one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAGE = REPO / "docs" / "optimizers.md"
BLOCK = re.compile(r"<!-- hparams (\w+) -->\n.*?<!-- /hparams -->", re.S)


def composed_classes() -> dict[str, type]:
    """Class name -> class, for every registry entry that is one of this package's optimizers."""
    from lowmem_optim.engine import ComposedOptimizer
    from lowmem_optim.registry import available_optimizers, get_optimizer_class

    classes = (get_optimizer_class(name) for name in available_optimizers())
    return {cls.__name__: cls for cls in classes if issubclass(cls, ComposedOptimizer)}


def block(name: str, cls: type) -> str:
    from lowmem_optim.engine import hparams_doc

    lines = hparams_doc(cls).replace("``", "`").splitlines()[2:]  # the heading is said once on the page
    return (
        f"<!-- hparams {name} -->\n<details><summary>Hyperparameters of <code>{name}</code> and their defaults"
        f"</summary>\n\n" + "\n".join(lines) + "\n\n</details>\n<!-- /hparams -->"
    )


def render(text: str) -> str:
    """``text`` with every marked list rewritten from the code (ValueError for a missing or unknown class)."""
    classes = composed_classes()
    named = BLOCK.findall(text)
    missing, unknown = sorted(set(classes) - set(named)), sorted(set(named) - set(classes))
    if missing or unknown:
        raise ValueError(
            f"Invalid hyperparameter markers in {PAGE.name}: missing for {missing}, unknown {unknown} "
            f"(allowed: one <!-- hparams CLASS --><!-- /hparams --> pair per class of {sorted(classes)})"
        )
    return BLOCK.sub(lambda m: block(m.group(1), classes[m.group(1)]), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    text = PAGE.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{PAGE} is out of date: run python scripts/docs_hparams.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
