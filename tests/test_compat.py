"""One answer to "would this load strictly": diff, migrate, validate and finetune's load check agree, with torch."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from migrate_helpers import signature_cache_fixture  # noqa: F401 - autouse: a cache per test
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from ckpt_tool.arch import build_model, signature_from_model, target_signature
from ckpt_tool.compat import check, check_checkpoint, parameter_share, shapes_load
from ckpt_tool.config import ProjectPolicies
from ckpt_tool.diff import diff_paths
from ckpt_tool.migrate import migrate
from ckpt_tool.plan import Plan
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.scan import Policy
from ckpt_tool.validate import Rules, validate_file

ARCHS = textwrap.dedent('''
    import torch
    from torch import nn


    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.tensor(1.5))


    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)


    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight


    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.steps = 0

        def get_extra_state(self):
            return {"steps": self.steps}

        def set_extra_state(self, state):
            self.steps = state["steps"]


    class FromNumpy(nn.Module):
        """Builds a buffer with torch.from_numpy: cannot run on the meta device."""

        def __init__(self):
            super().__init__()
            import numpy as np
            self.fc = nn.Linear(2, 2)
            self.register_buffer("table", torch.from_numpy(np.arange(4, dtype=np.float32)))
            print("building FromNumpy")
''')


@pytest.fixture(scope="module")
def archs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("archs") / "archs.py"
    path.write_text(ARCHS)
    return path


def _model(archs: Path, name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(f"{archs}:{name}", device="cpu")


# Each case: (architecture, how to write the checkpoint from a model, file name); torch's own load decides
def _scalar_as_vector(m: nn.Module, path: Path) -> None:
    sd = m.state_dict()
    sd["scale"] = sd["scale"].reshape(1)
    torch.save(sd, path)


def _scalar_wrong(m: nn.Module, path: Path) -> None:
    sd = m.state_dict()
    sd["scale"] = torch.zeros(2)
    torch.save(sd, path)


def _no_nbt_safetensors(m: nn.Module, path: Path) -> None:
    save_file({k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}, path)


def _no_nbt_pth_with_metadata(m: nn.Module, path: Path) -> None:
    sd = m.state_dict()  # _metadata says version 2: torch no longer fills num_batches_tracked in
    del sd["bn.num_batches_tracked"]
    torch.save(sd, path)


def _tied_save_model(m: nn.Module, path: Path) -> None:
    save_model(m, str(path))  # keeps one name of the tied pair


def _extra_kept(m: nn.Module, path: Path) -> None:
    torch.save(m.state_dict(), path)


def _extra_dropped(m: nn.Module, path: Path) -> None:
    torch.save({k: v for k, v in m.state_dict().items() if not k.endswith("_extra_state")}, path)


def _plain(m: nn.Module, path: Path) -> None:
    torch.save(m.state_dict(), path)


CASES: list[tuple[str, Callable[[nn.Module, Path], None], str, bool]] = [
    ("Scalar", _scalar_as_vector, "scalar_vector.pth", True),
    ("Scalar", _scalar_wrong, "scalar_wrong.pth", False),
    ("Norm", _no_nbt_safetensors, "no_nbt.safetensors", True),
    ("Norm", _no_nbt_pth_with_metadata, "no_nbt_v2.pth", False),
    ("Tied", _tied_save_model, "tied.safetensors", True),
    ("Extra", _extra_kept, "extra.pth", True),
    ("Extra", _extra_dropped, "extra_dropped.pth", False),
    ("FromNumpy", _plain, "from_numpy.pth", True),
]


def _torch_loads(archs: Path, name: str, path: Path) -> bool:
    model = _model(archs, name)
    try:
        if path.suffix == ".safetensors":
            # safetensors' own loader: it re-ties names the file wrote once
            missing, unexpected = load_model(model, str(path), strict=False)
            return not missing and not unexpected
        model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    except RuntimeError:
        return False
    return True


def _finetune_load(archs: Path, name: str, path: Path) -> tuple[nn.Module, Any]:
    """finetune-check's load of the file into a fresh model: (the model, its LoadReport)."""
    from ckpt_tool.finetune import FinetuneOptions
    from ckpt_tool.finetune.load import _load_into, _migrated_state

    model = _model(archs, name)
    state, operations, initialised = _migrated_state(open_checkpoint(str(path)), FinetuneOptions(), model)
    return model, _load_into(model, state, (), operations, initialised)


