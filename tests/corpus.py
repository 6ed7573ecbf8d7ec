"""A corpus of real-world checkpoint layouts, each written by the library call that produces it.

Every builder writes one checkpoint under the directory it is given and returns a `Layout`: where
the checkpoint is, the ``--arch`` spec of the model it belongs to, the operations that map its keys
onto that model, and how torch itself reads its state dict (`source_state`, the truth that tests
compare ckpt's outputs with). Models are tiny and built in code with random weights (never the
target's seed-0 initialisation, so a tensor filled from the target's init cannot pass for a carried
one); nothing is downloaded.

Use the session fixture ``corpus`` (tests/conftest.py)::

    layout = corpus.get("gpt2-safetensors")
    model = build_model(layout)              # the right model, built by torch for the check
    truth = source_state(layout)             # the state dict as torch reads it
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from migrate_helpers import write_factories

# The target models, written once per corpus as ``factories.py`` so that ``--arch FILE:NAME`` and the
# builders below construct the very same modules (the tied embedding is migrate_helpers' ``tied``).
FACTORIES = '''
import torch
from torch import nn


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=32))


def mlp():
    """Linear, BatchNorm (buffers and num_batches_tracked), Linear."""
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _pattern(rows, cols):
    # a fixed sparsity pattern: torch copies a sparse CSR tensor only into one with as many elements
    return (torch.arange(rows * cols).reshape(rows, cols) % 3 == 0).float()


class Sparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("coo", _pattern(4, 4).to_sparse())
        self.register_buffer("csr", _pattern(3, 5).to_sparse_csr())


def sparse():
    return Sparse()


class Quantized(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("q8", torch.quantize_per_tensor(torch.zeros(4), 0.1, 3, torch.qint8))
        self.register_buffer("qu8", torch.quantize_per_tensor(torch.zeros(4), 0.2, 5, torch.quint8))
        self.register_buffer("q32", torch.quantize_per_tensor(torch.zeros(4), 0.3, 0, torch.qint32))
        self.register_buffer("qch", torch.quantize_per_channel(torch.zeros(2, 3), torch.tensor([0.1, 0.2]),
                                                               torch.tensor([1, 2]), 0, torch.qint8))


def quantized():
    return Quantized()


class Counter(nn.Module):
    """Keeps plain data in the state dict through get_extra_state (a ``_extra_state`` entry)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = {"calls": 0, "scale": 1.0}

    def get_extra_state(self):
        return dict(self.calls)

    def set_extra_state(self, state):
        self.calls = dict(state)


class WithExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Counter()
        self.head = nn.Linear(4, 2)


def extra_state():
    return WithExtraState()


