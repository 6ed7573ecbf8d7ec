"""Training and held-out data: synthetic prototypes, ImageFolder, CIFAR-10."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, UsageError
from .options import FinetuneOptions
from .report import _first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_BATCHES = 8  # a synthetic epoch, in batches, unless ``synthetic:N`` says how many images
# Synthetic images carry an 8x8 signal, so their size tests nothing the forward pass does not: on the
# CPU the default run trains on them at this size (a quarter of 224's pixels: the default
# resnet18 run answers in about half a minute instead of two) when the model takes it, and the
# forward pass is still checked at the architecture's own size. ``--image-size`` trains at any size.
CPU_SYNTHETIC_SIZE = 112


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


def training_size(model: Any, opts: FinetuneOptions, device: Any, size: int, channels: int) -> int:
    """The image size to train at: :data:`CPU_SYNTHETIC_SIZE` for the CPU's default synthetic run, else ``size``."""
    import torch

    from .probe import _probe_forward

    if (
        opts.image_size is not None
        or not opts.data.startswith("synthetic")
        or device.type != "cpu"
        or size <= CPU_SYNTHETIC_SIZE
    ):
        return size
    small = CPU_SYNTHETIC_SIZE
    x = torch.randn(2, channels, small, small, generator=torch.Generator().manual_seed(opts.seed))
    error, _ = _probe_forward(model, x)
    return size if error is not None else small  # a model that needs its own size (ViT) trains at it


def _input_channels(model: Any) -> int:
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 3


class SyntheticImages:
    """Deterministic labelled images: a low-resolution prototype per class, upsampled, plus noise.

    ``split`` 0 is the training set and 1 the held-out one: both come from the same class
    prototypes (drawn from ``seed``), with their own labels and noise, so an image of the held-out
    split is a new sample of a class the model was trained on. Map-style (``len`` and ``[i]``),
    so a ``DistributedSampler`` can shard it.
    """

    def __init__(self, images: int, size: int, channels: int, classes: int, seed: int, split: int = 0) -> None:
        import torch

        self.images, self.size, self.seed, self.split, self.classes = images, size, seed, split, classes
        self.prototypes = torch.randn(classes, channels, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.images

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch
        import torch.nn.functional as F

        if not 0 <= i < self.images:
            raise IndexError(i)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.split) * 1_000_003 + i)
        label = int(torch.randint(0, self.classes, (), generator=gen))
        signal = F.interpolate(self.prototypes[label : label + 1], size=(self.size, self.size), mode="nearest")[0]
        return signal + torch.randn(signal.shape, generator=gen), label


@dataclass(frozen=True)
class Datasets:
    train: Any
    heldout: Any
    classes: int  # 0 for synthetic data: it takes the model's number of logits


