"""One batch through the model with hooks: shape errors and non-finite outputs named by module."""

from __future__ import annotations

from typing import Any

from ..checkpoint import in_module
from ..text import shape_str
from .report import _first_line


def _probe_forward(model: Any, x: Any) -> tuple[str | None, int]:
    """Run one batch with hooks; on failure, name the module that ran last and the one that failed."""
    import torch

    entered: list[tuple[str, Any, tuple[Any, ...]]] = []
    done: list[tuple[str, Any]] = []

    def pre(name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            entered.append((name, module, tuple(_shape(a) for a in args)))

        return hook

    nonfinite: list[tuple[str, Any]] = []  # the first module (in the order they finished) with NaN/Inf output

    def post(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            entered.pop()
            done.append((name, _shape(output)))
            if not nonfinite and not _finite(output):
                nonfinite.append((name, module))

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _logits(model(x))
    except Exception as exc:  # noqa: BLE001 - user models fail in every way; we describe it
        return _describe_failure(entered, done, exc), 0
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return f"the model returned {_shape(out) or type(out).__name__}, not [batch, classes] logits", 0
    if not _finite(out):
        where = (
            f"first in {nonfinite[0][0]} ({type(nonfinite[0][1]).__name__})"
            if nonfinite
            else "in the model's own code, outside any submodule"
        )
        return f"the logits hold NaN/Inf; non-finite values appear {where}", int(out.shape[1])
    return None, int(out.shape[1])


def _finite(value: Any) -> bool:
    """Whether every floating tensor in ``value`` (a tensor, or a tuple/list/dict of them) is finite."""
    import torch

    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    logits = getattr(value, "logits", None)
    return logits is None or _finite(logits)


def _describe_failure(
    entered: list[tuple[str, Any, tuple[Any, ...]]], done: list[tuple[str, Any]], exc: Exception
) -> str:
    error = f"{type(exc).__name__}: {_first_line(exc)}"
    if not entered:
        return f"forward failed outside any submodule: {error}"
    name, module, inputs = entered[-1]
    got = inputs[0] if inputs else None
    want = _expected_input(module)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    before = next(((n, s) for n, s in reversed(done) if n not in ancestors and not in_module(n, name)), None)
    source = f"{before[0]} outputs {shape_str(before[1])}" if before else "the input"
    layer = f"{name} ({type(module).__name__})"
    if want:
        return f"{source}, but {layer} expects {want} and receives {shape_str(got)} ({error})"
    return f"{source}; {layer} fails on its input {shape_str(got)} ({error})"


def _expected_input(module: Any) -> str | None:
    from torch import nn

    if isinstance(module, nn.Linear):
        return f"{module.in_features} input features"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{module.in_channels} input channels"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{module.num_features} channels"
    if isinstance(module, nn.LayerNorm):
        return f"last dimensions {list(module.normalized_shape)}"
    return None


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(int(d) for d in shape)
    if isinstance(value, (tuple, list)) and value:
        return _shape(value[0])
    return None


AUX_WEIGHT = 0.3  # GoogLeNet's weight for its auxiliary classifiers' losses


def _loss(out: Any, labels: Any) -> Any:
    """Cross-entropy of the logits, plus the auxiliary classifiers' (GoogLeNet, Inception) when the model returns them."""
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(_logits(out), labels)
    if isinstance(out, tuple) and not isinstance(out, torch.Tensor):
        for aux in out[1:]:
            if isinstance(aux, torch.Tensor) and aux.dim() == 2:
                loss = loss + AUX_WEIGHT * F.cross_entropy(aux, labels)
    return loss


def _logits(out: Any) -> Any:
    """Classification logits from what models return: a tensor, (logits, aux...) or an object with ``logits``."""
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out
