"""Checkpoint I/O: lazy mapped loading, and one clear error per way a folder can be wrong."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from openmedgemma import CheckpointError, ConfigError, MedGemma, MedSigLIP, OpenMedGemmaError
from openmedgemma.checkpoint import Checkpoint
from tests import tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny multimodal checkpoint written by our save_pretrained, sharded."""
    from openmedgemma.config import from_hf_config

    model = MedGemma(from_hf_config(tiny.gemma_mm_hf_config()))
    tiny.randomize(model)
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder, max_shard_bytes=60_000)
    assert len(shards(folder)) >= 3
    return folder


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def copy_of(saved, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    for f in saved.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_loading_is_lazy_and_never_writes_the_files(saved):
    before = digest(saved)
    model = MedGemma.from_pretrained(saved)
    w = model.language_model.layers[0].mlp.up_proj.weight
    assert w.untyped_storage().nbytes() > w.numel() * 4  # a view into the mapped shard, not a copy
    with torch.no_grad():
        w.add_(1.0)  # copy-on-write: the file must not change
    assert digest(saved) == before


def test_dtype_converts_while_loading(saved):
    model = MedGemma.from_pretrained(saved, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_fp16_is_refused_with_the_reason(saved, tmp_path):
    with pytest.raises(CheckpointError, match="float16 is refused.*overflow"):
        MedGemma.from_pretrained(saved, dtype=torch.float16)
    folder = copy_of(saved, tmp_path)
    for f in folder.glob("*.safetensors"):
        save_file({k: v.half() for k, v in load_file(f).items()}, f)
    with pytest.raises(CheckpointError, match="stored in float16; pass dtype"):
        MedGemma.from_pretrained(folder)


def test_wrong_path(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        MedGemma.from_pretrained(tmp_path / "missing")


def test_missing_config(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        MedGemma.from_pretrained(folder)


def test_missing_shard(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    second = shards(folder)[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {second.name}"):
        MedGemma.from_pretrained(folder)


def test_truncated_shard(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    shard = shards(folder)[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MedGemma.from_pretrained(folder)


def test_garbage_header(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny.gemma_text_hf_config()))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        MedGemma.from_pretrained(tmp_path)


def test_shape_mismatch_missing_and_unexpected_in_one_error(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 128  # every MLP weight now mis-shaped
    (folder / "config.json").write_text(json.dumps(config))
    shard = shards(folder)[-1]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    tensors.pop(dropped)
    tensors["language_model.model.extra.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with pytest.raises(CheckpointError) as err:
        MedGemma.from_pretrained(folder)
    msg = str(err.value)
    assert "1 missing" in msg and "1 unexpected: language_model.model.extra.weight" in msg
    assert "18 wrong shape" in msg and "(file [96, 64], model [128, 64])" in msg
    assert index  # the folder itself was readable: the error is about the weights


def test_unknown_architecture(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="unsupported architecture.*llama"):
        MedGemma.from_pretrained(folder)


def test_wrong_model_class(saved):
    with pytest.raises(CheckpointError, match="holds a MedGemma checkpoint, not a MedSigLIP one"):
        MedSigLIP.from_pretrained(saved)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_refused_without_unpickling(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(tiny.gemma_text_hf_config()))
    (tmp_path / name).write_bytes(b"\x80\x04this would run code if unpickled")
    with pytest.raises(CheckpointError, match="safetensors only: unpickling a file can execute arbitrary code"):
        MedGemma.from_pretrained(tmp_path)


def test_errors_are_one_family(tmp_path):
    with pytest.raises(OpenMedGemmaError):
        MedGemma.from_pretrained(tmp_path)


def test_resave_replaces_old_shards(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    model = MedGemma.from_pretrained(folder)
    model.save_pretrained(folder)  # now a single file: old shards and index must go
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "model.safetensors"]
    ids = tiny.image_prompt(1)
    with torch.no_grad():
        torch.testing.assert_close(MedGemma.from_pretrained(folder)(ids, tiny.pixels(1)), model(ids, tiny.pixels(1)))


def test_checkpoint_lists_names_and_dtype(saved):
    ckpt = Checkpoint(saved)
    assert ckpt.floating_dtype() == torch.float32
    assert "multi_modal_projector.mm_input_projection_weight" in ckpt.names()
