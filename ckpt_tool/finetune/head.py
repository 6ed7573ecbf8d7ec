"""Finding and replacing the classification head."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .report import HeadChange

# where the families keep their classification head, most specific first
HEAD_NAMES = ("fc", "classifier", "heads", "head")


def head_outputs(model: Any, head: str) -> int | None:
    """How many outputs the head layer ``head`` has (a Linear's out_features, a Conv2d's out_channels)."""
    if not head:
        return None
    layer = model.get_submodule(head)
    outputs = getattr(layer, "out_features", getattr(layer, "out_channels", None))
    return outputs if isinstance(outputs, int) else None


def find_head(model: Any, name: str | None) -> str:
    """The dotted path of the final layer of the classification head ("fc", "classifier.6", "heads.head")."""
    from torch import nn

    if name is not None:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(
                f"--head {name}: the model has no such module (top-level: "
                f"{', '.join(n for n, _ in model.named_children())})"
            ) from None
        root = name
    else:
        children = dict(model.named_children())
        root = next((n for n in HEAD_NAMES if n in children), "")
        if not root:
            return ""
        module = children[root]
    layers = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UsageError(f"--head {root}: holds no Linear or Conv2d layer to replace")
    return ".".join(p for p in (root, layers[-1]) if p)


def replace_head(model: Any, num_classes: int, name: str | None = None) -> HeadChange:
    """Swap the head's final Linear/Conv2d for a fresh one with ``num_classes`` outputs (in place).

    Example:
        >>> import torchvision
        >>> replace_head(torchvision.models.mobilenet_v3_small(weights=None), 10).module
        'classifier.3'
    """
    from torch import nn

    path = find_head(model, name)
    if not path:
        raise UsageError(
            f"--num-classes: no classification head found (looked for {', '.join(HEAD_NAMES)})",
            hint="name it with --head MODULE",
        )
    old, new = _swap_layer(model, path, num_classes)
    # GoogLeNet / Inception auxiliary classifiers (aux1, aux2, AuxLogits) train beside the main head
    aux = []
    for child, module in model.named_children():
        layers = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if child.lower().startswith("aux") and layers:
            aux.append(f"{child}.{layers[-1]}" if layers[-1] else child)
            _swap_layer(model, aux[-1], num_classes)
    return HeadChange(path, _layer_text(old), _layer_text(new), tuple(aux))


def _swap_layer(model: Any, path: str, num_classes: int) -> tuple[Any, Any]:
    from torch import nn

    old = model.get_submodule(path)
    if isinstance(old, nn.Linear):
        new: Any = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(
            old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
        )
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    return old, new


def _layer_text(layer: Any) -> str:
    return f"{type(layer).__name__}({layer.extra_repr()})"
