"""Formatting shared by the report's sections: numbers, head names, clipped text, figures."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from rhlens.report.document import Image

__all__ = ["clip", "head_list", "head_name", "image", "num", "setting"]


def num(x: float | int | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; ``n/a`` for a missing or non-finite value."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}"


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def head_list(heads: Sequence[tuple[int, int]], limit: int = 25) -> str:
    """``L1H2, L3H0, ...``, at most ``limit`` of them."""
    shown = ", ".join(head_name(la, h) for la, h in heads[:limit])
    return shown + (f", ... ({len(heads) - limit} more)" if len(heads) > limit else "")


def clip(text: Any, n: int = 200) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def image(fig: Figure, name: str, caption: str, dpi: int) -> Image:
    """A figure rendered once as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return Image(png=buf.getvalue(), name=name, caption=caption)


def setting(config: Any, name: str, default: Any = None) -> Any:
    """One setting of a result's config, whether it is a Config object or an older dict."""
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)
