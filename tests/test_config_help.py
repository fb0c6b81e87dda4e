"""Config help strings say what an option does; benchmark figures and machines belong in bench/results."""

from __future__ import annotations

import re

import pytest

from embedforge import stages
from embedforge.recipe import describe_config

#: A measured figure in prose: a percentage, a speed-up ("1.5x faster"), a CPU model, or a result file.
FIGURE = re.compile(r"\d+(\.\d+)?\s*%|\d+(\.\d+)?x (faster|slower)|\b(EPYC|Xeon|Ryzen|Core i\d)\b|bench/results",
                    re.IGNORECASE)


@pytest.mark.parametrize("stage", sorted(stages.STAGES))
def test_help_strings_quote_no_benchmark_figures(stage: str) -> None:
    for row in describe_config(stages.config_class(stage)):
        found = FIGURE.search(row["help"])
        assert found is None, f"{stage}.{row['key']}: help quotes {found.group(0)!r}; say what the option does"
