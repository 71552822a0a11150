"""The one way every benchmark prints its figures: a Markdown table."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from offload.lab.lab import Lab

Row = tuple[str, str, str]


def run_alone(lab_name: str, services: list[str], rows: Callable[[Lab, Path], list[Row]]) -> None:
    """A section's benchmark on its own: its lab up, a work directory, the rows printed, everything removed."""
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (network namespaces)")
    lab = Lab(lab_name)
    lab.down()
    try:
        lab.up(only=services)
        with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
            os.chmod(tmp, 0o755)
            table = rows(lab, Path(tmp))
    finally:
        lab.down()
    print_table(table)


def print_table(rows: list[Row], title: str | None = None) -> None:
    if title:
        print(f"\n### {title}")
    print("\n| measure | figure | ratio |\n|---|---|---|")
    for measure, figure, ratio in rows:
        print(f"| {measure} | {figure} | {ratio} |")
