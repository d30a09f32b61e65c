"""One report of everything some run directories hold: a self-contained HTML file and its Markdown twin.

Why a report: each rhlens command leaves JSON, safetensors and a few PNGs in its run
directory, which is what a program wants and not what a reader wants. :func:`build_report`
gathers the saved results those directories hold (detection and its properties, NIAH under
masks, the masking K curve, head patching, chain-of-thought answers, KV budget sweeps) plus
the paper's released score files, and turns them into numbers in tables and figures, so that
one file answers "which heads, how sure, and what breaks without them". The HTML embeds its figures
(base64 PNG) so it can be mailed or attached to an issue as one file; the Markdown twin
(figures in ``<name>_files/``) diffs well and renders on GitHub.

The report renders saved results only: it loads no model and reruns no analysis of a run
(:func:`rhlens.store.runs.read_run` finds what a folder holds). Where an older folder lacks a result the
report would show, a note says so and how to produce it. Only the cross-run comparisons
(universal, intrinsic), which no single run holds, are computed here, with the paper's
definitions.

Modules: :mod:`~rhlens.report.document` (the document model and its two renderings),
:mod:`~rhlens.report.build` (:func:`build_report`), and one module per kind of section
(``detection``, ``niah``, ``patching``, ``cot``, ``families``, ``compress``, ``across``).
"""

from rhlens.report.build import build_report
from rhlens.report.document import Block, Image, Report, Section, Table, Text

__all__ = ["Block", "Image", "Report", "Section", "Table", "Text", "build_report"]
