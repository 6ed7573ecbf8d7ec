"""Shape flow: does the target run at all? Its forward pass on the meta device, with a dummy input.

Keys and shapes say whether a state dict *loads*; they cannot see a model whose layers do not fit
each other (densenet121's features give 1024 channels to a new head ``Linear(800, 500)``): such a
file loads and cannot run. The target is built on the meta device (no memory for weights, no real
compute), given the planned state's shapes where they differ from its own, and called on an empty
input of the architecture's default size. Forward hooks record which module finished last and which
module was running when a size check failed, so the answer names both, with both sizes.

A forward that cannot run on the meta device (``.item()``, ``if x.sum() > 0``, ``nonzero``) is
*not checked*, with the reason; so is a target without torch. Results are cached beside the
target's signature, so a warm ``ckpt diff`` imports no torch.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from ..arch import TargetSignature, cache_slot
from ..cache import read_cached, write_cached
from ..errors import CkptError, UsageError

PASSES, FAILS, NOT_CHECKED, TRUSTED = "passes", "fails", "not_checked", "trusted"
SCHEMA = 1
# the words of torch's size checks; any other error is taken for one the meta device cannot run
_SHAPE_WORDS = re.compile(
    r"size|shape|dimension|channel|broadcast|must match|mat1|reduction dim|expected input", re.IGNORECASE
)
_NOT_ON_META = re.compile(r"meta|device|no data|data-dependent", re.IGNORECASE)
DEFAULT_IMAGE = 224
DEFAULT_TOKENS = 16


@dataclass(frozen=True)
class ShapeFlow:
    """The forward pass of the target on the meta device, as the planned state would leave it.

    ``status``: ``passes`` (it ran: ``output_shape``), ``fails`` (``message`` names the module that
    produced the last output, ``producer``, and the one that could not take it, ``consumer``, with
    ``actual`` and ``expected`` sizes), ``not_checked`` (``message`` says why) or ``trusted``
    (torchvision's own classifier at its defaults, answered from the shipped table: not run, so
    that no torch is imported; ``--input-shape`` runs it).
    """

    status: str
    message: str = ""
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    producer: str | None = None
    producer_shape: tuple[int, ...] | None = None
    consumer: str | None = None
    consumer_type: str | None = None
    consumer_input: tuple[int, ...] | None = None
    expected: int | None = None
    actual: int | None = None
    cache: str = "off"

    @property
    def fails(self) -> bool:
        return self.status == FAILS

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,64,64"`` -> ``(1, 3, 64, 64)``: the dummy input, batch dimension included."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: not a comma-separated list of sizes (1,3,224,224)") from None
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"--input-shape {text!r}: every size must be 1 or more")
    return shape


def shape_flow(
    target: TargetSignature,
    *,
    state: Mapping[str, tuple[int, ...]] | None = None,
    input_shape: tuple[int, ...] | None = None,
    use_cache: bool = True,
) -> ShapeFlow:
    """Run ``target``'s forward pass on the meta device with the shapes of ``state`` (the planned state).

    Example:
        >>> from ckpt_tool.arch import target_signature
        >>> flow = shape_flow(target_signature("my_models.py:broken"))
        >>> flow.status, flow.producer, flow.consumer, flow.actual, flow.expected
        ('fails', 'features', 'classifier.fc1', 16, 32)
    """
    from ..torch_extra import buildable

    overrides = {
        k: tuple(s) for k, s in (state or {}).items() if k in target.tensors and tuple(s) != target.tensors[k].shape
    }
    if target.cache == "table" and input_shape is None and not overrides:
        return ShapeFlow(
            TRUSTED,
            f"{target.spec} is torchvision's own model at its defaults (answered from ckpt's "
            "table without torch: not run; --input-shape runs it)",
        )
    if not buildable(target.spec):
        return ShapeFlow(NOT_CHECKED, "torch is not installed (pip install 'ckpt-tool[torch]')")
    extra = {
        "schema": SCHEMA,
        "input_shape": list(input_shape or ()),
        "overrides": sorted([k, list(s)] for k, s in overrides.items()),
    }
    slot = cache_slot("shapeflow", target.spec, dict(target.arch_args), extra) if use_cache else None
    if slot is not None:
        body, status = read_cached(*slot)
        if body is not None:
            try:
                return _from_json(body, "hit")
            except (KeyError, TypeError, ValueError):
                pass
    flow = run_flow(target.spec, dict(target.arch_args), overrides, input_shape)
    if slot is not None:
        write_cached(slot[0], slot[1], {k: v for k, v in flow.to_json().items() if k != "cache"})
        flow = replace(flow, cache="built")
    return flow


def _from_json(body: dict[str, Any], cache: str) -> ShapeFlow:
    shapes = {"input_shape", "output_shape", "producer_shape", "consumer_input"}
    values: dict[str, Any] = {f.name: body[f.name] for f in fields(ShapeFlow) if f.name != "cache"}
    values.update({k: tuple(values[k]) for k in shapes if values[k] is not None})
    return ShapeFlow(**values, cache=cache)


def run_flow(
    spec: str,
    arch_args: dict[str, Any],
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> ShapeFlow:
    """Build ``spec`` on the meta device, give it ``overrides`` (key -> shape), call it on an empty input."""
    import torch

    from ..arch import build_model

    try:
        model = build_model(spec, arch_args, device="meta", fallback="cpu").to("meta").eval()
    except CkptError as exc:
        return ShapeFlow(NOT_CHECKED, f"the target cannot be built ({exc})")
    for key, size in (overrides or {}).items():
        _set_shape(model, key, size)
    default = default_input(model)
    if input_shape is None and default is None:
        return ShapeFlow(
            NOT_CHECKED,
            f"no default input size is known for {spec} (its first layer is not a "
            "convolution, a linear layer or an embedding); give --input-shape",
        )
    shape = input_shape if input_shape is not None else default[0] if default else None
    assert shape is not None
    ids = default is not None and default[1]
    x = torch.zeros(shape, dtype=torch.long, device="meta") if ids else torch.empty(shape, device="meta")
    tracer = _Tracer(model)
    try:
        # whatever the model prints goes to stderr: stdout is the report's
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the model's own code can raise anything
        return tracer.explain(exc, tuple(shape))
    finally:
        tracer.remove()
    return ShapeFlow(PASSES, f"{_shape_str(shape)} -> {_shape_str(_first_shape(out))}", tuple(shape), _first_shape(out))


def default_input(model: Any) -> tuple[tuple[int, ...], bool] | None:
    """The architecture's dummy input ``(shape, integer ids?)`` from its first layer, or ``None``.

    A first convolution gives an image (``[1, C, 224, 224]``, or the size the model was built for:
    torchvision's ``image_size``, timm's ``patch_embed.img_size`` or ``pretrained_cfg``); an
    embedding gives 16 token ids; a linear layer a ``[1, in_features]`` vector.
    """
    from torch import nn

    first = next(
        (m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding))), None
    )
    if isinstance(first, nn.Embedding):
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        return (1, min(DEFAULT_TOKENS, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_TOKENS), True
    if isinstance(first, nn.Linear):
        return (1, first.in_features), False
    if isinstance(first, (nn.Conv3d, nn.ConvTranspose3d)):
        return (1, first.in_channels, 16, 112, 112), False  # torchvision's video models: 16 frames of 112x112
    if isinstance(first, (nn.Conv1d, nn.ConvTranspose1d)):
        return (1, first.in_channels, DEFAULT_IMAGE), False
    if isinstance(first, nn.modules.conv._ConvNd):
        return (1, first.in_channels, *_image_size(model)), False
    return None


def _image_size(model: Any) -> tuple[int, int]:
    size: Any = getattr(model, "image_size", None)
    if size is None:
        size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = tuple(cfg.get("input_size", ()))[1:] or None
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(d, int) for d in size):
        return int(size[0]), int(size[1])
    return DEFAULT_IMAGE, DEFAULT_IMAGE


def _set_shape(model: Any, key: str, shape: tuple[int, ...]) -> None:
    import torch

    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters and module._parameters[leaf] is not None:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(
            torch.empty(shape, dtype=old.dtype, device="meta"), old.requires_grad
        )
    elif leaf in module._buffers and module._buffers[leaf] is not None:
        module._buffers[leaf] = torch.empty(shape, dtype=module._buffers[leaf].dtype, device="meta")


@dataclass
class _Call:
    name: str
    module: Any
    input_shape: tuple[int, ...] | None
    after: tuple[str, tuple[int, ...] | None] | None  # the module that finished last before this one started


class _Tracer:
    """Forward hooks on every module: a stack of the running calls, and the module that finished last."""

    def __init__(self, model: Any) -> None:
        self.stack: list[_Call] = []
        self.last: tuple[str, tuple[int, ...] | None] | None = None
        self.handles: list[Any] = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Callable[[Any, tuple[Any, ...]], None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            self.stack.append(_Call(name, module, _first_shape(args), self.last))

        return hook

    def _leave(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        if self.stack:
            self.last = (self.stack.pop().name, _first_shape(output))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def explain(self, exc: BaseException, input_shape: tuple[int, ...]) -> ShapeFlow:
        text = (str(exc).strip().splitlines() or [""])[0]
        call = self.stack[-1] if self.stack else None
        where = f"{type(exc).__name__}" + (f" in {_label(call)}" if call is not None else "")
        if isinstance(exc, NotImplementedError) or (_NOT_ON_META.search(text) and not _SHAPE_WORDS.search(text)):
            return ShapeFlow(NOT_CHECKED, f"the forward cannot run on the meta device ({where}: {text})", input_shape)
        if call is None:
            return ShapeFlow(NOT_CHECKED, f"the forward failed ({where}: {text})", input_shape)
        producer, produced = call.after if call.after is not None else ("the input", input_shape)
        rule = next((r for kind, r in _rules() if isinstance(call.module, kind)), None)
        sizes = rule(call.module, call.input_shape) if rule is not None and call.input_shape else None
        if sizes is not None and sizes[0] != sizes[1]:
            expected, actual, attr = sizes
            message = (
                f"{producer or 'the model'} outputs {_size_words(produced, actual)}, but {_label(call)} "
                f"expects {expected} ({attr}={expected}; its input is {_shape_str(call.input_shape)})"
            )
            if producer == "the input":
                message = message.replace("the input outputs", "the input has", 1)
            return ShapeFlow(
                FAILS,
                message,
                input_shape,
                None,
                producer,
                produced,
                call.name,
                type(call.module).__name__,
                call.input_shape,
                expected,
                actual,
            )
        if _SHAPE_WORDS.search(text):
            return ShapeFlow(
                FAILS,
                f"{_label(call)} cannot take the output of {producer or 'the model'} {_shape_str(produced)}: {text}",
                input_shape,
                None,
                producer,
                produced,
                call.name,
                type(call.module).__name__,
                call.input_shape,
            )
        return ShapeFlow(NOT_CHECKED, f"the forward failed ({where}: {text})", input_shape)


def _label(call: _Call) -> str:
    kind = type(call.module).__name__
    return f"{call.name} ({kind})" if call.name else f"the {kind} model itself"


def _size_words(shape: tuple[int, ...] | None, size: int) -> str:
    """How a producer's output shows the size a consumer got: ``1024 channels`` of ``[1, 1024, 7, 7]``."""
    if shape is None:
        return str(size)
    if len(shape) >= 3 and shape[1] == size:
        return f"{size} channels"
    if shape and shape[-1] == size:
        return f"{size} features"
    return f"{_shape_str(shape)}"


