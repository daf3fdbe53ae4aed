from __future__ import annotations

import dataclasses

import pytest

from lcrun.config import LcrunConfig
from lcrun.errors import ConfigError
from lcrun.units import parse_bytes, parse_tokens


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), (4096, 4096), ("32k", 32768), ("128K", 131072), ("256k", 262144), ("1M", 1048576),
    ("1.5k", 1536), (" 8k ", 8192),
])
def test_parse_tokens(text, expected):
    assert parse_tokens(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12q", "-5", "0", "1.3"])
def test_parse_tokens_rejects(text):
    with pytest.raises(ConfigError):
        parse_tokens(text)


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("16GB", 16 * 10**9), ("512MiB", 512 * 2**20), ("1024", 1024),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_config_resolves_ctx_and_rejects_unknown():
    assert LcrunConfig.from_kwargs(ctx="128k").ctx_tokens == 131072
    with pytest.raises(ConfigError, match="unknown setting"):
        LcrunConfig.from_kwargs(ctxx="128k")


def test_topk_budget_must_leave_room():
    with pytest.raises(ConfigError, match="--budget"):
        LcrunConfig.from_kwargs(attention="topk", budget=256, sink_tokens=64, window_tokens=512)


def test_cli_fields_cover_every_setting():
    names = {f.name for f in LcrunConfig.cli_fields()}
    assert {"model", "ctx", "device", "attention", "budget", "page_size", "gpu_mem"} <= names
    assert "ctx_tokens" not in names


def test_python_api_settings_get_the_cli_choices_checked():
    assert LcrunConfig.from_kwargs(kv_dtype="fp8").kv_dtype == "fp8"
    with pytest.raises(ConfigError, match="--kv-dtype must be one of auto, fp8, got 'int4'"):
        LcrunConfig.from_kwargs(kv_dtype="int4")
    with pytest.raises(ConfigError, match="--attention must be one of auto, dense, topk"):
        LcrunConfig.from_kwargs(attention="sparse")


def test_attention_defaults_to_auto_and_its_settings_are_checked():
    assert LcrunConfig().attention == "auto"
    with pytest.raises(ConfigError, match="--budget"):  # auto may pick top-k
        LcrunConfig.from_kwargs(budget=256, sink_tokens=64, window_tokens=512)
    LcrunConfig.from_kwargs(attention="dense", budget=256, sink_tokens=64, window_tokens=512)
    with pytest.raises(ConfigError, match="--positions window needs --attention topk"):
        LcrunConfig.from_kwargs(attention="dense", positions="window")


def test_a_config_is_validated_once_made_and_never_changes():
    cfg = LcrunConfig(ctx="2k")
    assert cfg.ctx_tokens == 2048
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ctx = "4k"
    assert dataclasses.replace(cfg, ctx="4k").ctx_tokens == 4096 and cfg.ctx_tokens == 2048
    with pytest.raises(ConfigError, match="--budget 256 leaves no room"):
        dataclasses.replace(cfg, attention="topk", budget=256, window_tokens=512)