class Stateful(nn.Module):
    """Tensor attributes that are neither parameters nor buffers (silero-vad's _state, _context)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.ones(4))
        self._state = torch.zeros(2, 4)
        self._context = torch.zeros(3)

    def forward(self, x):
        return self.lin(x) * self.scale + self._state.sum() + self._context.sum()


def stateful():
    return Stateful()


# the dtypes beyond float32 that torch and safetensors both have, each a buffer
LOW_PRECISION = ("float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                 "float8_e5m2fnuz", "float8_e8m0fnu", "complex64", "int8", "uint8", "int16", "uint16", "int32",
                 "uint32", "uint64", "bool")


class Dtypes(nn.Module):
    def __init__(self, names=LOW_PRECISION):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        for name in names:
            self.register_buffer("t_" + name, torch.zeros(2, 3, dtype=getattr(torch, name)))


def dtypes():
    return Dtypes()


def complex128():
    """complex128, which safetensors has a code for but the installed safetensors may not load."""
    return Dtypes(("complex128",))
'''

# How torch reads each kind of source (see `source_state`).
TORCH, HF_DIR, FSDP_FULL, TORCHSCRIPT = "torch", "hf-dir", "fsdp-full", "torchscript"


@dataclass(frozen=True)
class Layout:
    """One real-world checkpoint and what it should load into.

    Attributes:
        name: the corpus entry (``gpt2-sharded``).
        source: the path given to ckpt (a file, or a Hugging Face model directory).
        key: ``--key`` of the state dict inside the file (None: the file is the state dict).
        arch: ``--arch`` spec of the model the state dict belongs to (None: no model).
        strip_prefix: the wrapper prefix (``module.``) to strip before it loads into ``arch``.
        arch_options: further migrate options the ``arch`` load needs (``--fill-missing``, ``--arch-arg``).
        arch_args: keyword arguments ``build_model`` passes to the factory (mirrors ``--arch-arg``).
        objects: keys of the source state dict that hold more than a dense tensor (quantized, sparse,
            DTensor, plain data): a writer must carry them, convert them with a note or refuse them.
        truth: how torch reads the source (`TORCH`, `HF_DIR`, `FSDP_FULL`, `TORCHSCRIPT`).
        companion: a file torch can read that holds the truth where the source needs a process
            group to load (FSDP2's DTensors: their full tensors).
    """

    name: str
    source: str
    key: str | None = None
    arch: str | None = None
    strip_prefix: str | None = None
    arch_options: tuple[str, ...] = ()
    arch_args: tuple[tuple[str, Any], ...] = ()
    objects: tuple[str, ...] = ()
    truth: str = TORCH
    companion: str | None = None


class Corpus:
    """Builds each layout on first use under ``root`` and keeps it for the session."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._built: dict[str, Layout] = {}
        self._shared: dict[str, str] = {}
        self.factories = os.path.join(root, "factories.py")
        with open(self.factories, "w") as f:
            f.write(textwrap.dedent(FACTORIES))
        self.targets = write_factories(root)

    def get(self, name: str) -> Layout:
        if name not in self._built:
            directory = os.path.join(self.root, name)
            os.makedirs(directory, exist_ok=True)  # a build that failed may have left it
            self._built[name] = dataclasses.replace(BUILDERS[name](self, directory), name=name)
        return self._built[name]

    def shared(self, name: str, write: Callable[[str], str]) -> str:
        """A file several layouts read (one timm checkpoint holds the model and its EMA): written once."""
        if name not in self._shared:
            directory = os.path.join(self.root, name)
            os.makedirs(directory, exist_ok=True)
            self._shared[name] = write(directory)
        return self._shared[name]

    def spec(self, factory: str) -> str:
        return f"{self.module_path(factory)}:{factory}"

    def module_path(self, factory: str) -> str:
        return self.targets if factory == "tied" else self.factories


def factories_module(path: str) -> Any:
    """Import the corpus's ``factories.py`` (once per path)."""
    name = "ckpt_corpus_factories_" + str(abs(hash(path)))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(layout: Layout) -> Any:
    """The model ``layout.arch`` names, built by torch/timm/torchvision directly (not through ckpt)."""
    assert layout.arch is not None, layout.name
    kwargs = dict(layout.arch_args)
    if layout.arch.startswith("timm:"):
        import timm

        return timm.create_model(layout.arch[len("timm:") :], **kwargs)
    if ":" in layout.arch:
        path, factory = layout.arch.rsplit(":", 1)
        return getattr(factories_module(path), factory)(**kwargs)
    import torchvision

    return torchvision.models.get_model(layout.arch, weights=None, **kwargs)


@functools.cache
def source_state(layout: Layout) -> dict[str, Any]:
    """The state dict under ``layout.key`` as torch (or safetensors) reads the source, ``_metadata`` kept.

    Read once per layout: callers must not change it.
    """
    return _TRUTH[layout.truth](layout)


def _torch_truth(layout: Layout) -> dict[str, Any]:
    import argparse

    import torch

    # timm's CheckpointSaver pickles its argparse.Namespace beside the state dicts
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(layout.source, weights_only=True, map_location="cpu")
    for part in (layout.key or "").split("/"):
        if part:
            obj = obj[part]
    return obj


def _hf_truth(layout: Layout) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for name in sorted(os.listdir(layout.source)):
        path = os.path.join(layout.source, name)
        if name.endswith(".safetensors"):
            state.update(load_file(path))
        elif name.endswith(".bin"):
            state.update(torch.load(path, weights_only=True))
    return state


def _fsdp_truth(layout: Layout) -> dict[str, Any]:
    import torch

    assert layout.companion is not None
    return torch.load(layout.companion, weights_only=True)


def _torchscript_truth(layout: Layout) -> dict[str, Any]:
    import torch

    return dict(torch.jit.load(layout.source).state_dict())


_TRUTH: dict[str, Callable[[Layout], dict[str, Any]]] = {
    TORCH: _torch_truth,
    HF_DIR: _hf_truth,
    FSDP_FULL: _fsdp_truth,
    TORCHSCRIPT: _torchscript_truth,
}


def randomize(model: Any, seed: int) -> Any:
    """Give every floating parameter and buffer random values (in place: tied tensors stay tied).

    Integer buffers such as ``num_batches_tracked`` get a value no initialisation has.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.layout != torch.strided or tensor.is_quantized:
                continue  # the sparse and quantized builders set their own values
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.dtype == torch.int64:
                tensor.fill_(7)
    return model


def _step(model: Any, opt: Any, seed: int) -> None:
    """One optimizer step on random gradients: the optimizer holds state, the weights moved (no forward pass)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---- builders: (corpus, directory) -> Layout ---------------------------------------------------------


def _hf(factory: str, *, shard: bool = False, torch_bin: bool = False) -> Callable[[Corpus, str], Layout]:
    def build(corpus: Corpus, directory: str) -> Layout:
        _quiet_transformers()
        model = randomize(getattr(factories_module(corpus.factories), factory)(), seed=11)
        out = os.path.join(directory, "model")
        if torch_bin:
            # transformers 5 writes safetensors only; older releases' safe_serialization=False wrote
            # torch.save of the state dict save_pretrained keeps (tied aliases left out) as
            # pytorch_model.bin beside config.json: write that layout with the same call.
            import torch
            from safetensors.torch import load_file

            model.save_pretrained(out)
            kept = set(load_file(os.path.join(out, "model.safetensors")))
            os.remove(os.path.join(out, "model.safetensors"))
            torch.save(
                {k: v for k, v in model.state_dict().items() if k in kept}, os.path.join(out, "pytorch_model.bin")
            )
        else:
            model.save_pretrained(out, **({"max_shard_size": "20KB"} if shard else {}))
        return Layout(name="", source=out, arch=corpus.spec(factory), arch_options=("--fill-missing",), truth=HF_DIR)

    return build


def _torch_save(factory: str, *, seed: int, wrap: str | None = None) -> Callable[[Corpus, str], Layout]:
    """``torch.save(model.state_dict())`` of a factory's model, plain or under a wrapper's prefix."""

    def build(corpus: Corpus, directory: str) -> Layout:
        import torch

        model = randomize(getattr(factories_module(corpus.module_path(factory)), factory)(), seed=seed)
        objects: tuple[str, ...] = ()
        if factory == "sparse":
            with torch.no_grad():
                model.coo = (model.coo.to_dense() * 3.5).to_sparse()
                model.csr = (model.csr.to_dense() * -2.0).to_sparse_csr()
            objects = ("coo", "csr")
        elif factory == "quantized":
            model.q8 = torch.quantize_per_tensor(torch.randn(4), 0.05, 2, torch.qint8)
            model.qu8 = torch.quantize_per_tensor(torch.randn(4), 0.07, 9, torch.quint8)
            model.q32 = torch.quantize_per_tensor(torch.randn(4), 0.01, 0, torch.qint32)
            model.qch = torch.quantize_per_channel(
                torch.randn(2, 3), torch.tensor([0.3, 0.4]), torch.tensor([3, 4]), 0, torch.qint8
            )
            objects = ("q8", "qu8", "q32", "qch")
        elif factory in ("dtypes", "complex128"):
            gen = torch.Generator().manual_seed(seed)
            for buffer in model.buffers():
                # random bytes: every bit pattern of each dtype, NaNs included, must come through
                buffer.view(torch.uint8).copy_(
                    torch.randint(0, 256, buffer.view(torch.uint8).shape, dtype=torch.uint8, generator=gen)
                )
                if buffer.dtype == torch.bool:
                    buffer.copy_(buffer.view(torch.uint8) % 2 == 1)
            objects = ("t_complex128",) if factory == "complex128" else ()
        elif factory == "extra_state":
            model.block.calls = {"calls": 7, "scale": 0.5, "shape": (2, 3)}  # a tuple stays a tuple
            objects = ("block._extra_state",)
        prefix = None
        if wrap == "dp":
            model, prefix = torch.nn.DataParallel(model), "module."
        elif wrap == "compile":
            # torch.compile wraps without compiling until the first call; the state dict's layout
            # (the _orig_mod. prefix) is the same whether or not it ever ran
            model, prefix = torch.compile(model), "_orig_mod."
        path = os.path.join(directory, f"{factory}.pth")
        torch.save(model.state_dict(), path)
        return Layout(name="", source=path, arch=corpus.spec(factory), strip_prefix=prefix, objects=objects)

    return build


def _resnet18(corpus: Corpus, directory: str) -> Layout:
    import torch
    import torchvision

    path = os.path.join(directory, "resnet18.pth")
    torch.save(randomize(torchvision.models.resnet18(weights=None), seed=5).state_dict(), path)
    return Layout(name="", source=path, arch="resnet18")


def _torchvision_dp_nested(corpus: Corpus, directory: str) -> Layout:
    """A training script's file: DataParallel state dict under model_state_dict, optimizer, epoch."""
    import torch
    import torchvision

    model = torch.nn.DataParallel(randomize(torchvision.models.mobilenet_v3_small(num_classes=10), seed=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt, seed=3)
    path = os.path.join(directory, "checkpoint.pth")
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 4}, path)
    return Layout(
        name="",
        source=path,
        key="model_state_dict",
        arch="mobilenet_v3_small",
        strip_prefix="module.",
        arch_options=("--arch-arg", "num_classes=10"),
        arch_args=(("num_classes", 10),),
    )


