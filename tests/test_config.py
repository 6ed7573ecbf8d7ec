"""[tool.ckpt]: found upwards, read, checked against one schema that scan and validate share."""

from __future__ import annotations

import os

import pytest

from ckpt_tool import config as config_module
from ckpt_tool.config import (
    KNOWN_KEYS,
    ProjectPolicies,
    config_allow,
    load_config,
    path_matches,
    project_policies,
)
from ckpt_tool.errors import UsageError
from ckpt_tool.scan import scan
from ckpt_tool.validate import validate

pytestmark = pytest.mark.torchfree

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "tiny_cnn.pth")


def _documented_table() -> str:
    """The example table in the module's docstring, as TOML."""
    doc = config_module.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    return "\n".join(line[4:] for line in block.splitlines()) + "\n"


def test_the_documented_table_is_the_schema(tmp_path):
    (tmp_path / "pyproject.toml").write_text(_documented_table())
    (tmp_path / "models" / "deep").mkdir(parents=True)
    config = load_config(str(tmp_path / "models" / "deep"))  # the nearest pyproject.toml above
    assert config.path == str(tmp_path / "pyproject.toml") and config.root == str(tmp_path)
    assert set(config.values) == set(KNOWN_KEYS)  # every key is documented, and only those
    assert config_allow(config) == ["mypkg.models.Net"]
    assert project_policies(config) == ProjectPolicies(
        formats=("safetensors",),
        max_bytes=200 * 1024 * 1024,
        no_nan_inf=True,
        lfs_fails=False,
        arch=(
            ("models/cls_*.safetensors", "resnet18", {}, None),
            ("models/det_*.pth", "resnet50", {"num_classes": 3}, "state_dict"),
        ),
        root=str(tmp_path),
    )
    assert path_matches(str(tmp_path / "models" / "cls_a.safetensors"), "models/cls_*.safetensors", config.root)
    assert not path_matches(str(tmp_path / "other" / "cls_a.pth"), "models/cls_*.safetensors", config.root)


def test_a_pyproject_without_the_table_is_empty(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    config = load_config(str(tmp_path))
    assert config.values == {} and project_policies(config) == ProjectPolicies(root=str(tmp_path))


def test_scan_reads_allow_alone_and_validate_checks_every_key(tmp_path):
    # a validate-only defect does not stop scan (it reads `allow` only); validate names the file and the key
    (tmp_path / "pyproject.toml").write_text('[tool.ckpt]\nallow = ["mypkg.Net"]\nmax-size-mb = -1\n')
    report = scan([TINY], config_dir=str(tmp_path))
    assert report.ok and report.allowed == ("mypkg.Net",)
    with pytest.raises(UsageError, match=r"pyproject\.toml: max-size-mb must be a positive number"):
        validate([TINY], config_dir=str(tmp_path))
    (tmp_path / "pyproject.toml").write_text("[tool.ckpt]\nallow = 3\n")
    for command in (scan, validate):
        with pytest.raises(UsageError, match=r"\[tool.ckpt\] allow must be a list of names"):
            command([TINY], config_dir=str(tmp_path))
