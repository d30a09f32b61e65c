"""One report of everything some run directories hold: a self-contained HTML file and its Markdown twin.

Why a report: each rhlens command leaves JSON, safetensors and a few PNGs in its run
directory, which is what a program wants and not what a reader wants. :func:`build_report`
gathers whatever those directories contain (detection, NIAH under masks, the masking K
curve, head patching, chain-of-thought answers) plus the paper's released score files, and
turns it into numbers in tables and figures, so that one file answers "which heads, how sure,
and what breaks without them". The HTML embeds its figures (base64 PNG) so it can be mailed
or attached to an issue as one file; the Markdown twin (figures in ``<name>_files/``) diffs
well and renders on GitHub.

What is read from a run directory (every part optional, a section per part found):

========================================  ==========================================
file                                      section
========================================  ==========================================
``scores/`` (or ``meta.json``), or        Detection: summary, top heads, score map,
``head_scores.json``; ``summary.json``    score distribution, NIAH map, sparse,
                                          dynamic, stability
``mask_sweep.json`` + ``niah_result.json``  Masking sweep: K curve, answer classes,
                                          hallucinations side by side
``niah_result.json`` alone                NIAH under masks
``patching/`` (a ``HeadPatchingResult``)  Head patching, and effect vs retrieval
``patching_vs_retrieval.json``            score (computed here when only the two
                                          results are present)
``*.jsonl`` / ``cot/*.jsonl`` records     Chain of thought: accuracy per task, mode
with ``task``, ``mode``, ``correct``      (``cot`` / ``direct``) and ``mask``
========================================  ==========================================

Across all score sets (runs with scores, and ``official`` paper-format files) the report
adds the universality table and, for every pair with the same layer x head grid, the
intrinsic comparison. Building a report never prints and never shows a figure.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from matplotlib.figure import Figure

from rhlens._result import atomic_write_text
from rhlens.errors import ConfigError
from rhlens.io import read_jsonl
from rhlens.niah import MaskSweepResult, NIAHResult
from rhlens.scores import RetrievalScores

__all__ = [
    "Image",
    "Report",
    "Section",
    "Table",
    "Text",
    "add_report_parser",
    "build_report",
    "cmd_report",
]

ANSWER_CLASSES = ("correct", "partial", "hallucination", "refusal", "degenerate")
_LOGS = {"probes.jsonl", "niah.jsonl"}  # the run logs of detect / niah, never CoT records


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
            (folder / fname).write_bytes(image.png)
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


# ---------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------
def _num(x: float | int | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}"


def _head(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _heads(heads: Sequence[tuple[int, int]], limit: int = 25) -> str:
    shown = ", ".join(_head(la, h) for la, h in heads[:limit])
    return shown + (f", ... ({len(heads) - limit} more)" if len(heads) > limit else "")


def _clip(text: Any, n: int = 200) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _image(fig: Figure, name: str, caption: str, dpi: int) -> Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return Image(png=buf.getvalue(), name=name, caption=caption)


# ---------------------------------------------------------------------------------------
# Reading run directories
# ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What one run directory holds (each part ``None`` when absent)."""

    path: Path
    label: str
    scores: RetrievalScores | None = None
    summary: dict[str, Any] | None = None
    sweep: MaskSweepResult | None = None
    niah: NIAHResult | None = None
    patching: Any = None  # rhlens.patching.HeadPatchingResult (imported only when present)
    patch_cmp: Any = None  # rhlens.patching.PatchingVsRetrieval
    cot: list[dict[str, Any]] = field(default_factory=list)
    cot_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return (self.scores is None and self.sweep is None and self.niah is None
                and self.patching is None and not self.cot)

    @property
    def model(self) -> str:
        for source in (self.scores, self.patching):
            if source is not None:
                return source.model_name
        niah = self.sweep.niah if self.sweep is not None else self.niah
        return niah.model_name if niah is not None else "?"


