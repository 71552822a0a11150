"""The one way every benchmark prints its figures: a Markdown table."""

from __future__ import annotations

Row = tuple[str, str, str]


def print_table(rows: list[Row], title: str | None = None) -> None:
    if title:
        print(f"\n### {title}")
    print("\n| measure | figure | ratio |\n|---|---|---|")
    for measure, figure, ratio in rows:
        print(f"| {measure} | {figure} | {ratio} |")
