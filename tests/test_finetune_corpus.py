"""finetune-check's load on the real-world layouts of tests/corpus.py: the model torch's own load gives.

For every layout, finetune's load (the layout's --key and --strip-prefix, no head change) must leave
the model exactly as torch's ``load_state_dict`` of the source leaves it (the prefix stripped by
torch's own helper, ``_metadata`` kept; a tied alias the source left out re-tied from its partner
as safetensors' ``load_model`` does), with nothing missing, unexpected or mismatched.
"""

from __future__ import annotations

from typing import Any

import pytest
from corpus import LAYOUTS, build_model, source_state
from migrate_helpers import signature_cache_fixture  # noqa: F401 - fixtures are found by name
from test_corpus import renamed, same_value


@pytest.mark.parametrize("name", LAYOUTS)
def test_finetune_loads_every_layout_as_torch_does(corpus: Any, name: str) -> None:
    import torch

    from ckpt_tool.arch import build_model as ckpt_build
    from ckpt_tool.finetune import FinetuneOptions
    from ckpt_tool.finetune.load import _load_into, _migrated_state
    from ckpt_tool.reader import open_checkpoint

    layout = corpus.get(name)
    want = build_model(layout)
    result = want.load_state_dict(renamed(source_state(layout), layout.strip_prefix), strict=False)
    # the aliases a safetensors file leaves out share storage with their partner: loaded through it
    sd = {
        k: v
        for k, v in want.state_dict(keep_vars=True).items()
        if isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_quantized
    }
    # tied names give the same Parameter under both keys: compare storages key by key
    tied = {k for k, v in sd.items() if any(o != k and w.data_ptr() == v.data_ptr() for o, w in sd.items())}
    assert not (set(result.missing_keys) - tied) and not result.unexpected_keys, result  # the truth loads

    got = ckpt_build(layout.arch, dict(layout.arch_args), device="cpu")
    opts = FinetuneOptions(key=layout.key, strip_prefix=(layout.strip_prefix,) if layout.strip_prefix else ())
    state, operations, initialised = _migrated_state(open_checkpoint(layout.source, layout.key), opts, got)
    report = _load_into(got, state, (), operations, initialised)
    assert report.clean, (report.missing, report.unexpected, report.mismatched)
    mine = got.state_dict()
    changed = [k for k, v in want.state_dict().items() if not same_value(mine[k], v)]
    assert not changed, f"finetune's load differs from torch's: {changed}"
