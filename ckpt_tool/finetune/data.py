"""Training and held-out data: synthetic prototypes, ImageFolder, CIFAR-10."""

from __future__ import annotations

import os
from typing import Any

from ..errors import InputError, UsageError
from .options import FinetuneOptions
from .report import _first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_BATCHES = 8  # a synthetic epoch, in batches, unless ``synthetic:N`` says how many images


def _input_spec(arch: str, image_size: int | None) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Image size and normalisation: the architecture's default weights' transforms when torchvision knows it."""
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    if ":" not in arch:
        try:
            import torchvision

            preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
            size, mean, std = int(preset.crop_size[0]), tuple(preset.mean), tuple(preset.std)
        except Exception:  # noqa: BLE001 - models without weight enums keep the ImageNet defaults
            pass
    return image_size or size, mean, std


def _input_channels(model: Any) -> int:
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 3


class _Synthetic:
    """Deterministic batches: a low-resolution prototype per class plus noise, so the labels are learnable."""

    def __init__(self, images: int, batch: int, size: int, channels: int, classes: int, seed: int) -> None:
        import torch

        self.images, self.batch, self.size, self.seed = images, batch, size, seed
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(classes, channels, 8, 8, generator=gen)
        self.classes = classes

    def __len__(self) -> int:
        return -(-self.images // self.batch)

    def __iter__(self) -> Any:
        import torch
        import torch.nn.functional as F

        for i in range(len(self)):
            n = min(self.batch, self.images - i * self.batch)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            labels = torch.randint(0, self.classes, (n,), generator=gen)
            signal = F.interpolate(self.prototypes[labels], size=(self.size, self.size), mode="nearest")
            yield signal + torch.randn(signal.shape, generator=gen), labels


def _make_data(opts: FinetuneOptions, size: int, channels: int, classes: int, mean: tuple[float, ...],
               std: tuple[float, ...]) -> tuple[Any, Any, int]:
    kind, _, arg = opts.data.partition(":")
    if kind == "synthetic":
        try:
            images = int(arg) if arg else opts.batch_size * SYNTHETIC_BATCHES
        except ValueError:
            raise UsageError(f"--data {opts.data}: synthetic:N takes a number of images") from None
        if images < 1:
            raise UsageError(f"--data {opts.data}: needs at least 1 image")
        heldout_images = opts.batch_size * opts.eval_batches
        return (_Synthetic(images, opts.batch_size, size, channels, classes, opts.seed),
                _Synthetic(heldout_images, opts.batch_size, size, channels, classes, opts.seed + 1), 0)
    if kind not in ("imagefolder", "cifar10") or not arg:
        raise UsageError(f"--data {opts.data!r}: expected synthetic, synthetic:N, imagefolder:DIR or cifar10:DIR")
    import torch
    from torchvision import transforms

    steps = [transforms.Resize((size, size))]
    if channels == 1:
        steps.append(transforms.Grayscale())
    steps += [transforms.ToTensor(), transforms.Normalize(mean[:channels] if channels < 3 else mean,
                                                          std[:channels] if channels < 3 else std)]
    transform = transforms.Compose(steps)
    if kind == "imagefolder":
        train, heldout, n_classes = _imagefolder(arg, transform, opts.seed)
    else:
        train, heldout, n_classes = _cifar10(arg, transform)
    gen = torch.Generator().manual_seed(opts.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=opts.batch_size, shuffle=True, generator=gen)
    held = torch.utils.data.DataLoader(heldout, batch_size=opts.batch_size)
    return loader, held, n_classes


def _imagefolder(root: str, transform: Any, seed: int) -> tuple[Any, Any, int]:
    import torch
    from torchvision import datasets

    if not os.path.isdir(root):
        raise InputError(f"--data imagefolder:{root}: no such directory")
    try:
        full = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise InputError(f"--data imagefolder:{root}: {_first_line(exc)}",
                         hint="it needs one sub-directory of images per class") from None
    if len(full) < 2:
        raise InputError(f"--data imagefolder:{root}: {len(full)} image(s); at least 2 are needed to hold one out")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, len(full) // 5)
    return (torch.utils.data.Subset(full, order[held:]), torch.utils.data.Subset(full, order[:held]),
            len(full.classes))


def _cifar10(root: str, transform: Any) -> tuple[Any, Any, int]:
    from torchvision import datasets

    try:
        train = datasets.CIFAR10(root, train=True, transform=transform, download=False)
        test = datasets.CIFAR10(root, train=False, transform=transform, download=False)
    except (RuntimeError, OSError):
        raise InputError(f"--data cifar10:{root}: CIFAR-10 not found there",
                         hint="it needs cifar-10-batches-py/ from https://www.cs.toronto.edu/~kriz/cifar.html;"
                              " ckpt never downloads") from None
    return train, test, 10