def _kind(meta_json: Path) -> str | None:
    if not meta_json.exists():  # a result saved by rhlens.results: result.json
        meta_json = meta_json.with_name("result.json")
    if not meta_json.exists():
        return None
    try:
        return json.loads(meta_json.read_text()).get("kind")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _cot_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """CoT answer records: JSONL lines with ``task``, ``mode`` and ``correct`` fields.

    The CoT experiment keeps one record per (task item, prompting mode[, mask]); reading
    records rather than one fixed file name lets the baseline script's ``--out`` file and
    the masked experiment's log both land in the report.
    """
    records: list[dict[str, Any]] = []
    files: list[str] = []
    candidates = [*sorted(path.glob("*.jsonl")), *sorted((path / "cot").glob("*.jsonl"))]
    for f in candidates:
        if f.name in _LOGS and f.parent == path:
            continue
        with f.open(encoding="utf-8") as fh:
            try:
                first = json.loads(fh.readline() or "null")
            except json.JSONDecodeError:
                continue
        if isinstance(first, dict) and {"task", "mode", "correct"} <= set(first):
            records += read_jsonl(f)
            files.append(str(f.relative_to(path)))
    return records, files


def _load_run(path: Path) -> _Run:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run directory (pass paper-format JSON files with --official)")
    label = path.name or path.resolve().name
    run = _Run(path=path, label=label)

    top_kind = _kind(path / "meta.json")
    if ((path / "scores" / "meta.json").exists() or top_kind == "RetrievalScores"
            or (path / "head_scores.json").exists()):
        run.scores = RetrievalScores.from_any(path)
    elif (path / "probes.jsonl").exists():
        run.notes.append("probes.jsonl is here but no scores/: the detection run has not "
                         "finished; rerun the same command to resume it")
    if (path / "summary.json").exists():
        run.summary = json.loads((path / "summary.json").read_text())

    if (path / "mask_sweep.json").exists():
        run.sweep = MaskSweepResult.load(path)
    elif (path / "niah_result.json").exists():
        run.niah = NIAHResult.load(path)

    patch_dir = None
    if _kind(path / "patching" / "meta.json") == "HeadPatchingResult":
        patch_dir = path / "patching"
    elif top_kind == "HeadPatchingResult":
        patch_dir = path
    cmp_file = path / "patching_vs_retrieval.json"
    if patch_dir is not None or cmp_file.exists():
        from rhlens.patching import HeadPatchingResult, PatchingVsRetrieval

        if patch_dir is not None:
            run.patching = HeadPatchingResult.load(patch_dir)
        if cmp_file.exists():
            run.patch_cmp = PatchingVsRetrieval.load(cmp_file)

    run.cot, run.cot_files = _cot_records(path)
    if run.empty and not run.notes:
        raise ConfigError(
            f"{path} holds no rhlens results: expected scores/ or head_scores.json (detect), "
            "mask_sweep.json or niah_result.json (mask-sweep, niah), patching/ (patch), or "
            "JSONL records with task/mode/correct (CoT)")
    return run


