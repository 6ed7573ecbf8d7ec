"""Big writes: sharded sets stream shard by shard, land atomically as a set, and record each source shard's sha256.

Sources are real ``save_pretrained`` sharded sets (tiny Llama, random weights) made at test time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hf_configs import tiny_llama_config

from ckpt_tool import writer
from ckpt_tool.cli import main
from ckpt_tool.migrate import convert, migrate
from ckpt_tool.plan import Plan, operation
from ckpt_tool.reader import open_checkpoint
from ckpt_tool.writer import Blob, Layout, View, write_checkpoint

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-layer Llama saved by transformers in 4+ safetensors shards, and its state dict."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("sharded") / "llama"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False))
    model.save_pretrained(str(out), max_shard_size="20KB")
    assert os.path.exists(out / "model.safetensors.index.json")
    return str(out), {k: v.clone() for k, v in model.state_dict().items()}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shard_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))


def leftovers(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(".")]


def test_sharded_to_sharded_is_bit_identical_and_records_each_shard(llama, tmp_path):
    from safetensors import safe_open

    src, state = llama
    out = str(tmp_path / "model.safetensors")
    report = migrate(Plan(src), out, max_shard_size=30_000)
    assert report.ok and report.verification is not None and report.verification.checked == len(state)
    assert len(report.written.files) > 2 and report.written.files[-1].endswith(".index.json")
    index = json.load(open(report.written.path))
    want = {name: sha256(os.path.join(src, name)) for name in shard_files(src)}
    assert len(want) >= 4
    assert json.loads(index["metadata"]["ckpt.source_shards_sha256"]) == want
    assert index["metadata"]["ckpt.source_sha256"] == sha256(os.path.join(src, "model.safetensors.index.json"))
    got = {}
    for name in shard_files(str(tmp_path)):
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert json.loads(f.metadata()["ckpt.source_shards_sha256"]) == want
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(got) == set(state) and all(got[k].equal(state[k]) for k in state)
    assert set(index["weight_map"].values()) == set(shard_files(str(tmp_path)))
    assert leftovers(str(tmp_path)) == []


def test_convert_sharded_set_to_one_file(llama, tmp_path):
    src, state = llama
    out = str(tmp_path / "one.safetensors")
    report = convert(src, out)
    assert report.ok and report.written.files == (out,)
    meta = open_checkpoint(out).metadata
    assert set(json.loads(meta["ckpt.source_shards_sha256"])) == set(shard_files(src))


def test_index_is_renamed_last_and_names_only_shards_in_place(llama, tmp_path, monkeypatch):
    src, _ = llama
    real = os.replace
    seen: list[tuple[str, list[str]]] = []

    def spy(a, b):
        present = shard_files(str(tmp_path))
        seen.append((os.path.basename(b), present))
        if b.endswith(".index.json"):
            named = set(json.load(open(a))["weight_map"].values())
            assert named <= set(present), "the index would name a shard that is not there yet"
        real(a, b)

    monkeypatch.setattr(writer.os, "replace", spy)
    migrate(Plan(src), str(tmp_path / "model.safetensors"), max_shard_size=30_000)
    names = [name for name, _ in seen]
    assert names[-1] == "model.safetensors.index.json" and len(names) > 2


def test_replacing_a_set_removes_the_old_index_first(llama, tmp_path, monkeypatch):
    src, _ = llama
    out = str(tmp_path / "model.safetensors")
    migrate(Plan(src), out, max_shard_size=30_000)
    old_index = out + ".index.json"
    real = os.replace
    index_present: list[bool] = []

    def spy(a, b):
        index_present.append(os.path.exists(old_index))
        real(a, b)

    monkeypatch.setattr(writer.os, "replace", spy)
    report = migrate(
        Plan(src, operations=(operation("drop", prefix="lm_head"),)), out, max_shard_size=30_000, force=True
    )
    assert report.ok and index_present and not any(index_present)  # no old index over a mix of shards
    assert "lm_head.weight" not in json.load(open(old_index))["weight_map"]


def failing_after(shards_ok: int) -> Layout:
    """Shards of 1000 bytes; the blob of shard ``shards_ok + 1`` fails midway."""
    blobs, views = [], []
    for i in range(4):

        def chunks(i=i):
            yield b"\1" * 500
            if i == shards_ok:
                raise RuntimeError("source vanished")
            yield b"\1" * 500

        blobs.append(Blob("float32", 1000, chunks))
        views.append(View(f"w{i}", i, "float32", (250,), (1,)))
    return Layout(tuple(blobs), tuple(views))


@pytest.mark.parametrize("ext", ["safetensors", "bin"])
def test_a_failure_midway_leaves_no_output_and_keeps_an_old_set(tmp_path, ext):
    path = str(tmp_path / f"model.{ext}")
    with pytest.raises(RuntimeError):
        write_checkpoint(path, failing_after(2), max_shard_size=1000)
    assert os.listdir(tmp_path) == []
    # an existing set under the same names stays exactly as it was
    old = write_checkpoint(path, failing_after(99), max_shard_size=1000)
    before = {f: sha256(f) for f in old.files}
    with pytest.raises(RuntimeError):
        write_checkpoint(path, failing_after(1), max_shard_size=1000)
    assert {f: sha256(f) for f in old.files} == before and leftovers(str(tmp_path)) == []


KILLER = """
import os, signal, sys
from ckpt_tool.migrate import migrate
from ckpt_tool.plan import Plan
done = []
def progress(n, total):
    done.append(n)
    if sum(done) > total // 2:
        os.kill(os.getpid(), signal.SIGKILL)
