"""One number per LLaMA-7B memory figure: docs/llama7b_memory.md is what scripts/docs_llama7b_table.py
writes now, and every 7B figure the README and docs/ quote is one of its figures."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FIGURE = re.compile(r"(?<![\d.])(\d+\.\d\d) GiB")
SEVEN_B = re.compile(r"7B|llama_?7b")


def _table_module():
    spec = importlib.util.spec_from_file_location("docs_llama7b_table", REPO / "scripts" / "docs_llama7b_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quoted_7b_figures(text: str) -> list[str]:
    """GiB figures (two decimals) of the tables and sentences that speak of LLaMA-7B; fenced
    blocks (a command's printed output, checked by tests/test_docs.py) are left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    figures = []
    for paragraph in re.split(r"\n\s*\n", prose):
        table = paragraph.lstrip().startswith("|")
        for part in [paragraph] if table else re.split(r"(?<=[.;])\s+", paragraph):
            if SEVEN_B.search(part):
                figures += FIGURE.findall(part)
    return figures


def test_the_7b_table_is_what_the_generator_writes_from_the_recorded_traces():
    table = _table_module()
    assert table.PAGE.read_text() == table.page(table.load_rows())
    assert {row["card"] for row in table.load_rows()} == {12, 16, 24}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "llama7b_memory.md"], ids=lambda p: p.name)
def test_every_7b_memory_figure_a_page_quotes_is_in_the_table(page: Path):
    held = _table_module().figures(_table_module().load_rows())
    missing = [f for f in quoted_7b_figures(page.read_text()) if f not in held]
    assert not missing, f"{page.name} quotes 7B figures the table lacks: {missing} (table: {sorted(held)})"


def test_a_stale_figure_is_caught():
    # the one-micro-batch prediction docs/gpu.md once gave for the 16 GB recipe
    held = _table_module().figures(_table_module().load_rows())
    stale = "| LLaMA-7B peak, `scripts/pretrain_llama7b.sh` recipe, batch 16 x 256 | 13.01 GiB (memory model) |"
    assert quoted_7b_figures(stale) == ["13.01"] and "13.01" not in held


def test_the_fit_margin_is_the_model_s_largest_error_against_the_traced_recipes():
    """``lowmem-optim fit`` keeps predictions ``MODEL_MARGIN`` below a card's budget: the model's
    largest error against the traced 7B rows, to 0.1% (the table's precision), as it is now."""
    from lowmem_optim.tools.memory_fit import MODEL_MARGIN

    table = _table_module()
    errors = [table.predicted_bytes(row) / row["traced_bytes"] - 1 for row in table.load_rows()]
    assert MODEL_MARGIN == round(max(abs(e) for e in errors), 3)