def _load_official(sources: Sequence[str | Path]) -> list[tuple[RetrievalScores, str]]:
    """Paper-format score files; a folder stands for every ``*.json`` file in it."""
    out: list[tuple[RetrievalScores, str]] = []
    for source in sources:
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"{source} does not exist")
        if source.is_dir() and not any((source / n).exists()
                                       for n in ("meta.json", "scores", "head_scores.json")):
            files = sorted(source.glob("*.json"))
            if not files:
                raise ConfigError(f"{source} holds no paper-format *.json score files")
            out += [(RetrievalScores.from_paper_json(f), str(f)) for f in files]
        else:
            out.append((RetrievalScores.from_any(source), str(source)))
    return out


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------
def _detection_section(run: _Run, scores: RetrievalScores, *, top: int, dpi: int) -> Section:
    from rhlens.plotting import (
        plot_dynamic,
        plot_head_heatmap,
        plot_niah_heatmap,
        plot_score_distribution,
        plot_sparsity,
        plot_stability,
    )
    from rhlens.properties import dynamic, sparse, stability

    sec = Section("Detection")
    n_cells = scores.n_layers * scores.n_heads
    kv = f" ({scores.n_kv_heads} KV heads per layer)" if scores.n_kv_heads else ""
    rows: list[tuple[str, str]] = [
        ("model", scores.model_name),
        ("heads", f"{scores.n_layers} layers x {scores.n_heads} heads = {n_cells}{kv}"),
        ("probes", f"{scores.n_probes}, {scores.n_successful} answered correctly"),
    ]
    cfg = scores.config
    if cfg.get("mode"):
        rows.append(("scoring", f"{cfg['mode']} (success: ROUGE-1 recall > "
                                f"{cfg.get('success_threshold', 0.5)})"))
    for key, name in (("length", "context lengths"), ("depth", "needle depths (%)"),
                      ("needle_id", "needles")):
        values = sorted({p[key] for p in scores.probes if key in p})
        if values:
            rows.append((name, ", ".join(f"{v:g}" if isinstance(v, float) else str(v)
                                         for v in values)))
    summary = run.summary or {}
    if "wall_seconds" in summary:
        rows.append(("wall time", f"{summary['wall_seconds']:.0f} s"))
    if "written" in summary:
        rows.append(("written", str(summary["written"])))
    if scores.n_successful == 0:
        sec.add(Table(("quantity", "value"), tuple(rows), caption="Summary"))
        sec.add(Text("No probe was answered correctly, so no retrieval score is defined: "
                     "use shorter contexts or other needles.", "note"))
        if _has_niah_records(scores.probes):
            niah = Section("Needle in a haystack", [_image(
                plot_niah_heatmap(scores), "detection-niah",
                "ROUGE-1 recall x 100 of the unmasked answers per length and depth.", dpi)])
            sec.children.append(niah)
        return sec

    mean = scores.mean
    for t in (0.1, 0.5):
        n_above = int((mean > t).sum())
        rows.append((f"heads scoring > {t:g}", f"{n_above} ({100 * n_above / n_cells:.1f}%)"))
    rows.append(("highest score", _num(float(mean.max()))))
    sec.add(Table(("quantity", "value"), tuple(rows), caption="Summary"))

    stab = None
    if scores.n_successful >= 2:
        stab = stability(scores, k=min(10, n_cells), n_boot=500, repeats=10)

    # top heads, with the bootstrap interval when there are probes to resample
    active = (scores.successful > 0).float().mean(0)
    group = scores.n_heads // scores.n_kv_heads if scores.n_kv_heads else None
    header = ["rank", "head", "layer", "head index", "score", "active on"]
    if stab is not None:
        header.append(f"{100 * stab.level:g}% interval")
    if group:
        header.append("KV head")
    table_rows = []
    best = [t for t in scores.top(min(top, n_cells)) if t[2] > 0]
    for rank, (la, h, s) in enumerate(best, start=1):
        row = [str(rank), _head(la, h), str(la), str(h), _num(s),
               f"{100 * float(active[la, h]):.0f}%"]
        if stab is not None:
            row.append(f"[{_num(float(stab.ci_low[la, h]))}, {_num(float(stab.ci_high[la, h]))}]")
        if group:
            row.append(str(h // group))
        table_rows.append(tuple(row))
    tops = Section("Top heads")
    if table_rows:
        tops.add(Table(tuple(header), tuple(table_rows),
                       caption=f"Best {len(table_rows)} heads by retrieval score (mean over the "
                               f"{scores.n_successful} successful probes); 'active on' = share of "
                               "those probes on which the head copied at least one token"))
    else:
        tops.add(Text("Every head scored 0: no head copied the needle.", "note"))
    sec.children.append(tops)

    maps = Section("Score map and distribution")
    maps.add(_image(plot_head_heatmap(scores, top=min(10, n_cells)), "head-heatmap",
                    "Retrieval score of every head (layer x head); the 10 best are boxed and ranked.",
                    dpi))
    maps.add(_image(plot_score_distribution(scores), "score-distribution",
                    "Every head's score, sorted: a few heads above 0.1, the rest near 0.", dpi))
    sec.children.append(maps)

    if _has_niah_records(scores.probes):
        niah = Section("Needle in a haystack")
        niah.add(_image(plot_niah_heatmap(scores), "detection-niah",
                        "ROUGE-1 recall x 100 of the unmasked answers per length and depth.", dpi))
        probe_rows = tuple(
            (str(p.get("key", i)), _num(p.get("rouge_recall"), 2),
             "yes" if p.get("success") else "no", _clip(p.get("response"), 160))
            for i, p in enumerate(scores.probes[:20]))
        more = f" (first 20 of {scores.n_probes})" if scores.n_probes > 20 else ""
        niah.add(Table(("probe", "recall", "counted", "answer"), probe_rows,
                       caption=f"Answers{more}"))
        sec.children.append(niah)

    sp = sparse(scores)
    sparse_sec = Section("Sparse")
    sparse_sec.add(Table(("threshold", "heads above", "% of heads"), tuple(
        (f"{t:g}", str(int(c)), f"{100 * float(f):.1f}%")
        for t, c, f in zip(sp.thresholds, sp.counts, sp.fractions))))
    sparse_sec.add(_image(plot_sparsity(sp), "sparsity",
                          "Histogram of head scores (log scale) and retrieval heads per layer.", dpi))
    sec.children.append(sparse_sec)

    dyn = dynamic(scores)
    dyn_sec = Section("Dynamic")
    dyn_sec.add(Text(
        f"{len(dyn.always_active)} heads copy on every one of the {dyn.n_probes} successful "
        f"probes: {_heads(dyn.always_active) or 'none'}. {len(dyn.context_dependent)} retrieval "
        f"heads (score > {dyn.retrieval_threshold:g}) copy on some probes only: "
        f"{_heads(dyn.context_dependent) or 'none'}."))
    dyn_sec.add(_image(plot_dynamic(dyn, top=min(30, n_cells)), "dynamic",
                       "Share of probes on which each of the best heads copies, coloured by score.",
                       dpi))
    sec.children.append(dyn_sec)

    if stab is not None:
        stab_sec = Section("Stability")
        lo, hi = stab.n_retrieval_ci
        reached = (f"the top-{stab.k} set reaches a Jaccard overlap of {stab.target:g} with the "
                   f"full set from {stab.probes_needed} probes on"
                   if stab.probes_needed is not None else
                   f"the top-{stab.k} set never reaches a Jaccard overlap of {stab.target:g} "
                   f"below all {stab.n_probes} probes: more probes would still change it")
        stab_sec.add(Text(
            f"{stab.n_retrieval} heads score above {stab.threshold:g} "
            f"({100 * stab.level:g}% bootstrap interval {lo:g} to {hi:g}, {stab.n_boot} "
            f"resamples of the {stab.n_probes} successful probes); {reached}."))
        stab_sec.add(_image(plot_stability(stab), "stability",
                            "Top-K overlap against the number of probes, and bootstrap intervals "
                            "of the best heads' scores.", dpi))
        sec.children.append(stab_sec)
    else:
        sec.add(Text("Stability needs at least 2 successful probes; skipped.", "note"))
    return sec


def _has_niah_records(records: Sequence[dict[str, Any]]) -> bool:
    return bool(records) and all(k in r for r in records for k in ("length", "depth", "rouge_recall"))


def _classes_table(niah: NIAHResult, labels: Sequence[str], caption: str) -> Table:
    rows = []
    for label in labels:
        counts = niah.class_counts(label)
        n_heads = len(niah.masks[label].get("heads", []))
        rows.append((label, str(n_heads), _num(niah.score(label), 1),
                     *(str(counts.get(c, 0)) for c in ANSWER_CLASSES)))
    return Table(("mask", "heads", "NIAH score", *ANSWER_CLASSES), tuple(rows), caption=caption)


def _examples(niah: NIAHResult, label: str, n: int) -> Section | None:
    """The masked answers next to the unmasked ones: hallucinations first, else any failure."""
    if "none" not in niah.masks or label not in niah.masks or label == "none":
        return None
    sec = Section(f"Answers under {label}, side by side")
    rows = niah.examples(label, n=n, classes=("hallucination",))
    if not rows:
        rows = niah.examples(label, n=n, classes=("partial", "refusal", "degenerate"))
        text = (f"No answer under {label} is a hallucination; other failures:" if rows else
                f"Every answer under {label} is still correct.")
        sec.add(Text(text, "note"))
    if rows:
        sec.add(Table(("probe", "question", "expected", "unmasked answer", f"answer under {label}",
                       "class"),
                      tuple((_clip(r["key"], 60), _clip(r["question"]), _clip(r["expected"]),
                             _clip(r["unmasked"]), _clip(r["masked"]), r["class"]) for r in rows)))
    return sec


def _heatmap_image(niah: NIAHResult, labels: Sequence[str], name: str, dpi: int) -> Image | None:
    from rhlens.plotting import plot_mask_heatmaps

    labels = [x for x in labels if x in niah.masks]
    if not labels or not all(_has_niah_records(niah.for_mask(x)) for x in labels):
        return None
    return _image(plot_mask_heatmaps(niah, labels), name,
                  "NIAH score (ROUGE-1 recall x 100) per context length and needle depth, "
                  "one panel per mask.", dpi)


def _sweep_section(sweep: MaskSweepResult, *, examples: int, dpi: int) -> Section:
    from rhlens.plotting import plot_k_curve

    niah = sweep.niah
    sec = Section("Masking sweep")
    c = sweep.curve()
    kmax = max(sweep.ks) if sweep.ks else 0
    some = niah.masks.get(f"top-{kmax}", {})
    n_probes = len(niah.for_mask("none")) if "none" in niah.masks else 0
    below = sweep.k_below(50.0)
    sec.add(Text(
        f"{niah.model_name}: NIAH score with the top-K retrieval heads masked against K random "
        f"heads (never a retrieval head), {n_probes} probes, {len(sweep.seeds)} random "
        f"draw(s) per K, mask mode {some.get('mode', '?')}, phase {some.get('phase', '?')}. "
        + (f"Masking the top {below} heads brings the score below 50."
           if below is not None else "No top-K mask tried brings the score below 50.")))
    rows = tuple((str(k), _num(t, 1), f"{m:.1f} ± {s:.1f}", ", ".join(_num(v, 1) for v in r))
                 for k, t, m, s, r in zip(c["k"], c["top"], c["random_mean"], c["random_std"],
                                          c["random"]))
    sec.add(Table(("K", "top-K masked", "random-K masked", "per seed"), rows,
                  caption="NIAH score against K"))
    sec.add(_image(plot_k_curve(sweep), "k-curve",
                   "NIAH score against K: top-K retrieval heads (red) vs K random heads (blue).", dpi))
    panels = ["none"] + ([f"top-{kmax}", f"random-{kmax}-s{sweep.seeds[0]}"]
                         if kmax and sweep.seeds else [])
    image = _heatmap_image(niah, panels, "sweep-niah-heatmaps", dpi)
    if image is not None:
        sec.add(image)
    sec.add(_classes_table(niah, niah.labels, "Answer classes per mask"))
    if kmax:
        ex = _examples(niah, f"top-{kmax}", examples)
        if ex is not None:
            sec.children.append(ex)
    return sec


def _niah_section(niah: NIAHResult, *, examples: int, dpi: int) -> Section:
    sec = Section("NIAH under masks")
    cfg = niah.config
    sec.add(Text(f"{niah.model_name}: every probe answered under {len(niah.masks)} mask(s), "
                 f"up to {cfg.get('max_new_tokens', '?')} new tokens; the NIAH score is the "
                 "ROUGE-1 recall of the expected answer x 100."))
    sec.add(_classes_table(niah, niah.labels, "NIAH score and answer classes per mask"))
    image = _heatmap_image(niah, niah.labels[:4], "niah-heatmaps", dpi)
    if image is not None:
        sec.add(image)
    for label in [x for x in niah.labels if x != "none"][:3]:
        ex = _examples(niah, label, examples)
        if ex is not None:
            sec.children.append(ex)
    return sec


def _patching_section(run: _Run, *, top: int, dpi: int) -> Section:
    sec = Section("Head patching")
    res, cmp = run.patching, run.patch_cmp
    if res is not None:
        from rhlens.plotting.patching import plot_patching_heatmap

        cfg = res.config
        seconds = sum(res.seconds) / len(res.seconds) if res.seconds else None
        rows = [("model", res.model_name), ("pairs", str(res.n_pairs)),
                ("setting", "/".join(str(cfg.get(k, "?"))
                                     for k in ("mode", "direction", "positions", "metric"))),
                ("clean metric (mean)", _num(float(res.clean.mean()))),
                ("corrupted metric (mean)", _num(float(res.corrupted.mean())))]
        if cfg.get("layers"):
            rows.append(("layers patched", ", ".join(str(x) for x in cfg["layers"])))
        if seconds is not None:
            rows.append(("time per pair", f"{seconds:.1f} s"))
        sec.add(Table(("quantity", "value"), tuple(rows), caption="Summary"))
        df = res.to_dataframe().head(top) if bool(res.mean.isfinite().any()) else None
        score = run.scores.mean if (run.scores is not None and run.scores.n_successful and
                                    (run.scores.n_layers, run.scores.n_heads) ==
                                    (res.n_layers, res.n_heads)) else None
        header = ("rank", "head", "effect", "std over pairs", "pairs") + \
            (("retrieval score",) if score is not None else ())
        table_rows = []
        for rank, r in enumerate(df.itertuples(index=False) if df is not None else (), start=1):
            row = (str(rank), _head(int(r.layer), int(r.head)), _num(r.effect), _num(r.std),
                   str(r.n_pairs))
            if score is not None:
                row += (_num(float(score[int(r.layer), int(r.head)])),)
            table_rows.append(row)
        if table_rows:
            sec.add(Table(header, tuple(table_rows),
                          caption="Heads by mean effect (1 = the head alone carries the difference)"))
        else:
            sec.add(Text("No head has a finite patching effect (do the pairs' runs differ?).",
                         "note"))
        if res.pairs:
            sec.add(Table(("pair", "clean answer", "corrupted answer", "clean", "corrupted"), tuple(
                (_clip(p.get("key", i), 60), _clip(p.get("clean_answer", "")),
                 _clip(p.get("corrupted_answer", "")), _num(c), _num(k))
                for i, (p, c, k) in enumerate(zip(res.pairs[:10], res.clean.tolist(),
                                                  res.corrupted.tolist()))),
                caption="Pairs (metric of the unpatched clean and corrupted runs)"))
        sec.add(_image(plot_patching_heatmap(res), "patching-heatmap",
                       "Mean patching effect of every head.", dpi))
        if cmp is None and score is not None:
            from rhlens.patching import patching_vs_retrieval

            try:
                cmp = patching_vs_retrieval(res, run.scores)
            except ConfigError as exc:
                sec.add(Text(f"No comparison with the retrieval scores: {exc}", "note"))
    if cmp is not None:
        from rhlens.plotting.patching import plot_patching_vs_retrieval

        vs = Section("Patching effect vs retrieval score")
        vs.add(Text(f"Over the heads that have both, Spearman {_num(cmp.spearman)} and Pearson "
                    f"{_num(cmp.pearson)}; a head is causal above an effect of "
                    f"{cmp.effect_threshold:g} and a retrieval head above a score of "
                    f"{cmp.score_threshold:g}."))
        groups = (("both", cmp.both), ("causal, not retrieval", cmp.causal_not_retrieval),
                  ("retrieval, not causal", cmp.retrieval_not_causal))
        rows = tuple((name, _head(la, h), _num(e), _num(s))
                     for name, items in groups for la, h, e, s in items[:10])
        if rows:
            vs.add(Table(("group", "head", "effect", "retrieval score"), rows,
                         caption="Where the two measures agree and disagree (10 per group at most)"))
        vs.add(_image(plot_patching_vs_retrieval(cmp), "patching-vs-retrieval",
                      "Each head's patching effect against its retrieval score.", dpi))
        sec.children.append(vs)
    return sec


def _cot_section(run: _Run, *, examples: int) -> Section:
    records = run.cot
    sec = Section("Chain of thought")
    has_mask = any("mask" in r for r in records)
    cells: dict[tuple[str, str], dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[(str(r["task"]), str(r.get("mask", "none")))][str(r["mode"])].append(bool(r["correct"]))
    modes = sorted({m for v in cells.values() for m in v}, key=lambda m: (m != "cot", m))
    sec.add(Text(f"{len(records)} answers from {', '.join(run.cot_files)}; accuracy per task"
                 + (", mask" if has_mask else "") + " and prompting mode."))
    header = ("task", *(("mask",) if has_mask else ()), "items",
              *(f"{m} accuracy" for m in modes))
    rows = []
    for (task, mask), by_mode in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "none",
                                                                      kv[0][1])):
        n = max(len(v) for v in by_mode.values())
        accs = tuple(f"{100 * sum(by_mode[m]) / len(by_mode[m]):.0f}%" if by_mode.get(m) else "n/a"
                     for m in modes)
        rows.append((task, *((mask,) if has_mask else ()), str(n), *accs))
    sec.add(Table(header, tuple(rows), caption="Accuracy"))
    if has_mask:
        base = {(r["task"], r["mode"], r.get("id")): r for r in records
                if r.get("mask", "none") == "none"}
        broken = [(base[(r["task"], r["mode"], r.get("id"))], r) for r in records
                  if r.get("mask", "none") != "none" and not r["correct"]
                  and (r["task"], r["mode"], r.get("id")) in base
                  and base[(r["task"], r["mode"], r.get("id"))]["correct"]]
        if broken:
            sec.children.append(Section("Answers broken by a mask", [Table(
                ("task", "mode", "item", "gold", "mask", "unmasked output", "masked output"),
                tuple((str(b["task"]), str(b["mode"]), str(b.get("id", "")), _clip(b.get("gold")),
                       str(m.get("mask")), _clip(b.get("output")), _clip(m.get("output")))
                      for b, m in broken[:examples]))]))
    return sec


def _across_section(score_sets: list[tuple[RetrievalScores, str]], *, dpi: int) -> Section | None:
    """Universality over every score set, and intrinsic comparisons of same-grid pairs."""
    from rhlens.plotting import plot_intrinsic, plot_universal
    from rhlens.properties import intrinsic, universal

    usable = [(s, src) for s, src in score_sets if s.n_successful > 0]
    if len(usable) < 2:
        return None
    names = Counter(s.model_name for s, _ in usable)
    labelled = [s if names[s.model_name] == 1 else
                replace(s, model_name=f"{s.model_name} [{Path(src).name}]") for s, src in usable]
    sec = Section("Across score sets")
    uni = universal(labelled)
    uni_sec = Section("Universal")
    uni_sec.add(Table(
        ("model", "layers x heads", "probes", f"retrieval heads (> {uni.threshold:g})",
         "% of heads", f"top-{uni.top_k} heads (score)"),
        tuple((r.model, f"{r.n_layers} x {r.n_heads}", str(r.n_probes), str(r.n_retrieval),
               f"{r.percent_retrieval:.1f}%",
               ", ".join(f"{_head(la, h)} ({s:.2f})" for la, h, s in r.top)) for r in uni.rows),
        caption="Retrieval heads in every score set"))
    uni_sec.add(_image(plot_universal(uni), "universal",
                       "Share of heads scoring above 0.1, per score set.", dpi))
    sec.children.append(uni_sec)

    pairs = [(a, b) for a, b in itertools.combinations(labelled, 2)
             if (a.n_layers, a.n_heads) == (b.n_layers, b.n_heads)]
    if pairs:
        intr = Section("Intrinsic")
        results = [intrinsic(a, b, k=min(20, a.n_layers * a.n_heads)) for a, b in pairs]
        intr.add(Table(("model A", "model B", "grid", "Pearson", "Spearman", "top-K overlap",
                        "Jaccard"), tuple(
            (r.model_a, r.model_b, f"{a.n_layers} x {a.n_heads}", _num(r.pearson, 2),
             _num(r.spearman, 2), f"{r.overlap}/{r.k}", _num(r.jaccard, 2))
            for r, (a, _) in zip(results, pairs)),
            caption="Pairs with the same layer x head grid: a variant of a base model keeps its "
                    "retrieval heads (high correlation), unrelated models do not"))
        for r in results[:8]:
            intr.add(_image(plot_intrinsic(r), f"intrinsic-{r.model_a}-{r.model_b}",
                            f"{r.model_a} against {r.model_b}, one point per head.", dpi))
        if len(results) > 8:
            intr.add(Text(f"Scatter plots of the first 8 of {len(results)} pairs.", "note"))
        sec.children.append(intr)
    else:
        sec.add(Text("No two score sets share a layer x head grid, so there is no intrinsic "
                     "comparison.", "note"))
    return sec


# ---------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------
def build_report(run_dirs: str | Path | Sequence[str | Path] = (), *,
                 official: str | Path | Sequence[str | Path] = (),
                 title: str = "rhlens report", top: int = 20, examples: int = 5,
                 dpi: int = 100) -> Report:
    """Gather the results of run directories and paper-format score files into a report.

    Args:
        run_dirs: directories written by ``rhlens detect / niah / mask-sweep / patch`` (or
            by the same functions from Python); each becomes one section holding a
            sub-section per kind of result found in it.
        official: paper-format JSON files (``{"<layer>-<head>": [scores]}``), or folders of
            them, such as the scores Wu et al. released; they enter the cross-model tables.
        title: the report's title.
        top: rows of the top-heads tables.
        examples: masked answers shown next to unmasked ones, per mask.
        dpi: resolution of the embedded figures.

    Raises:
        FileNotFoundError: a path does not exist.
        ConfigError: nothing was given, or a directory holds no rhlens result.
    """
    runs_in = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    official_in = [official] if isinstance(official, (str, Path)) else list(official)
    if not runs_in and not official_in:
        raise ConfigError("nothing to report: give at least one run directory or official file")
    if top < 1 or examples < 0 or dpi < 10:
        raise ConfigError(f"need top >= 1, examples >= 0 and dpi >= 10, got {top}, {examples}, {dpi}")
    runs = [_load_run(Path(p)) for p in runs_in]
    labels = Counter(r.label for r in runs)
    for i, r in enumerate(runs):
        if labels[r.label] > 1:
            r.label = f"{r.label} ({i + 1})"
    official_sets = _load_official(official_in)

    sections: list[Section] = []
    for run in runs:
        sec = Section(f"Run {run.label}")
        parts = [name for name, present in (
            ("detection", run.scores is not None), ("masking sweep", run.sweep is not None),
            ("NIAH under masks", run.niah is not None),
            ("head patching", run.patching is not None or run.patch_cmp is not None),
            ("chain of thought", bool(run.cot))) if present]
        sec.add(Text(f"Directory {run.path}; model {run.model}; holds "
                     f"{', '.join(parts) if parts else 'no finished result'}."))
        for note in run.notes:
            sec.add(Text(note, "note"))
        if run.scores is not None:
            sec.children.append(_detection_section(run, run.scores, top=top, dpi=dpi))
        if run.sweep is not None:
            sec.children.append(_sweep_section(run.sweep, examples=examples, dpi=dpi))
        if run.niah is not None:
            sec.children.append(_niah_section(run.niah, examples=examples, dpi=dpi))
        if run.patching is not None or run.patch_cmp is not None:
            sec.children.append(_patching_section(run, top=top, dpi=dpi))
        if run.cot:
            sec.children.append(_cot_section(run, examples=examples))
        sections.append(sec)

    score_sets = [(r.scores, str(r.path)) for r in runs if r.scores is not None] + official_sets
    across = _across_section(score_sets, dpi=dpi)
    if across is not None:
        sections.append(across)
    elif official_sets:
        sections.append(Section("Across score sets", [Text(
            "Fewer than two score sets with successful probes: nothing to compare.", "note")]))
    sources = [str(p) for p in runs_in] + [src for _, src in official_sets]
    return Report(title=title, sections=sections, sources=sources)


# ---------------------------------------------------------------------------------------
# The command (the lead wires add_report_parser into rhlens.cli.build_parser)
# ---------------------------------------------------------------------------------------
def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``rhlens report RUN_DIR [RUN_DIR ...] [--official FILE ...] --out report.html``."""
    p = sub.add_parser(
        "report", help="one self-contained HTML report (and a Markdown twin) of run directories",
        description="Gather detection, NIAH, mask-sweep, patching and CoT results of run "
                    "directories, plus paper-format score files, into report.html + report.md.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (--out of a command)")
    p.add_argument("--official", nargs="+", action="extend", default=[], metavar="FILE",
                   help="paper-format JSON score files, or folders of them (repeatable)")
    p.add_argument("--out", default="report.html",
                   help="the HTML file (a directory: DIR/report.html); the Markdown twin gets "
                        "the same name with .md (default report.html)")
    p.add_argument("--title", default=None, help="the report's title")
    p.add_argument("--top", type=int, default=20, help="rows of the top-heads tables (default 20)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Write ``--out`` (HTML) and its ``.md`` twin, then say where they are."""
    if not args.runs and not args.official:
        raise ConfigError("give at least one RUN_DIR or --official FILE")
    names = ", ".join(Path(p).name or str(p) for p in args.runs) or "official scores"
    report = build_report(args.runs, official=args.official, top=args.top,
                          title=args.title or f"rhlens report: {names}")
    out = Path(args.out)
    if out.is_dir():
        out = out / "report.html"
    html_path = out if out.suffix.lower() in (".html", ".htm") else out.with_suffix(".html")
    md_path = html_path.with_suffix(".md")
    report.to_html(html_path)
    report.to_markdown(md_path)
    n_sections = sum(1 for _ in report.walk())
    print(f"wrote {html_path} ({n_sections} sections, {len(report.images())} figures) "  # noqa: T201
          f"and {md_path} (figures in {md_path.parent / (md_path.stem + '_files')})", flush=True)
    return 0