migrate(Plan(sys.argv[1]), sys.argv[2], max_shard_size=30_000, progress=progress)
"""


def test_a_killed_write_leaves_nothing_under_the_final_names(llama, tmp_path):
    src, _ = llama
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, src, str(out / "model.safetensors")],
        capture_output=True,
        env={**os.environ, "CKPT_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    names = os.listdir(out)
    # only the hidden staging directory, holding what was written so far
    assert len(names) == 1 and names[0].startswith(".model-00001-of-") and names[0].endswith(".tmp"), names
    assert os.listdir(out / names[0])


def test_verification_covers_every_shard(llama, tmp_path, monkeypatch):
    src, state = llama
    real = writer._copy_range
    calls = []

    def corrupt_the_last(out, source, offset, nbytes):
        calls.append(nbytes)
        real(out, source, offset, nbytes)
        if len(calls) == len(state):  # the last tensor, in the last shard: one byte flipped
            out.seek(-1, os.SEEK_CUR)
            out.write(b"\x55")

    monkeypatch.setattr(writer, "_copy_range", corrupt_the_last)
    result = CliRunner().invoke(
        main, ["migrate", src, "-o", str(tmp_path / "m.safetensors"), "--max-shard-size", "30000", "--json"]
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    (bad,) = report["verification"]["differ"]
    assert report["verification"]["checked"] == len(state)
    assert report["written"]["committed"] is False and os.listdir(tmp_path) == []  # nothing renamed into place
    monkeypatch.setattr(writer, "_copy_range", real)
    again = CliRunner().invoke(
        main, ["migrate", src, "-o", str(tmp_path / "m.safetensors"), "--max-shard-size", "30000", "--json"]
    )
    assert again.exit_code == 0, again.output
    written = json.loads(again.stdout)["written"]
    weight_map = json.load(open(written["path"]))["weight_map"]
    assert weight_map[bad] == os.path.basename(written["files"][-2])  # found in the last shard


def test_tied_weights_survive_a_sharded_write(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )
    model.config.architectures = ["GPT2LMHeadModel"]
    model.config.save_pretrained(str(tmp_path / "cfg"))
    src = str(tmp_path / "gpt2.pth")
    torch.save(model.state_dict(), src)  # both names, one storage
    os.makedirs(tmp_path / "out")
    report = migrate(
        Plan(src, arch=f"hf:{tmp_path / 'cfg'}"), str(tmp_path / "out" / "model.safetensors"), max_shard_size=20_000
    )
    assert report.ok and report.verification is not None and report.verification.loads
    index = json.load(open(report.written.path))
    assert json.loads(index["metadata"]["ckpt.aliases"]) == {"lm_head.weight": "transformer.wte.weight"}


def test_a_target_too_large_to_build_is_checked_by_headers(llama, tmp_path, monkeypatch):
    """A 70B target cannot be built on the CPU to load the output into: every value is still compared,
    and the keys and shapes are checked against the signature instead of a load (said so)."""
    from ckpt_tool import verify

    src, state = llama  # save_pretrained wrote the config.json beside the shards
    monkeypatch.setattr(verify, "_memory_available", lambda: 1000)
    result = CliRunner().invoke(main, ["migrate", src, "--arch", f"hf:{src}", "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    assert "too large to build here: not loaded" in result.output
    report = migrate(Plan(src, arch=f"hf:{src}"), str(tmp_path / "j.safetensors"))
    assert report.verification is not None and report.verification.method == "headers_memory"
    assert report.verification.checked == len(state) and report.ok


def test_a_sharded_sources_index_metadata_is_kept_or_reported(llama, tmp_path):
    src, _ = llama
    assert "total_parameters" in json.load(open(os.path.join(src, "model.safetensors.index.json")))["metadata"]
    dropped = migrate(Plan(src), str(tmp_path / "a.safetensors"), max_shard_size=30_000)
    assert dropped.plan.extras_dropped == {"total_parameters": "--keep-extras keeps it"}
    kept = migrate(Plan(src), str(tmp_path / "b.safetensors"), max_shard_size=30_000, keep_extras=True)
    index = json.load(open(kept.written.path))["metadata"]
    assert index["total_parameters"] == "24992" and index["total_size"] == kept.written.tensor_bytes
