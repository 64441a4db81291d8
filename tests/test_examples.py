"""README's "Your data" commands, run exactly as written in an empty directory (real
imports, real assembly, real mpiexec training on the examples/ files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_bash_block

ROOT = Path(__file__).resolve().parent.parent
SECTION = ("### Your data", "**Private alignment of vertical ids**")


def readme_blocks() -> list[str]:
    """The bash blocks of README's "Your data" subsection."""
    text = ROOT.joinpath("README.md").read_text()
    start = text.index(SECTION[0])
    section = text[start : text.index(SECTION[1], start)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def test_the_section_has_the_three_examples() -> None:
    blocks = readme_blocks()
    assert [re.search(r"train (\S+)", block).group(1) for block in blocks] == [
        "examples/hospitals/config.yaml",
        "examples/vertical/config.yaml",
        "examples/images/config.yaml",
    ]


@pytest.mark.parametrize(
    "index,minimum", [(0, 0.85), (1, 0.85), (2, 0.6)], ids=["hospitals", "vertical", "images"]
)
def test_readme_example_runs_as_written(index: int, minimum: float, tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    done = run_bash_block(readme_blocks()[index], tmp_path, timeout_s=400)
    (summary,) = tmp_path.glob("runs/*/summary.json")
    assert json.loads(summary.read_text())["test_accuracy"] >= minimum
    if index == 1:  # aligned privately: the server reports the common ids it never saw
        assert re.search(r"vertical train: \d+ ids common to all parties", done.stderr)