def _lightning(corpus: Corpus, directory: str) -> Layout:
    """``Trainer.fit`` for two steps on CPU, then ``Trainer.save_checkpoint``."""
    import logging

    import lightning
    import torch

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    factories = factories_module(corpus.factories)

    class Module(lightning.LightningModule):
        def __init__(self, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = randomize(factories.mlp(), seed=13)

        def training_step(self, batch: Any, index: int) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1)]

    gen = torch.Generator().manual_seed(13)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,), generator=gen))
    trainer = lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        # Lightning's default callback: its state (paths, settings and a score tensor) sits in "callbacks"
        callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(directory, "saved"))],
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    path = os.path.join(directory, "last.ckpt")
    trainer.save_checkpoint(path)
    return Layout(name="", source=path, key="state_dict", arch=corpus.spec("mlp"), strip_prefix="model.")


def _timm(key: str) -> Callable[[Corpus, str], Layout]:
    """timm's ``CheckpointSaver`` with a ``ModelEmaV3``: ``state_dict`` or ``state_dict_ema`` of one file."""

    def build(corpus: Corpus, directory: str) -> Layout:
        return Layout(name="", source=corpus.shared("timm-saver", _timm_saver), key=key, arch="timm:test_resnet")

    return build


def _timm_saver(directory: str) -> str:
    import argparse

    import timm
    import torch
    from timm.utils import CheckpointSaver, ModelEmaV3

    model = randomize(timm.create_model("test_resnet"), seed=17)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, opt, seed=17)
    ema.update(model, step=1)  # the EMA now differs from the model
    saver = CheckpointSaver(
        model,
        opt,
        args=argparse.Namespace(model="test_resnet"),
        model_ema=ema,
        checkpoint_dir=directory,
        recovery_dir=directory,
    )
    saver.save_checkpoint(epoch=0, metric=0.5)
    return os.path.join(directory, "last.pth.tar")


