"""Interactive views and inline displays of results (layer 5: they take results, compute nothing).

``head_view(trace)``: a few heads answering one probe, step by step (a
:class:`~rhlens.trace.HeadTrace` from :func:`rhlens.trace.trace_heads`); ``result_html(result)``:
a result's compact table and figure, what ``Result._repr_html_`` shows in Jupyter.
"""

from rhlens.views.heads import HeadView, head_view

__all__ = ["HeadView", "head_view"]
