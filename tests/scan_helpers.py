"""Builders shared by the scan/validate tests: benign checkpoints of every kind, and the malicious fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

_FAKE_LIGHTNING = """
class AttributeDict(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc
"""


def write_benign(out: str) -> dict[str, str]:
    """One file per kind the reader supports, written by torch itself. Returns ``kind -> path``.

    Everything here must scan ``safe`` except ``full_model`` (a pickled nn.Module names its classes).
    """
    import argparse

    import numpy as np
    import torch
    import torchvision
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    paths: dict[str, str] = {}

    resnet = torchvision.models.resnet18(weights=None, num_classes=10)
    paths["state_dict"] = os.path.join(out, "resnet18.pth")
    torch.save(resnet.state_dict(), paths["state_dict"])

    mobile = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    opt = torch.optim.SGD(mobile.parameters(), lr=0.1, momentum=0.9)
    mobile(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    paths["nested_optimizer"] = os.path.join(out, "mobilenet_train.ckpt")
    torch.save(
        {
            "model": mobile.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "epoch": 4,
            "args": argparse.Namespace(lr=0.1, arch="mobilenet_v3_small"),
            "best_acc": np.float64(0.91),
            "history": np.arange(5, dtype=np.float32),
            "dtype": np.dtype("float32"),
            "seen": {1, 2},
            "shape": torch.Size([3, 4]),
        },
        paths["nested_optimizer"],
    )

    paths["lightning"] = os.path.join(out, "lightning.ckpt")
    _save_lightning(mobile, opt, paths["lightning"], out)

    squeeze = torchvision.models.squeezenet1_0(weights=None, num_classes=10).eval()
    paths["torchscript"] = os.path.join(out, "squeezenet_script.pt")
    torch.jit.script(squeeze).save(paths["torchscript"])
    paths["legacy"] = os.path.join(out, "squeezenet_legacy.pth")
    torch.save({"state_dict": squeeze.state_dict(), "epoch": 1}, paths["legacy"], _use_new_zipfile_serialization=False)
    paths["full_model"] = os.path.join(out, "squeezenet_full.pth")
    torch.save(squeeze, paths["full_model"])

    paths["safetensors"] = os.path.join(out, "resnet18.safetensors")
    save_file(resnet.state_dict(), paths["safetensors"], metadata={"format": "pt"})
    paths["sharded"] = write_sharded(os.path.join(out, "sharded"), resnet.state_dict())
    return paths


def _save_lightning(model: Any, opt: Any, path: str, out: str) -> None:
    """A Lightning-shaped checkpoint whose hyper-parameters are a real AttributeDict subclass of dict."""
    import torch

    pkg = os.path.join(out, "_fake_lightning", "pytorch_lightning", "utilities")
    os.makedirs(pkg, exist_ok=True)
    for d in (os.path.dirname(pkg), pkg):
        open(os.path.join(d, "__init__.py"), "w").close()
    with open(os.path.join(pkg, "parsing.py"), "w") as f:
        f.write(_FAKE_LIGHTNING)
    sys.path.insert(0, os.path.join(out, "_fake_lightning"))
    try:
        from pytorch_lightning.utilities.parsing import AttributeDict

        torch.save(
            {
                "epoch": 3,
                "global_step": 120,
                "pytorch-lightning_version": "1.9.5",
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [opt.state_dict()],
                "lr_schedulers": [],
                "callbacks": {
                    "ModelCheckpoint{'monitor': 'val_loss'}": {
                        "best_model_score": torch.tensor(0.25),
                        "best_model_path": "epoch=3.ckpt",
                    }
                },
                "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 4, "completed": 3}}}},
                "hyper_parameters": AttributeDict(lr=0.01, batch_size=32, layers=[64, 128]),
                "hparams_name": "kwargs",
            },
            path,
        )
    finally:
        sys.path.remove(os.path.join(out, "_fake_lightning"))
        for name in [m for m in sys.modules if m.startswith("pytorch_lightning")]:
            del sys.modules[name]


def write_sharded(directory: str, state: dict[str, Any], parts: int = 2) -> str:
    """A Hugging Face style sharded safetensors set; returns the index path."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    keys = list(state)
    step = (len(keys) + parts - 1) // parts
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {k: state[k].contiguous() for k in keys[i * step : (i + 1) * step]}
        save_file(chunk, os.path.join(directory, name))
        weight_map.update({k: name for k in chunk})
        total += sum(t.numel() * t.element_size() for t in chunk.values())
    index = os.path.join(directory, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return index


def write_malicious(out: str, marker: str, with_torch: bool = True) -> dict[str, str]:
    sys.path.insert(0, os.path.join(ROOT, "fixtures"))
    try:
        import make_malicious
    finally:
        sys.path.remove(os.path.join(ROOT, "fixtures"))
    return make_malicious.write_all(out, marker, with_torch)


# what a victim does with each kind of file, as source for a child process
_LOAD = textwrap.dedent("""
    import os, pickle, sys, warnings, zipfile
    warnings.simplefilter("ignore")

    def load(path):
        names = []
        try:
            names = zipfile.ZipFile(path).namelist()
        except Exception:
            pass  # not a zip, or one Python's zipfile refuses (torch reads those too)
        extra = [n for n in names if n.endswith("extra.pkl")]
        if extra:  # an archive's extra pickle, which torch never reads: pickle.loads of that entry
            pickle.loads(zipfile.ZipFile(path).read(extra[0]))
        elif any("/code/" in n for n in names):
            import torch
            torch.jit.load(path)
        elif path.endswith(".npy"):
            import numpy
            numpy.load(path, allow_pickle=True)
        elif path.endswith(".joblib"):
            import joblib
            joblib.load(path)
        elif path.endswith((".pth", ".pt", ".tar", ".shard")):
            import torch
            torch.load(path, weights_only=False)
        else:
            with open(path, "rb") as f:
                pickle.load(f)
""")


def load_for_real(path: str, cwd: str) -> subprocess.CompletedProcess[str]:
    """What a victim does: torch.load(weights_only=False), torch.jit.load, numpy.load(allow_pickle=True),
    joblib.load or pickle.load, by the file's kind. Runs in a child process."""
    return subprocess.run(
        [PYTHON, "-c", _LOAD + f"\nload({path!r})\n"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def live_payloads(paths: dict[str, str], marker: str, cwd: str) -> set[str]:
    """Which payloads create the marker under a real load, all in one child process (torch imported once)."""
    code = _LOAD + textwrap.dedent(f"""
        marker = {marker!r}
        for name, path in {sorted(paths.items())!r}:
            if os.path.exists(marker):
                os.remove(marker)
            try:
                load(path)
            except BaseException:
                pass  # most payloads break the load after they ran
            if os.path.exists(marker):
                print("LIVE", name)
                os.remove(marker)
    """)
    done = subprocess.run([PYTHON, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    return {line.split()[1] for line in done.stdout.splitlines() if line.startswith("LIVE ")}


def write_peer_attacks(out: str, marker: str) -> dict[str, str]:
    """The attacks the peer scanners test for (fixtures/make_malicious.py), each a harmless marker payload."""
    sys.path.insert(0, os.path.join(ROOT, "fixtures"))
    try:
        import make_malicious
    finally:
        sys.path.remove(os.path.join(ROOT, "fixtures"))
    return make_malicious.write_peer_attacks(out, marker)


def corrupt_copies(src_zip: str, src_safetensors: str, out: str) -> dict[str, str]:
    """Broken inputs: empty, truncated zip, truncated pickle, garbage, and safetensors defects."""
    os.makedirs(out, exist_ok=True)
    paths: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        paths[name] = os.path.join(out, name)
        with open(paths[name], "wb") as f:
            f.write(data)

    put("empty.pth", b"")
    with open(src_zip, "rb") as f:
        put("truncated.pth", f.read()[:4000])
    put("truncated.pkl", b"\x80\x02}q\x00(X\x03\x00\x00\x00abcq\x01K\x01")
    put("garbage.bin", b"\x07" + b"\xff" * 63)  # no model format starts with this byte
    with open(src_safetensors, "rb") as f:
        data = f.read()
    put("st_truncated.safetensors", data[: len(data) - 100])
    put("st_bad_json.safetensors", (10).to_bytes(8, "little") + b"{not json}" + b"\x00" * 16)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    put("st_bad_span.safetensors", len(header).to_bytes(8, "little") + header + b"\x00" * 16)
    with zipfile.ZipFile(os.path.join(out, "no_data_pkl.pt"), "w") as zf:
        zf.writestr("archive/version", "3")
    paths["no_data_pkl.pt"] = os.path.join(out, "no_data_pkl.pt")
    return paths
