"""The argument tables of README.md and docs/*.md state the defaults the code has.

A table is a Markdown table whose header starts ``| argument | default |``. Each row ``| `name` | `default` |
...`` (or ``| `a`, `b` | `1`, `2` | ...`` for two arguments) is compared with ``inspect.signature`` of the class
the table documents: the one named in a ``<!-- arguments: ClassName -->`` comment right above the table, or
else in the nearest heading above it. Every documented argument must exist with that default, and every
argument of the signature must be documented. An argument that takes one of a few names (``mode``,
``lr_scaling``, ...) must list exactly the names the code accepts, each in double quotes.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from pathlib import Path
from typing import Any

import pytest

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale, GradientNoiseScaleMetric
from lightning_gns.batch_schedule import LR_SCALINGS, TARGETS
from lightning_gns.callbacks.gradient_noise_scale import LAYERS, MODES
from lightning_gns.tracker import GradientNoiseScaleTracker

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Longest name first: "GradientNoiseScaleMetric" must not be read as "GradientNoiseScale".
CLASSES: dict[str, Any] = {
    "GradientNoiseScaleTracker": GradientNoiseScaleTracker,
    "GradientNoiseScaleMetric": GradientNoiseScaleMetric,
    "AdaptiveBatchSize": AdaptiveBatchSize,
    "GradientNoiseScale": GradientNoiseScale,
}
# The arguments that take one of a few names, and the names the code accepts.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("GradientNoiseScale", "mode"): MODES,
    ("GradientNoiseScale", "layers"): LAYERS,
    ("AdaptiveBatchSize", "target"): TARGETS,
    ("AdaptiveBatchSize", "lr_scaling"): LR_SCALINGS,
}
HEADER = re.compile(r"^\|\s*argument\s*\|\s*default\s*\|")
MARKER = re.compile(r"<!--\s*arguments:\s*(\w+)\s*-->")


def argument_tables(path: Path) -> list[tuple[str, int, list[tuple[str, str]], dict[str, str]]]:
    """``(class name or "", line, [(argument, default text)], {argument: meaning})`` for every argument table."""
    lines = path.read_text().splitlines()
    tables = []
    for i, line in enumerate(lines):
        if not HEADER.match(line):
            continue
        owner = None
        for above in reversed(lines[:i]):
            marker = MARKER.search(above)
            if marker:
                owner = marker.group(1)
                break
            if above.startswith("#"):
                owner = next((name for name in CLASSES if name in above), None)
                break
        rows: list[tuple[str, str]] = []
        meanings: dict[str, str] = {}
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
            names = re.findall(r"`([^`]+)`", cells[0])
            defaults = re.findall(r"`([^`]+)`", cells[1])
            assert len(names) == len(defaults), f"{path.name}:{i + 1}: row {row!r} pairs names and defaults unevenly"
            rows.extend(zip(names, defaults, strict=True))
            meanings.update(dict.fromkeys(names, " | ".join(cells[2:])))
        tables.append((owner or "", i + 1, rows, meanings))
    return tables


def parse_default(text: str) -> Any:
    if text in ("math.inf", "inf"):
        return math.inf
    return ast.literal_eval(text)


TABLES = [(path, *table) for path in DOCUMENTS for table in argument_tables(path)]


def test_the_documented_classes_have_tables() -> None:
    documented = {owner for _, owner, _, _, _ in TABLES}
    assert {"AdaptiveBatchSize", "GradientNoiseScale"} <= documented


@pytest.mark.parametrize(
    ("path", "owner", "line", "rows", "meanings"), TABLES, ids=[f"{p.name}:{n}" for p, _, n, _, _ in TABLES]
)
def test_table_defaults_match_the_signature(
    path: Path, owner: str, line: int, rows: list[tuple[str, str]], meanings: dict[str, str]
) -> None:
    where = f"{path.relative_to(ROOT)}:{line} ({owner})"
    assert owner in CLASSES, (
        f"{where}: an argument table without a class: put `<!-- arguments: ClassName -->` above it or name one"
        f" of {sorted(CLASSES)} in the heading above it"
    )
    parameters = {
        name: p
        for name, p in inspect.signature(CLASSES[owner]).parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    documented = dict(rows)
    assert len(documented) == len(rows), f"{where}: an argument is documented twice"
    for name, text in rows:
        assert name in parameters, f"{where}: documents {name!r}, which {owner} does not take"
        expected = parameters[name].default
        assert expected is not inspect.Parameter.empty, f"{where}: {name!r} has no default in the code"
        stated = parse_default(text)
        assert stated == expected and type(stated) in (type(expected), int, float), (
            f"{where}: {name!r} is documented with default {text}, the code has {expected!r}"
        )
    missing = sorted(set(parameters) - set(documented))
    assert not missing, f"{where}: {owner} arguments missing from the table: {missing}"
    for name in documented:
        if (owner, name) in CHOICES:
            named = quoted_names(meanings[name])
            assert named == set(CHOICES[owner, name]), (
                f"{where}: {name!r} is documented with the choices {sorted(named)}, the code takes"
                f" {sorted(CHOICES[owner, name])}"
            )


def quoted_names(text: str) -> set[str]:
    """The names a table cell gives in double quotes (``"sqrt"``; not ``target="sqrt"``)."""
    return set(re.findall(r'(?<![=\w])"(\w+)"', text))


def adaptive_table(path: Path, rows: str) -> tuple[str, int, list[tuple[str, str]], dict[str, str]]:
    """The one table of a page holding ``rows`` under an AdaptiveBatchSize heading, as the parser reads it."""
    path.write_text("## AdaptiveBatchSize arguments\n\n| argument | default | meaning |\n|---|---|---|\n" + rows)
    [table] = argument_tables(path)
    return table


def test_a_wrong_default_is_caught(tmp_path: Path) -> None:
    """The parser reads what a wrong table says (so the comparison above can fail)."""
    rows_text = "| `calibration` | `0.75` | x |\n| `min_accumulation`, `max_accumulation` | `1`, `64` | bounds |\n"
    owner, _, rows, _ = adaptive_table(tmp_path / "page.md", rows_text)
    assert owner == "AdaptiveBatchSize"
    assert rows == [("calibration", "0.75"), ("min_accumulation", "1"), ("max_accumulation", "64")]
    assert parse_default("0.75") != inspect.signature(AdaptiveBatchSize).parameters["calibration"].default


def test_a_missing_choice_is_caught(tmp_path: Path) -> None:
    """A table row that leaves out a learning-rate rule reads as fewer choices than the code takes."""
    row = '| `lr_scaling` | `"sqrt"` | `"none"`, `"linear"` (SGD) or `"sqrt"`; `target="sqrt"` aside |\n'
    *_, meanings = adaptive_table(tmp_path / "page.md", row)
    assert quoted_names(meanings["lr_scaling"]) == {"none", "linear", "sqrt"} != set(LR_SCALINGS)
