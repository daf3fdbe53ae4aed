"""Every error path of HF folder loading gives one clear message naming the file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lcrun.errors import ModelLoadError, UnsupportedModelError
from lcrun.runtime.build import load_model
from lcrun.runtime.loader_hf import HFFolderSource
from lcrun.runtime.loading import open_source
from lcrun.runtime.model_config import ModelConfig

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "tie_word_embeddings": True}


def _tensors(cfg: dict) -> dict[str, torch.Tensor]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    p = "model.layers.0."
    shapes = {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
              p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
              p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
              "model.norm.weight": (h,), "model.embed_tokens.weight": (v, h)}
    return {k: torch.randn(s) for k, s in shapes.items()}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    save_file(_tensors(CONFIG), str(tmp_path / "model.safetensors"))
    return tmp_path


def test_good_folder_loads(folder):
    model = load_model(HFFolderSource(folder), torch.device("cpu"), torch.float32)
    assert model.lm_head is model.embed


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        open_source(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        open_source(str(tmp_path))


def test_bad_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        HFFolderSource(folder)


def test_missing_config_field(folder):
    cfg = dict(CONFIG)
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="'hidden_size' is missing"):
        HFFolderSource(folder)


def test_unknown_architecture(folder):
    (folder / "config.json").write_text(json.dumps({**CONFIG, "model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        HFFolderSource(folder)


def test_unsupported_rope_scaling():
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn'"):
        ModelConfig.from_hf({**CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="weights are missing"):
        HFFolderSource(folder)


def test_pickle_weights_only(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="reads safetensors"):
        HFFolderSource(folder)


def test_truncated_safetensors(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(HFFolderSource(folder), torch.device("cpu"), torch.float32)


def test_garbage_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="model.safetensors: not a readable safetensors file"):
        HFFolderSource(folder)


def test_missing_tensor(folder):
    tensors = _tensors(CONFIG)
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="down_proj.weight' is missing"):
        load_model(HFFolderSource(folder), torch.device("cpu"), torch.float32)


def test_wrong_shape(folder):
    tensors = _tensors(CONFIG)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(5, 32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="k_proj.weight' has shape"):
        load_model(HFFolderSource(folder), torch.device("cpu"), torch.float32)


def test_sharded_index_with_missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in _tensors(CONFIG)}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors: missing shard"):
        HFFolderSource(folder)


def test_missing_tokenizer(folder):
    with pytest.raises(ModelLoadError, match="tokenizer.json: missing"):
        HFFolderSource(folder).tokenizer()


def test_corrupt_tokenizer(folder):
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="tokenizer.json: not a readable tokenizer"):
        HFFolderSource(folder).tokenizer()


def test_folder_is_named_as_passed_with_its_stored_dtype(tmp_path):
    folder = tmp_path / "My-Model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": "bfloat16", "_name_or_path": "x/y"}))
    save_file(_tensors(CONFIG), str(folder / "model.safetensors"))
    assert open_source(str(folder)).config.name == "My-Model (llama, 9.8K params, bf16 safetensors)"