# the sizes are read from the tensors (the planned state's shapes), not from the attributes the layer was built with


def _linear(m: Any, x: tuple[int, ...]) -> tuple[int, int, str]:
    return int(m.weight.shape[1]), x[-1], "in_features"


def _conv(m: Any, x: tuple[int, ...]) -> tuple[int, int, str]:
    batched = len(x) == len(m.kernel_size) + 2
    size = int(m.weight.shape[0]) if m.transposed else int(m.weight.shape[1]) * m.groups
    return size, x[1] if batched else x[0], "in_channels"


def _channels(m: Any) -> int:
    for name in ("weight", "running_mean"):
        t = getattr(m, name, None)
        if t is not None:
            return int(t.shape[0])
    return int(getattr(m, "num_features", getattr(m, "num_channels", 0)))


def _norm(m: Any, x: tuple[int, ...]) -> tuple[int, int, str]:
    return _channels(m), x[1] if len(x) > 1 else x[0], "num_features"


def _group_norm(m: Any, x: tuple[int, ...]) -> tuple[int, int, str]:
    return _channels(m), x[1] if len(x) > 1 else x[0], "num_channels"


def _layer_norm(m: Any, x: tuple[int, ...]) -> tuple[int, int, str]:
    size = int(m.weight.shape[-1]) if m.weight is not None else m.normalized_shape[-1]
    return size, x[-1], "normalized_shape"


def _attention(m: Any, x: tuple[int, ...]) -> tuple[int, int, str]:
    return m.embed_dim, x[-1], "embed_dim"


def _rules() -> list[tuple[type, Callable[[Any, tuple[int, ...]], tuple[int, int, str]]]]:
    """The size each layer type checks: (what it expects, what it got, the attribute that says so)."""
    from torch import nn

    return [
        (nn.Linear, _linear),
        (nn.modules.conv._ConvNd, _conv),
        (nn.modules.batchnorm._NormBase, _norm),
        (nn.GroupNorm, _group_norm),
        (nn.LayerNorm, _layer_norm),
        (nn.MultiheadAttention, _attention),
    ]


def _first_shape(value: Any) -> tuple[int, ...] | None:
    """The shape of the first tensor in an output (a tensor, a tuple, a dict, a transformers ModelOutput)."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, type):
        return tuple(int(d) for d in shape)
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        found = _first_shape(item)
        if found is not None:
            return found
    return None


def _shape_str(shape: tuple[int, ...] | None) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "?"
