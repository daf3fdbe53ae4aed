"""The planner with quantized weights (their bytes for memory and the per-token read) and the
built-in GPU profiles of lcrun plan --gpu."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from lcrun.cli import main, plan_choice
from lcrun.config import LcrunConfig
from lcrun.errors import ConfigError
from lcrun.planner.gpus import GPU_PROFILES, gpu_profile
from lcrun.runtime.demo import demo_model_path

EIGHT_B = "synthetic:llama-3.1-8b"


def _choice(weights: str, ctx: str = "128k", gpu: str = "rtx4090", **settings):
    config = LcrunConfig(model=EIGHT_B, ctx=ctx, weights=weights, gpu_mem="24GiB", host_mem="64GiB", **settings)
    return plan_choice(config, gpu)


def test_q4_8b_at_128k_keeps_all_kv_on_a_24gib_gpu():
    q4 = _choice("q4_0")
    assert q4.plan.all_on_gpu and q4.plan.host_pages == 0 and q4.plan.nvme_pages == 0
    assert q4.plan.model.weight_format == "Q4_0"
    assert 4.0 < q4.plan.weights_bytes / 2**30 < 4.5
    bf16 = _choice("bf16")
    assert not bf16.plan.all_on_gpu and bf16.plan.model.weight_bytes == 16060522496


def test_per_token_weight_read_is_the_quantized_bytes():
    q4, bf16 = _choice("q4_0", "32k", attention="dense"), _choice("bf16", "32k", attention="dense")
    w_q4 = next(t for t in q4.plan.decode_terms if t.name == "weights")
    w_bf16 = next(t for t in bf16.plan.decode_terms if t.name == "weights")
    # the untied 128K x 4096 embedding table is not read per token, one row of it is
    embed = 128256 * 4096
    assert w_bf16.bytes == bf16.plan.model.weight_bytes - (embed - 4096) * 2
    assert w_q4.bytes == pytest.approx(w_bf16.bytes * 4.5 / 16, rel=0.01)
    assert w_q4.bytes_per_s == pytest.approx(1008e9 * 0.85)
    # the same KV read: the prediction differs by the weights' read alone
    saved = bf16.plan.decode_s_per_token - q4.plan.decode_s_per_token
    assert saved == pytest.approx(w_bf16.seconds - w_q4.seconds)


@pytest.mark.parametrize("key", sorted(GPU_PROFILES))
def test_gpu_profiles(key):
    p = gpu_profile(key.upper())
    assert p.memory_bytes in (16 << 30, 24 << 30, 32 << 30, 48 << 30) and p.read_bytes_per_s > 500e9
    choice = plan_choice(LcrunConfig(model=EIGHT_B, ctx="32k", weights="q4_0"), key)
    assert choice.plan.hardware.gpu_name == p.name and choice.plan.device_cap_bytes == p.memory_bytes
    assert choice.plan.hardware.source("gpu_mem_bytes_per_s") == f"{key} profile"


def test_plan_cli_shows_format_and_explains_ms_per_token():
    out = CliRunner().invoke(main, ["plan", "--model", EIGHT_B, "--weights", "q4_0", "--ctx", "32k", "--gpu",
                                    "rtx3090"])
    assert out.exit_code == 0, out.output
    assert "Q4_0" in out.output and "RTX 3090 (profile)" in out.output
    assert "predicted ms/token: one decode step" in out.output
    bad = CliRunner().invoke(main, ["plan", "--model", EIGHT_B, "--gpu", "rtx9999"])
    assert bad.exit_code != 0 and "rtx4090" in bad.output


def test_weights_setting_is_checked():
    with pytest.raises(ConfigError, match="--weights must be one of auto, bf16, q8_0, q4_0, q4_k"):
        LcrunConfig(weights="q3_k")


@pytest.mark.skipif(demo_model_path() is None, reason="demo model not installed")
def test_plan_holds_the_demo_as_the_run_would():
    """A GPU (here a profile) keeps the file's Q4_1 blocks; a CPU run dequantizes them (auto)."""
    gpu = plan_choice(LcrunConfig(ctx="4k"), "rtx4090").plan.model
    assert gpu.weight_format == "Q4_1" and gpu.weight_bytes < 100 << 20
    cpu = plan_choice(LcrunConfig(ctx="4k", device="cpu")).plan.model
    assert cpu.weight_format == "float32" and cpu.weight_bytes > 500 << 20


def test_plan_refuses_q4_k_of_a_file(tmp_path):
    """gguf has no Q4_K quantizer: lcrun plan says so for a file, as a run would, before loading."""
    from tests.test_gguf_loader import write_tiny
    write_tiny(tmp_path / "t.gguf")
    with pytest.raises(ConfigError, match="no Q4_K quantizer"):
        plan_choice(LcrunConfig(model=str(tmp_path / "t.gguf"), ctx="1k", weights="q4_k"), "rtx4090")