def make_datasets(
    opts: FinetuneOptions, size: int, channels: int, classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Datasets:
    """The training and held-out datasets ``--data`` names (map-style, so they can be sharded)."""
    kind, _, arg = opts.data.partition(":")
    if kind == "synthetic":
        try:
            images = int(arg) if arg else opts.batch_size * SYNTHETIC_BATCHES
        except ValueError:
            raise UsageError(f"--data {opts.data}: synthetic:N takes a number of images") from None
        if images < 1:
            raise UsageError(f"--data {opts.data}: needs at least 1 image")
        heldout_images = opts.batch_size * opts.eval_batches
        return Datasets(
            SyntheticImages(images, size, channels, classes, opts.seed, split=0),
            SyntheticImages(heldout_images, size, channels, classes, opts.seed, split=1),
            0,
        )
    if kind not in ("imagefolder", "cifar10") or not arg:
        raise UsageError(f"--data {opts.data!r}: expected synthetic, synthetic:N, imagefolder:DIR or cifar10:DIR")
    from torchvision import transforms

    steps = [transforms.Resize((size, size))]
    if channels == 1:
        steps.append(transforms.Grayscale())
    steps += [
        transforms.ToTensor(),
        transforms.Normalize(mean[:channels] if channels < 3 else mean, std[:channels] if channels < 3 else std),
    ]
    transform = transforms.Compose(steps)
    if kind == "imagefolder":
        return Datasets(*_imagefolder(arg, transform, opts.seed))
    return Datasets(*_cifar10(arg, transform))


def make_loaders(
    data: Datasets, batch_size: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1
) -> tuple[Any, Any]:
    """Training and held-out loaders; with ``world`` > 1 each rank gets its shard (``DistributedSampler``).

    Real images are shuffled (by ``seed``); synthetic ones are already in random order and keep it,
    so that the first batch (the overfit check's) is the same whatever the options.
    """
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    if world > 1:
        sampler: Any = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        held_sampler: Any = DistributedSampler(data.heldout, num_replicas=world, rank=rank, shuffle=False)
        return (
            DataLoader(data.train, batch_size=batch_size, sampler=sampler),
            DataLoader(data.heldout, batch_size=batch_size, sampler=held_sampler),
        )
    gen = torch.Generator().manual_seed(seed)
    return (
        DataLoader(data.train, batch_size=batch_size, shuffle=shuffle, generator=gen if shuffle else None),
        DataLoader(data.heldout, batch_size=batch_size),
    )


def _imagefolder(root: str, transform: Any, seed: int) -> tuple[Any, Any, int]:
    import torch
    from torchvision import datasets

    if not os.path.isdir(root):
        raise InputError(f"--data imagefolder:{root}: no such directory")
    try:
        full = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise InputError(
            f"--data imagefolder:{root}: {_first_line(exc)}", hint="it needs one sub-directory of images per class"
        ) from None
    if len(full) < 2:
        raise InputError(f"--data imagefolder:{root}: {len(full)} image(s); at least 2 are needed to hold one out")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, len(full) // 5)
    return (torch.utils.data.Subset(full, order[held:]), torch.utils.data.Subset(full, order[:held]), len(full.classes))


def _cifar10(root: str, transform: Any) -> tuple[Any, Any, int]:
    from torchvision import datasets

    try:
        train = datasets.CIFAR10(root, train=True, transform=transform, download=False)
        test = datasets.CIFAR10(root, train=False, transform=transform, download=False)
    except (RuntimeError, OSError):
        raise _cifar10_error(root) from None
    return train, test, 10


def _cifar10_error(root: str) -> InputError:
    """Why torchvision refused ``root``: files absent, some missing, or present but failing its MD5 check."""
    from torchvision import datasets
    from torchvision.datasets.utils import check_integrity

    where = f"--data cifar10:{root}"
    folder = os.path.join(root, datasets.CIFAR10.base_folder)
    files = [
        *datasets.CIFAR10.train_list,
        *datasets.CIFAR10.test_list,
        [datasets.CIFAR10.meta["filename"], datasets.CIFAR10.meta["md5"]],
    ]
    missing = [name for name, _ in files if not os.path.isfile(os.path.join(folder, name))]
    source = "https://www.cs.toronto.edu/~kriz/cifar.html; ckpt never downloads"
    if len(missing) == len(files):
        return InputError(f"{where}: CIFAR-10 not found there", hint=f"it needs cifar-10-batches-py/ from {source}")
    if missing:
        return InputError(
            f"{where}: cifar-10-batches-py/ is incomplete: no {', '.join(missing)}",
            hint=f"extract the whole cifar-10-python.tar.gz from {source}",
        )
    bad = [name for name, md5 in files if not check_integrity(os.path.join(folder, name), md5)]
    return InputError(
        f"{where}: the CIFAR-10 files are there but fail torchvision's integrity check "
        f"(MD5 of {', '.join(bad) or 'the files'})",
        hint=f"they are damaged or not the official ones: extract cifar-10-python.tar.gz again from {source}",
    )
