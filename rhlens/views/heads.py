"""An interactive view of a few heads answering one probe, from a :class:`~rhlens.trace.HeadTrace`.

Self-contained HTML (one ``<div>``, its CSS and a small script; no network, no package to
install), so the same markup works inline in Jupyter, in a standalone file from ``rhlens show``
and in the tests' headless browser. CircuitsVis draws attention patterns from a CDN-loaded
React bundle: it would need the network at view time and knows nothing of needles or copy
steps, which are the whole point here.
"""

from __future__ import annotations

import html
import json
import uuid
from pathlib import Path
from typing import Any

__all__ = ["HeadView", "head_view"]

_CSS = """
.rhv{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:14px;color:#222;
 line-height:1.45;max-width:100%}
.rhv h3{margin:.2em 0 .3em;font-size:16px}
.rhv .rhv-meta{color:#444;margin-bottom:.4em}
.rhv .rhv-answer .rhv-atok{padding:1px 2px;border-radius:3px;white-space:pre}
.rhv .rhv-answer .rhv-atok.rhv-cur{outline:2px solid #1f5fbf;background:#dbe7fb}
.rhv .rhv-ctl{display:flex;align-items:center;gap:.5em;margin:.5em 0;flex-wrap:wrap}
.rhv .rhv-ctl input[type=range]{width:260px}
.rhv .rhv-ctl button{font-size:14px;padding:1px 10px;cursor:pointer}
.rhv .rhv-panels{display:flex;gap:12px;flex-wrap:wrap;align-items:flex-start}
.rhv .rhv-panel{flex:1 1 340px;min-width:300px;max-width:560px;border:1px solid #ccc;
 border-radius:6px;padding:8px 10px;background:#fff}
.rhv .rhv-panel h4{margin:0 0 .3em;font-size:15px}
.rhv .rhv-now{margin:.2em 0 .4em;min-height:2.9em}
.rhv .rhv-yes{color:#0a7a32;font-weight:600}
.rhv .rhv-no{color:#a33;font-weight:600}
.rhv .rhv-ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;
 white-space:pre-wrap;word-break:break-word;border-top:1px solid #eee;padding-top:4px;
 max-height:260px;overflow:auto}
.rhv .rhv-tok{border-radius:2px}
.rhv .rhv-tok.rhv-needle{box-shadow:inset 0 -3px 0 #e0a800;background-color:#fff3c4}
.rhv .rhv-tok.rhv-top{outline:2px solid #d6336c;outline-offset:0}
.rhv .rhv-steps{border-collapse:collapse;margin-top:6px;font-size:12.5px;width:100%}
.rhv .rhv-steps td,.rhv .rhv-steps th{border-bottom:1px solid #eee;padding:1px 5px;text-align:left;
 white-space:pre}
.rhv .rhv-steps td.num{text-align:right}
.rhv .rhv-steps tr.rhv-cur{background:#dbe7fb}
.rhv .rhv-steps tr{cursor:pointer}
.rhv .rhv-key{font-size:12px;color:#555;margin-top:.3em}
"""