def _finetune_loads(archs: Path, name: str, path: Path) -> bool:
    """finetune-check's load: every key of the model met, nothing unexpected or mismatched."""
    return bool(_finetune_load(archs, name, path)[1].clean)


@pytest.fixture(params=CASES, ids=[c[2] for c in CASES])
def case(request: pytest.FixtureRequest, archs: Path, tmp_path: Path) -> tuple[str, Path, bool]:
    """One case written to a file: the architecture's name, the file, whether torch loads it strictly."""
    name, write, file, expected = request.param
    path = tmp_path / file
    write(_model(archs, name), path)
    return name, path, expected


def test_every_command_gives_torchs_answer(archs: Path, case: tuple[str, Path, bool]) -> None:
    name, path, expected = case
    spec = f"{archs}:{name}"
    assert _torch_loads(archs, name, path) is expected  # the truth, from torch and safetensors
    assert diff_paths(str(path), arch=spec).loads_strictly is expected
    checks = validate_file(str(path), Rules(Policy(), ProjectPolicies(arch=(("*", spec, {}, None),)))).checks
    assert [c.status for c in checks if c.name == "arch"] == ["pass" if expected else "fail"]


def test_migrate_plans_torchs_answer(archs: Path, case: tuple[str, Path, bool]) -> None:
    name, path, expected = case
    planned = migrate(Plan(str(path), arch=f"{archs}:{name}"), dry_run=True).plan.diff
    assert planned is not None and planned.loads is expected


def test_finetune_load_check_gives_the_same_answer(archs: Path, case: tuple[str, Path, bool]) -> None:
    name, path, expected = case
    assert _finetune_loads(archs, name, path) is expected


def _extra_steps(m: nn.Module, path: Path) -> None:
    m.steps = 5  # type: ignore[assignment]
    torch.save(m.state_dict(), path)


def _bn_version_1(m: nn.Module, path: Path) -> None:
    sd = m.state_dict()  # a BatchNorm saved before num_batches_tracked existed: torch fills it in
    del sd["bn.num_batches_tracked"]
    sd._metadata["bn"]["version"] = 1  # type: ignore[attr-defined]
    torch.save(sd, path)


def _wrapped(write: Callable[[nn.Module, Path], None]) -> Callable[[nn.Module, Path], None]:
    """The same file under DataParallel's ``module.`` prefix (its ``_metadata`` prefixed too)."""

    def wrapped(m: nn.Module, path: Path) -> None:
        write(m, path)
        sd = torch.load(path, weights_only=True)
        out = type(sd)((f"module.{k}", v) for k, v in sd.items())
        out._metadata = type(sd._metadata)((f"module.{k}" if k else "module", v) for k, v in sd._metadata.items())
        out._metadata[""] = {"version": 1}
        torch.save(out, path)

    return wrapped


