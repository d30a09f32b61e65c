"""The flat face: ``import rhlens as rh`` gives the verbs a notebook needs, lazily."""

import subprocess
import sys
import types

import rhlens


def test_every_face_name_resolves_to_its_module_attribute():
    from rhlens import ablation, niah, retrieval

    assert rhlens.detect is retrieval.detect_retrieval_heads
    assert rhlens.niah_sweep is niah.niah_sweep
    assert rhlens.ablate_heads is ablation.ablate_heads
    for name in rhlens.__all__:
        assert getattr(rhlens, name) is not None, name
        # no face name is also a submodule: importing one would replace the other
        assert not isinstance(getattr(rhlens, name), types.ModuleType), name


def test_import_rhlens_pulls_in_neither_torch_nor_transformers():
    code = "import sys, rhlens; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