# Renders every panel from the JSON beside it; the step control re-renders in place.
_JS = r"""
(function(){
 // The root: this script's own .rhv (as Jupyter runs it) or the element of that id; a front
 // end that runs scripts before attaching the output gets a few more tries.
 var me=document.currentScript;
 function find(){return (me&&me.closest?me.closest(".rhv"):null)||document.getElementById("%(id)s");}
 function start(tries){var root=find();
   if(!root){if(tries<50)setTimeout(function(){start(tries+1);},100);return;}
   if(!root.dataset.ready){root.dataset.ready="1";init(root);}}
 function init(root){
 var d=JSON.parse(root.querySelector("script.rhv-data").textContent);
 var S=d.answer.length, step=0;
 var ESC={"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"};
 function esc(t){return String(t).replace(/[&<>"]/g,function(c){return ESC[c];});}
 function vis(t){return t.replace(/\n/g,"\u21b5\n");}
 function shade(w){var a=Math.min(1,Math.sqrt(w));return "rgba(31,95,191,"+(0.75*a).toFixed(3)+")";}
 var slider=root.querySelector(".rhv-step"), label=root.querySelector(".rhv-steplabel");
 slider.max=S-1;
 root.querySelector(".rhv-answer").innerHTML=d.answer.map(function(t,s){
   return '<span class="rhv-atok" data-step="'+s+'">'+esc(vis(t))+'</span>';}).join("");
 var panels=root.querySelector(".rhv-panels");
 panels.innerHTML=d.heads.map(function(h,i){
   var title="L"+h[0]+"H"+h[1];
   var sc=d.head_scores?" \u00b7 mean score "+d.head_scores[i].toFixed(3):"";
   sc+=" \u00b7 this probe "+d.probe_scores[i].toFixed(2);
   var ctx=[];
   for(var p=d.window[0];p<d.window[1];p++){
     var cls="rhv-tok"+(p>=d.needle[0]&&p<d.needle[1]?" rhv-needle":"");
     ctx.push('<span class="'+cls+'" data-pos="'+p+'">'+esc(vis(d.tokens[p]))+'</span>');}
   var rows=[];
   for(var s=0;s<S;s++){var p2=d.top[s][i];
     rows.push('<tr data-step="'+s+'"><td class="num">'+s+'</td><td>'+esc(vis(d.answer[s]))+
       '</td><td>'+esc(vis(d.tokens[p2]||""))+'</td><td class="num">'+p2+'</td><td class="num">'+
       d.weight[s][i].toFixed(2)+'</td><td class="num">'+d.mass[s][i].toFixed(2)+'</td><td>'+
       (d.copied[s][i]?'<span class="rhv-yes">\u2713</span>':'')+'</td></tr>');}
   return '<div class="rhv-panel" data-head="'+title+'"><h4>'+title+'<span style="font-weight:400">'+
     sc+'</span></h4><div class="rhv-now"></div><div class="rhv-ctx">'+
     (d.window[0]>0?'\u2026 ':'')+ctx.join("")+(d.window[1]<d.tokens.length?' \u2026':'')+
     '</div><table class="rhv-steps"><thead><tr><th>step</th><th>generated</th><th>top key</th>'+
     '<th>pos</th><th>weight</th><th>on needle</th><th>copied</th></tr></thead><tbody>'+
     rows.join("")+'</tbody></table></div>';}).join("");
 function show(s){
   step=Math.max(0,Math.min(S-1,s)); slider.value=step;
   label.textContent="step "+step+" of 0\u2013"+(S-1)+": generating \u201c"+vis(d.answer[step])+"\u201d";
   root.querySelectorAll(".rhv-atok").forEach(function(e){
     e.classList.toggle("rhv-cur",+e.dataset.step===step);});
   root.querySelectorAll(".rhv-panel").forEach(function(panel,i){
     var pos=d.top[step][i], w=d.weight[step][i], att=d.attn[step][i];
     panel.querySelectorAll(".rhv-ctx .rhv-tok").forEach(function(e){
       var p=+e.dataset.pos, a=att[p-d.window[0]];
       e.style.backgroundColor=a>0.01?shade(a):"";
       e.style.color=a>0.35?"#fff":"";
       e.classList.toggle("rhv-top",p===pos);});
     var inside=pos>=d.window[0]&&pos<d.window[1];
     panel.querySelector(".rhv-now").innerHTML="top key: position "+pos+" \u201c"+
       esc(vis(d.tokens[pos]||""))+"\u201d"+(inside?"":" (outside the context shown)")+
       ", weight "+w.toFixed(2)+"; on the needle "+d.mass[step][i].toFixed(2)+"<br>"+
       (d.copied[step][i]?'<span class="rhv-yes">copied \u2713</span> the token it generates':
        '<span class="rhv-no">no copy</span>');
     panel.querySelectorAll(".rhv-steps tbody tr").forEach(function(r){
       r.classList.toggle("rhv-cur",+r.dataset.step===step);});
   });
 }
 slider.addEventListener("input",function(){show(+slider.value);});
 root.querySelector(".rhv-prev").addEventListener("click",function(){show(step-1);});
 root.querySelector(".rhv-next").addEventListener("click",function(){show(step+1);});
 root.querySelectorAll(".rhv-steps tbody tr").forEach(function(r){
   r.addEventListener("click",function(){show(+r.dataset.step);});});
 root.querySelectorAll(".rhv-atok").forEach(function(e){
   e.addEventListener("click",function(){show(+e.dataset.step);});});
 show(0);
 }
 start(0);
})();
"""


