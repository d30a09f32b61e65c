"""The decode engine that detection, ablation, NIAH sweeps and CoT runs share.

Why it exists: TransformerBridge re-implements every attention layer as matmul + softmax so
that ``hook_pattern`` can fire; over a long prompt that is an O(n²) pattern per head (8K
tokens of a 7B model: 38 GB). Retrieval scoring needs patterns only at decode steps, where
the single query makes them ``[batch, head, 1, keys]``. So the engine prefills the prompt
without patterns, then decodes token by token with every TransformerLens attention hook
firing at every step.

Reading order (each module names its one job in its first line):

* :mod:`~rhlens.engine.hooks`: phases (:func:`current_phase`), the step state hooks read
  (:class:`StepState`, :func:`current_step`) and :class:`EngineHook`, the hook type whose
  declarations (phase, read-only, flat head edit) open the fast paths below;
* :mod:`~rhlens.engine.bridge`: the HF model inside the bridge, and swapping the bridge out;
* :mod:`~rhlens.engine.native`: the prefill, through HF's own SDPA attention (bridge hooks on
  q/k/v/z still fire) or, when no hook acts during it, the plain HF modules;
* :mod:`~rhlens.engine.kv`: preallocated KV buffers (a decode step writes one position) and
  the pool that reuses a prefix shared with the previous prompt (cut back to a prefill-chunk
  boundary, so reuse computes exactly what the prompt alone computes);
* :mod:`~rhlens.engine.policy`: :class:`KernelPolicy`, the lean step's kernel choices, fixed
  for a run, resolved per device and recorded in the run's header;
* :mod:`~rhlens.engine.attention` and :mod:`~rhlens.engine.lean`: the lean decode step of
  Llama-family models (the same tensor operations on the same weights, without HF's and the
  bridge's per-module Python; bit-identical to the bridge's step in float32), chosen when only
  attention hooks are attached, else the bridge's own step;
* :mod:`~rhlens.engine.captured`: the captured decode step (static buffers, the position on
  the device, one CUDA graph replayed per step; the retrieval recorder and ``ablate_heads``
  masks run from their :class:`TopKeySpec` / :class:`HeadEditSpec` as tensor ops), chosen
  on a GPU when every attached hook has such a spec (``KernelPolicy.decode``);
* :mod:`~rhlens.engine.runner`: :class:`GenerationConfig`, :func:`generate` and
  :func:`generate_many` (prefix reuse, prompts of equal length decoded together, each
  bit-identical to itself answered alone).
"""

from rhlens.engine.attention import DirectHooks as _DirectHooks  # noqa: F401
from rhlens.engine.attention import LeanAttention as _LeanAttention  # noqa: F401
from rhlens.engine.attention import pad_rows as _pad_rows  # noqa: F401
from rhlens.engine.attention import split_av as _split_av  # noqa: F401
from rhlens.engine.bridge import hf_model, native_modules
from rhlens.engine.bridge import new_cache as _new_cache  # noqa: F401
from rhlens.engine.bridge import set_attn_impl as _set_attn_impl  # noqa: F401
from rhlens.engine.hooks import (
    EngineHook,
    HeadEditSpec,
    HookPair,
    Phase,
    StepState,
    TopKeySpec,
    current_phase,
    current_step,
    phase,
)
from rhlens.engine.kv import KVPool as _KVPool  # noqa: F401
from rhlens.engine.kv import plain_cache_layers as _plain_cache_layers  # noqa: F401
from rhlens.engine.lean import LeanDecoder as _LeanDecoder  # noqa: F401
from rhlens.engine.lean import lean_ok as _lean_ok  # noqa: F401
from rhlens.engine.native import (  # noqa: F401
    DEFAULT_PREFILL_CHUNK,
    GPU_PREFILL_CHUNK,
    _register_impl,
    _rhlens_sdpa,
    native_attention,
    prefill,
)
from rhlens.engine.native import prefill_is_silent as _prefill_is_silent  # noqa: F401
from rhlens.engine.policy import KernelPolicy
from rhlens.engine.runner import (
    Generation,
    GenerationConfig,
    chat_prompt,
    generate,
    generate_many,
    model_tokenizer,
    release_buffers,
)
from rhlens.engine.runner import Runner as _Runner  # noqa: F401
from rhlens.engine.runner import decode_step as _decode_step  # noqa: F401

# The underscored names: private, kept importable from here for benchmarks and tests.
__all__ = [
    "DEFAULT_PREFILL_CHUNK",
    "GPU_PREFILL_CHUNK",
    "EngineHook",
    "Generation",
    "GenerationConfig",
    "HeadEditSpec",
    "HookPair",
    "KernelPolicy",
    "Phase",
    "StepState",
    "TopKeySpec",
    "chat_prompt",
    "current_phase",
    "current_step",
    "generate",
    "generate_many",
    "hf_model",
    "model_tokenizer",
    "native_attention",
    "native_modules",
    "phase",
    "prefill",
    "release_buffers",
]
