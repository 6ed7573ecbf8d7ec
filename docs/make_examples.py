"""Build the inputs of every example in the documentation: ``python docs/make_examples.py [DIR]``.

DIR (default ``/tmp/ckpt-examples``) receives small checkpoints made with fixed seeds, so that
every ``$ ckpt`` example in the pages can be followed by hand (``cd DIR``) and is rerun by
``python docs/examples.py``:

- ``fixtures/``: a copy of the repository's committed fixtures (the tiny CNN in three forms,
  the malicious files, a 3-class ImageFolder);
- ``my_models.py``: the reader's own variants of the tiny CNN (a layer added, a layer removed);
- ``tiny_cnn_10.pth``, ``tiny_cnn_2.pth``: the tiny CNN with a 10-class head, and a 2-class
  version of it fine-tuned for a few steps (values differ in the head);
- ``checkpoint.pth``: a training checkpoint as a DataParallel run saves it
  (``model_state_dict`` with ``module.`` keys, ``optimizer_state_dict``, ``epoch``);
- ``ported.pth``: ``tiny_cnn_10.pth`` as a re-implementation saves it (every module under another
  name, in the same order); ``tiny_cnn_tf.pth``: with TF/Keras names for the norm layers
  (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``);
- ``cut.pth`` (a truncated file), ``pointer.safetensors`` (a git-lfs pointer), ``tied.pth``
  (an embedding tied to an output projection);
- ``models/``: a directory to scan and validate: clean files, a torch file with ``os.system``
  slipped in, a whole pickled model, a pickle named ``pytorch_model.bin``; ``pyproject.toml``
  holds the ``[tool.ckpt]`` policies ``ckpt validate`` applies.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")

MY_MODELS = '''\
"""The reader's own models: variants of the tiny CNN that wrote fixtures/tiny_cnn.pth."""
import os
import sys

from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
from make_fixtures import tiny_cnn  # noqa: E402


def deeper(num_classes=10):
    """One more layer at the end of the classifier: classifier.out, Linear(num_classes, num_classes)."""
    model = tiny_cnn(num_classes)
    model.classifier.add_module("out", nn.Linear(num_classes, num_classes))
    return model


def headless():
    """The classifier without its last layer (fc2): the model ends with 32 features."""
    model = tiny_cnn()
    del model.classifier.fc2
    return model


def broken():
    """A classifier that expects 32 input features where the body gives 16."""
    model = tiny_cnn()
    model.classifier.fc1 = nn.Linear(32, 32)
    return model
'''

PYPROJECT = """\
[tool.ckpt]
require-format = "safetensors"
max-size-mb = 1
no-nan-inf = true

[tool.ckpt.arch]
"models/tiny_cnn*" = "my_models.py:tiny_cnn"
"""

LFS_POINTER = """\
version https://git-lfs.github.com/spec/v1
oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393
size 553437082
"""


def make(dest: str) -> None:
    """Write every input into ``dest`` (created; existing files are replaced)."""
    import torch
    from torch import nn

    os.makedirs(dest, exist_ok=True)
    shutil.copytree(
        FIXTURES, os.path.join(dest, "fixtures"), dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    with open(os.path.join(dest, "my_models.py"), "w", encoding="utf-8") as f:
        f.write(MY_MODELS)
    sys.path.insert(0, FIXTURES)
    from make_fixtures import save_training_checkpoint, tiny_cnn

    def at(name: str) -> str:
        return os.path.join(dest, name)

    model = tiny_cnn(10)
    torch.save(model.state_dict(), at("tiny_cnn_10.pth"))

    # a 2-class model fine-tuned from the 10-class one: the body moved a little, the head is new
    torch.manual_seed(1)
    tuned = tiny_cnn(2)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.fc2")}
    tuned.load_state_dict(body, strict=False)
    opt = torch.optim.SGD([p for n, p in tuned.named_parameters() if n.startswith("classifier")], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(tuned(torch.randn(8, 3, 8, 8)), torch.randint(0, 2, (8,))).backward()
        opt.step()
    torch.save(tuned.state_dict(), at("tiny_cnn_2.pth"))

    # a training checkpoint as a DataParallel run saves it
    save_training_checkpoint(model, at("checkpoint.pth"))

    with open(os.path.join(FIXTURES, "tiny_cnn.pth"), "rb") as f:
        head = f.read(5000)
    with open(at("cut.pth"), "wb") as f:
        f.write(head)
    with open(at("pointer.safetensors"), "w", encoding="utf-8") as f:
        f.write(LFS_POINTER)

    torch.manual_seed(0)
    embed = nn.Embedding(20, 8)
    torch.save(OrderedDict([("embed.weight", embed.weight.data), ("proj.weight", embed.weight.data)]), at("tied.pth"))

    # the tiny CNN as a port from elsewhere would save it: every module under another name, in the same
    # order (ported.pth), and with TF/Keras names for the norm layers' tensors (tiny_cnn_tf.pth)
    ported = {
        "features.0": "body.conv_a",
        "features.1": "body.norm_a",
        "features.3": "body.conv_b",
        "features.4": "body.norm_b",
        "classifier.fc1": "head.hidden",
        "classifier.fc2": "head.logits",
    }
    torch.save(
        OrderedDict(
            (ported[k.rpartition(".")[0]] + "." + k.rpartition(".")[2], v) for k, v in model.state_dict().items()
        ),
        at("ported.pth"),
    )
    keras = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    torch.save(
        OrderedDict(
            (m + "." + keras.get(leaf, leaf) if m in ("features.1", "features.4") else k, v)
            for k, v in model.state_dict().items()
            for m, _, leaf in [k.rpartition(".")]
        ),
        at("tiny_cnn_tf.pth"),
    )

    models = at("models")
    os.makedirs(models, exist_ok=True)
    for name in ("tiny_cnn.pth", "tiny_cnn.safetensors"):
        shutil.copy(os.path.join(FIXTURES, name), os.path.join(models, name))
    shutil.copy(os.path.join(FIXTURES, "malicious", "torch_zip_payload.pth"), os.path.join(models, "finetuned.pth"))
    shutil.copy(os.path.join(FIXTURES, "malicious", "pytorch_model.bin"), os.path.join(models, "pytorch_model.bin"))
    torch.save(tiny_cnn(10), os.path.join(models, "full_model.pth"))
    with open(at("pyproject.toml"), "w", encoding="utf-8") as f:
        f.write(PYPROJECT)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ckpt-examples"
    make(target)
    print(f"examples written to {target}")