def _round(rows, digits: int = 4) -> Any:
    if isinstance(rows, list):
        return [_round(r, digits) for r in rows]
    return round(float(rows), digits)


class HeadView:
    """A head view: ``_repr_html_`` in Jupyter, :meth:`to_html` / :meth:`save` for a file."""

    def __init__(self, trace) -> None:
        self.trace = trace

    def data(self) -> dict[str, Any]:
        """Everything the page shows, JSON-ready."""
        t = self.trace
        return {
            "model": t.model_name, "probe": t.probe, "tokens": list(t.tokens),
            "answer": list(t.answer), "needle": list(t.needle_span), "window": list(t.window),
            "heads": [list(h) for h in t.heads], "top": t.top_position.tolist(),
            "weight": _round(t.top_weight.tolist()), "mass": _round(t.needle_mass.tolist()),
            "copied": t.copied.tolist(), "attn": _round(t.window_attention.tolist(), 3),
            "probe_scores": _round(t.probe_scores.tolist()),
            "head_scores": None if t.head_scores is None else _round(list(t.head_scores)),
            "recall": t.recall,
        }

    def fragment(self) -> str:
        """The view as one ``<div>`` (its style and script inside), for embedding."""
        t = self.trace
        box = f"rhv-{uuid.uuid4().hex[:10]}"
        data = json.dumps(self.data(), ensure_ascii=False).replace("</", "<\\/")
        p = t.probe
        ok = "answered" if t.recall > 0.5 else "missed"
        needle = "".join(t.tokens[t.needle_span[0]:t.needle_span[1]])
        meta = (f"{html.escape(t.model_name)} · probe {html.escape(str(p.get('key', '')))} · "
                f"needle tokens {t.needle_span[0]}–{t.needle_span[1] - 1} "
                f"(<span class='rhv-tok rhv-needle'>{html.escape(needle)}</span>) · "
                f"{ok} (ROUGE-1 recall {t.recall:.2f})")
        question = html.escape(str(p.get("question", "")))
        return f"""<div class="rhv" id="{box}"><style>{_CSS}</style>
<h3>Heads at work: {", ".join(f"L{la}H{h}" for la, h in t.heads)}</h3>
<div class="rhv-meta">{meta}</div>
<div class="rhv-meta"><b>Question:</b> {question}</div>
<div class="rhv-meta"><b>Answer</b> (click a token): <span class="rhv-answer"></span></div>
<div class="rhv-ctl"><button class="rhv-prev" title="previous step">&#9664;</button>
<input type="range" class="rhv-step" min="0" max="0" value="0" aria-label="decode step">
<button class="rhv-next" title="next step">&#9654;</button> <span class="rhv-steplabel"></span></div>
<div class="rhv-key">Context: <span class="rhv-tok rhv-needle">needle</span>, blue = the head's
attention at this step, <span class="rhv-tok rhv-top">outlined</span> = its top key. A head copies
when its top key lies in the needle and holds the token being generated.</div>
<div class="rhv-panels"></div>
<script type="application/json" class="rhv-data">{data}</script>
<script>{_JS % {"id": box}}</script></div>"""

    def _repr_html_(self) -> str:
        return self.fragment()

    def to_html(self, title: str | None = None) -> str:
        """A standalone page."""
        heads = ", ".join(f"L{la}H{h}" for la, h in self.trace.heads)
        title = html.escape(title or f"rhlens: {heads} on {self.trace.probe.get('key', 'a probe')}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
                f"</head><body style=\"margin:16px\">\n{self.fragment()}\n</body></html>\n")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path


def head_view(trace) -> HeadView:
    """The view of a :class:`~rhlens.trace.HeadTrace` (display it, or ``.save("view.html")``)."""
    return HeadView(trace)
