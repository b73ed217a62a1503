"""HTML pieces of ``report.html`` pages: one self-contained page (inline style sheet, no
scripts, no fonts or files to fetch), sections, tables, embedded PNG figures, notes.

    page("lgvq report: x", [section("metrics", "Metrics", table(["a", "b"], rows))])

Kept apart from :mod:`lgvq_plugins.evaluation.report` so the modules that build sections
(the run report, :mod:`~lgvq_plugins.evaluation.task_views`) share them without importing
each other.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lgvq_plugins.evaluation.plots import png_data_uri

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.proto,p.proto{color:#555;font-size:.85em}h3{font-size:1em}.missing{color:#a33;font-style:italic}
img{max-width:100%;image-rendering:pixelated;display:block;margin:.4em 0}
figure{margin:.6em 0}figcaption{font-size:.85em;color:#555}
"""


def e(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number as shown in reports and tables (4 significant digits; ints as ints)."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def protocol_text(protocol: Mapping[str, Any] | None) -> str:
    """``split=test; images=256; ...`` from a protocol dict."""
    if not protocol:
        return ""

    def flat(prefix: str, value: Any) -> list[str]:  # nested protocols (e.g. FID's extractor)
        if isinstance(value, Mapping):
            return [p for k, v in value.items() for p in flat(f"{prefix}.{k}" if prefix else str(k), v)]
        return [] if value is None else [f"{prefix}={value}"]

    return "; ".join(flat("", protocol))


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{e(alt)}" src="{png_data_uri(png)}">'


def section(sid: str, heading: str, body: str) -> str:
    return f'<section id="{e(sid)}">\n<h2>{e(heading)}</h2>\n{body}\n</section>'


def missing(reason: str) -> str:
    return f'<p class="missing">{e(reason)}</p>'


def table(header: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]]) -> str:
    """rows of (css class, already-escaped html) cells."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' for c, v in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def page(title: str, sections: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{e(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n")


def guarded(sid: str, build: Any) -> str:
    """``build()``, or a note saying why the section could not be drawn: a figure that fails
    (an unusual tokenizer, a log without the plotted keys) must not lose a finished run's
    report — the failure is shown in the page and warned about."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - reported in the page and as a warning
        warnings.warn(f"report.html: section {sid!r} could not be drawn: {type(exc).__name__}: {exc}",
                      RuntimeWarning, stacklevel=3)
        return missing(f"could not be drawn: {type(exc).__name__}: {exc}")


__all__ = ["e", "fmt", "guarded", "img_tag", "missing", "page", "protocol_text", "section", "table"]
