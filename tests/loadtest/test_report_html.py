from __future__ import annotations

import math
import re

from loadtest.report_html import HEIGHT, PAD_B, PAD_L, PAD_R, PAD_T, WIDTH, _cdf, line_chart


def _coords(svg: str) -> list[tuple[float, float]]:
    return [
        (float(x), float(y))
        for points in re.findall(r'points="([^"]*)"', svg)
        for x, y in (pair.split(",") for pair in points.split())
    ]


def test_every_plotted_point_lies_inside_the_plot_area() -> None:
    series = [("a", "#000", [(1523.4, 2.0), (3000.0, 50.0), (5190.2, 97.0)])]
    coords = _coords(line_chart("t", series, "x", "y"))
    assert len(coords) == 3
    for x, y in coords:
        assert PAD_L - 0.05 <= x <= WIDTH - PAD_R + 0.05
        assert PAD_T - 0.05 <= y <= HEIGHT - PAD_B + 0.05


def test_nan_values_split_a_line_into_segments() -> None:
    series = [("a", "#000", [(0.0, 1.0), (1.0, 2.0), (2.0, math.nan), (3.0, 1.0), (4.0, 3.0)])]
    assert line_chart("t", series, "x", "y").count("<polyline") == 2


def test_cdf_counts_failures_in_the_denominator() -> None:
    points = _cdf([10.0, 20.0, 30.0, math.inf])
    assert points[-1] == (30.0, 75.0)


def test_chart_without_data_says_so() -> None:
    assert "no data" in line_chart("t", [("a", "#000", [])], "x", "y")