def _fsdp2(corpus: Corpus, directory: str) -> Layout:
    """FSDP2 ``fully_shard`` (gloo, world size 1) in a subprocess: DTensor parameters, plain buffers."""
    path = os.path.join(directory, "fsdp2.pth")
    full = os.path.join(directory, "fsdp2-full.pth")
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "fsdp2", corpus.factories, path, full],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the FSDP2 worker exited {done.returncode}:\n{done.stderr[-3000:]}")
    params = tuple(k for k, _ in factories_module(corpus.factories).mlp().named_parameters())
    return Layout(name="", source=path, arch=corpus.spec("mlp"), objects=params, truth=FSDP_FULL, companion=full)


def _fsdp2_main(factories: str, path: str, full: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{path}.rendezvous", rank=0, world_size=1)
    model = randomize(factories_module(factories).mlp(), seed=19)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    state = model.state_dict()
    torch.save(state, path)
    torch.save({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}, full)
    dist.destroy_process_group()


def _torchscript(corpus: Corpus, directory: str) -> Layout:
    import torch

    model = randomize(factories_module(corpus.factories).stateful(), seed=23)
    model._state = torch.randn(2, 4)
    model._context = torch.randn(3)
    path = os.path.join(directory, "stateful.pt")
    torch.jit.save(torch.jit.script(model), path)
    return Layout(name="", source=path, arch=corpus.spec("stateful"), truth=TORCHSCRIPT)


def _onnx(corpus: Corpus, directory: str) -> Layout:
    """Not a checkpoint: an ONNX model exported by ``torch.onnx.export`` (ckpt must say what it is)."""
    import torch

    path = os.path.join(directory, "model.onnx")
    model = randomize(factories_module(corpus.factories).mlp(), seed=53).eval()
    torch.onnx.export(model, (torch.randn(2, 4),), path, dynamo=False)
    return Layout(name="", source=path)


BUILDERS: dict[str, Callable[[Corpus, str], Layout]] = {
    "resnet18": _resnet18,
    "torchvision-dp-nested": _torchvision_dp_nested,
    "gpt2-safetensors": _hf("gpt2"),
    "gpt2-sharded": _hf("gpt2", shard=True),
    "gpt2-bin": _hf("gpt2", torch_bin=True),
    "bert-mlm-safetensors": _hf("bert_mlm"),
    "bert-mlm-sharded": _hf("bert_mlm", shard=True),
    "lightning": _lightning,
    "timm": _timm("state_dict"),
    "timm-ema": _timm("state_dict_ema"),
    "fsdp2": _fsdp2,
    "compile": _torch_save("mlp", seed=29, wrap="compile"),
    "dataparallel": _torch_save("mlp", seed=31, wrap="dp"),
    "tied": _torch_save("tied", seed=37),
    "quantized": _torch_save("quantized", seed=41),
    "sparse": _torch_save("sparse", seed=43),
    "extra-state": _torch_save("extra_state", seed=47),
    "dtypes": _torch_save("dtypes", seed=59),
    "complex128": _torch_save("complex128", seed=61),
    "torchscript": _torchscript,
    "onnx": _onnx,
}
# files other formats write, which ckpt reads no state dict from
NOT_CHECKPOINTS = ("onnx",)
# the checkpoints, for matrices over every layout
LAYOUTS = tuple(name for name in BUILDERS if name not in NOT_CHECKPOINTS)


if __name__ == "__main__":
    if sys.argv[1] == "fsdp2":
        _fsdp2_main(*sys.argv[2:5])