@pytest.mark.parametrize(
    ("name", "write", "prefix"),
    [
        ("Extra", _extra_steps, None),
        ("Extra", _extra_dropped, None),
        ("Norm", _bn_version_1, None),
        ("Norm", _no_nbt_pth_with_metadata, None),
        ("Scalar", _scalar_as_vector, None),
        ("Extra", _wrapped(_extra_steps), "module."),
        ("Norm", _wrapped(_no_nbt_pth_with_metadata), "module."),
    ],
    ids=["extra", "extra-dropped", "bn-v1", "bn-v2", "scalar", "extra-prefixed", "bn-v2-prefixed"],
)
def test_finetune_loads_the_model_torch_loads(
    archs: Path, tmp_path: Path, name: str, write: Callable[[nn.Module, Path], None], prefix: str | None
) -> None:
    """The same model and the same missing/unexpected keys as torch's load of the file (prefix stripped by torch)."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    from ckpt_tool.finetune import FinetuneOptions
    from ckpt_tool.finetune.load import _load_into, _migrated_state

    path = tmp_path / "c.pth"
    torch.manual_seed(1)
    write(_model(archs, name).apply(_randomize), path)
    source = torch.load(path, weights_only=True)
    if prefix:
        consume_prefix_in_state_dict_if_present(source, prefix)
    want = _model(archs, name)
    result = want.load_state_dict(source, strict=False)
    got = _model(archs, name)
    opts = FinetuneOptions(strip_prefix=(prefix,) if prefix else ())
    state, operations, initialised = _migrated_state(open_checkpoint(str(path)), opts, got)
    report = _load_into(got, state, (), operations, initialised)
    assert (report.missing, report.unexpected) == (tuple(result.missing_keys), tuple(result.unexpected_keys))
    for key, value in want.state_dict().items():
        other = got.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key
    assert getattr(got, "steps", None) == getattr(want, "steps", None)


def _randomize(m: nn.Module) -> None:
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        with torch.no_grad():
            t.copy_(torch.rand(t.shape) + 0.5) if t.is_floating_point() else t.fill_(7)


def test_shape_rule_is_torchs() -> None:
    """torch copies a 1-element vector into a 0-d parameter and nothing else of another shape."""
    for shape, target in [((1,), ()), ((), ()), ((2,), ()), ((), (1,)), ((1, 1), ()), ((3, 4), (4, 3))]:
        p = nn.Parameter(torch.zeros(target))
        m = nn.Module()
        m.p = p
        try:
            m.load_state_dict({"p": torch.zeros(shape)})
            torch_says = True
        except RuntimeError:
            torch_says = False
        assert shapes_load(shape, target) is torch_says, (shape, target)


def test_ties_and_extra_state_are_part_of_the_signature(archs: Path) -> None:
    tied = target_signature(f"{archs}:Tied")
    assert tied.ties == (("embed.weight", "head.weight"),)
    extra = target_signature(f"{archs}:Extra")
    assert extra.extra_state == ("_extra_state",)
    # read back from the cache: the same signature
    again = target_signature(f"{archs}:Tied")
    assert again.cache == "hit" and again.ties == tied.ties


def test_a_tied_alias_is_satisfied_by_its_partner_only() -> None:
    m = nn.Module()
    m.a = nn.Linear(2, 2, bias=False)
    m.b = nn.Linear(2, 2, bias=False)
    m.b.weight = m.a.weight
    sig = signature_from_model(m)
    assert check({"a.weight": (2, 2)}, sig).tied == (("b.weight", "a.weight"),)
    assert check({"a.weight": (2, 2)}, sig).loads
    assert check({}, sig).missing == ("a.weight", "b.weight")
    # a partner of the wrong shape satisfies nothing
    wrong = check({"a.weight": (3, 2)}, sig)
    assert wrong.missing == ("b.weight",) and [x.key for x in wrong.mismatched] == ["a.weight"]
    # a tie group counts once in the share of parameters the checkpoint gives
    assert parameter_share(sig, ["a.weight"]) == 1.0


def test_check_checkpoint_reads_metadata_versions(archs: Path, tmp_path: Path) -> None:
    m = _model(archs, "Norm")
    sd = m.state_dict()
    del sd["bn.num_batches_tracked"]
    torch.save(sd, tmp_path / "v2.pth")
    torch.save(dict(sd), tmp_path / "plain.pth")  # a plain dict: no _metadata, torch fills it in
    sig = target_signature(f"{archs}:Norm")
    assert check_checkpoint(open_checkpoint(str(tmp_path / "v2.pth")), sig).missing == ("bn.num_batches_tracked",)
    plain = check_checkpoint(open_checkpoint(str(tmp_path / "plain.pth")), sig)
    assert plain.loads and plain.auto_filled == ("bn.num_batches_tracked",)


def test_meta_build_failure_falls_back_and_prints_to_stderr(archs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sig = target_signature(f"{archs}:FromNumpy", use_cache=False)
    assert sig.tensors["table"].shape == (4,)
    captured = capsys.readouterr()
    assert captured.out == "" and "building FromNumpy" in captured.err
