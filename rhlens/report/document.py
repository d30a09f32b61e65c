"""The report's document model: sections of text, tables and images, rendered as one
self-contained HTML file (figures inline) or as Markdown with its figures beside it."""

from __future__ import annotations

import base64
import html
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from rhlens.results import atomic_write, atomic_write_text

__all__ = ["Block", "Image", "Report", "Section", "Table", "Text"]


# ---------------------------------------------------------------------------------------
# The document model: sections of text, tables and images, rendered twice
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Text:
    """A paragraph; ``note`` paragraphs say what is missing or why a section is short."""

    text: str
    kind: Literal["p", "note"] = "p"


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells, so both renderings show the same digits."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """A figure as PNG bytes (rendered once, embedded in HTML, written next to Markdown)."""

    png: bytes
    name: str
    caption: str = ""


Block = Text | Table | Image


@dataclass
class Section:
    """A titled part of the report; ``children`` become sub-headings."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def add(self, block: Block) -> Section:
        self.blocks.append(block)
        return self

    def walk(self, depth: int = 0) -> Iterator[tuple[Section, int]]:
        yield self, depth
        for child in self.children:
            yield from child.walk(depth + 1)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


@dataclass
class Report:
    """The report: a title, what went in, and sections. Write it with :meth:`to_html` and
    :meth:`to_markdown`; in a notebook it displays itself (without the page's CSS)."""

    title: str
    sections: list[Section]
    sources: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    # ---- queries -------------------------------------------------------------------------
    def walk(self) -> Iterator[tuple[Section, int, str]]:
        """Every section depth-first, with its depth (0 = top) and a unique anchor."""
        seen: Counter[str] = Counter()
        for top in self.sections:
            for sec, depth in top.walk():
                slug = _slug(sec.title)
                seen[slug] += 1
                yield sec, depth, slug if seen[slug] == 1 else f"{slug}-{seen[slug]}"

    def titles(self) -> list[str]:
        return [sec.title for sec, _, _ in self.walk()]

    def images(self) -> list[Image]:
        return [b for sec, _, _ in self.walk() for b in sec.blocks if isinstance(b, Image)]

    def tables(self) -> list[Table]:
        return [b for sec, _, _ in self.walk() for b in sec.blocks if isinstance(b, Table)]

    # ---- HTML ----------------------------------------------------------------------------
    def _html_body(self) -> str:
        out: list[str] = []
        for sec, depth, anchor in self.walk():
            level = min(depth + 2, 6)
            out.append(f'<h{level} id="{anchor}">{html.escape(sec.title)}</h{level}>')
            out.extend(_html_block(b) for b in sec.blocks)
        return "\n".join(out)

    def _html_toc(self) -> str:
        items = [f'<li class="d{depth}"><a href="#{anchor}">{html.escape(sec.title)}</a></li>'
                 for sec, depth, anchor in self.walk() if depth <= 1]
        return '<nav><ul>\n' + "\n".join(items) + "\n</ul></nav>"

    def to_html(self, path: str | Path) -> Path:
        """Write one self-contained HTML file (figures inline as base64 PNG, no links out)."""
        from rhlens import __version__

        path = Path(path)
        sources = "".join(f"<li><code>{html.escape(s)}</code></li>" for s in self.sources)
        doc = "\n".join([
            "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(self.title)}</title>", f"<style>{_CSS}</style>", "</head>",
            "<body>", f"<h1>{html.escape(self.title)}</h1>",
            f'<p class="meta">Written {html.escape(self.created)} by rhlens {__version__}.</p>',
            f"<details><summary>Inputs</summary><ul>{sources}</ul></details>" if sources else "",
            self._html_toc(), self._html_body(), "</body>", "</html>", "",
        ])
        atomic_write_text(path, doc)
        return path

    def _repr_html_(self) -> str:
        return f"<h1>{html.escape(self.title)}</h1>\n{self._html_body()}"

    # ---- Markdown ------------------------------------------------------------------------
    def to_markdown(self, path: str | Path) -> Path:
        """Write the Markdown twin; its figures go to ``<stem>_files/`` next to it.

        PNGs left in that folder by an earlier report are removed first, so the folder
        always matches the file.
        """
        path = Path(path)
        folder = path.parent / f"{path.stem}_files"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        names: dict[int, str] = {}
        for i, image in enumerate(self.images(), start=1):
            fname = f"{i:02d}-{_slug(image.name)}.png"
            atomic_write(folder / fname, lambda tmp, png=image.png: Path(tmp).write_bytes(png))
            names[id(image)] = f"{quote(folder.name)}/{fname}"

        lines = [f"# {_md(self.title)}", "", f"_Written {self.created} by rhlens._", ""]
        if self.sources:
            lines += ["Inputs:", ""] + [f"- `{s}`" for s in self.sources] + [""]
        lines += [f"{'  ' * depth}- [{_md(sec.title)}](#{anchor})"
                  for sec, depth, anchor in self.walk() if depth <= 1]
        lines.append("")
        for sec, depth, anchor in self.walk():
            lines += [f'<a id="{anchor}"></a>', "", f"{'#' * min(depth + 2, 6)} {_md(sec.title)}", ""]
            for block in sec.blocks:
                lines += _md_block(block, names)
        atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
        return path


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 max-width:1150px;margin:2em auto;padding:0 1.2em;color:#1f2328;line-height:1.45}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3em}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:2.2em}
h3{margin-top:1.6em} h4{margin-top:1.2em;color:#444}
p.meta{color:#666;font-size:.9em} p.note{color:#666;font-style:italic}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
caption{caption-side:top;text-align:left;font-weight:600;padding:.2em 0}
th,td{border:1px solid #d0d7de;padding:.25em .6em;vertical-align:top;text-align:left}
th{background:#f6f8fa} tr:nth-child(even) td{background:#fbfbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.long{max-width:26em}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em}
nav ul{list-style:none;padding-left:0;columns:2} nav li.d1{padding-left:1.4em;font-size:.92em}
code{background:#f6f8fa;padding:0 .25em;border-radius:3px}
"""

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*(\.\d+)?|\.\d+)(e[-+]?\d+)?( ?%| ± [\d.]+)?$|^n/a$")


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        cls = ' class="note"' if block.kind == "note" else ""
        return f"<p{cls}>{html.escape(block.text)}</p>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        alt = html.escape(block.name)
        cap = f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
    rows = []
    for row in block.rows:
        cells = []
        for cell in row:
            cls = "num" if _NUMBER.match(cell) else ("long" if len(cell) > 60 else "")
            attr = f' class="{cls}"' if cls else ""
            cells.append(f"<td{attr}>{html.escape(cell)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _md(text: str) -> str:
    """Text safe inside Markdown (and its tables): no HTML, emphasis or cell breaks."""
    text = html.escape(text, quote=False)
    text = re.sub(r"([\\`*_|\[\]])", r"\\\1", text)
    return text.replace("\r", "").replace("\n", "<br>")


def _md_block(block: Block, names: dict[int, str]) -> list[str]:
    if isinstance(block, Text):
        return [f"_{_md(block.text)}_" if block.kind == "note" else _md(block.text), ""]
    if isinstance(block, Image):
        lines = [f"![{_md(block.name)}]({names[id(block)]})", ""]
        return lines + ([f"_{_md(block.caption)}_", ""] if block.caption else [])
    lines = [f"**{_md(block.caption)}**", ""] if block.caption else []
    lines.append("| " + " | ".join(_md(h) or " " for h in block.header) + " |")
    lines.append("| " + " | ".join("---:" if _numeric_column(block, i) else "---"
                                   for i in range(len(block.header))) + " |")
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in block.rows]
    return [*lines, ""]


def _numeric_column(table: Table, i: int) -> bool:
    cells = [row[i] for row in table.rows if i < len(row) and row[i]]
    return bool(cells) and all(_NUMBER.match(c) for c in cells)
