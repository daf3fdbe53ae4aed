"""The memory planner: plain-Python arithmetic, checked against hand-worked numbers.

Shapes: Llama-3.1-8B (32 layers, 8 KV heads of 128, hidden 4096, MLP 14336, vocab 128256, bf16
weights 16.06e9 B) and Llama-3.2-3B (28 layers, 8 KV heads of 128, hidden 3072, 24 heads, MLP 8192,
6.4e9 B). One page = P tokens of one KV head of one layer, K and V.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys

import pytest

from lcrun.errors import CapacityError, ConfigError
from lcrun.planner import (Calibration, Hardware, ModelSpec, calibration_path, detect_hardware, format_plan,
                           make_plan, workspace_breakdown)
from lcrun.planner import plan as plan_mod
from lcrun.units import format_bytes

GiB = 2**30
TiB = 2**40

LLAMA_8B = ModelSpec(num_layers=32, num_kv_heads=8, num_heads=32, head_dim=128, hidden_size=4096,
                     vocab_size=128256, weight_bytes=16_060_000_000, name="Llama-3.1-8B", intermediate_size=14336)
LLAMA_3B = ModelSpec(num_layers=28, num_kv_heads=8, num_heads=24, head_dim=128, hidden_size=3072,
                     vocab_size=128256, weight_bytes=6_400_000_000, name="Llama-3.2-3B", intermediate_size=8192)


def machine(gpu_bytes, host_total, host_avail, **kw) -> Hardware:
    """detect_hardware with the host numbers pinned (no psutil dependence) and no calibration."""
    return detect_hardware("Test GPU", gpu_bytes, host_total_bytes=host_total, host_available_bytes=host_avail,
                           calibration=None, **kw)


def with_disk(hw: Hardware, free: int) -> Hardware:
    return dataclasses.replace(hw, kv_dir="/mnt/nvme/kv", kv_dir_free_bytes=free)


def expected_decode_s(plan) -> float:
    """Recompute the prediction from its definition, from plan fields and the hardware only."""
    m, hw = plan.model, plan.hardware
    L, hkv, d, e = m.num_layers, m.num_kv_heads, m.head_dim, m.kv_dtype_bytes
    attended = min(plan.ctx_tokens, plan.selected_pages_per_head * plan.page_size)
    kv_read = L * hkv * attended * 2 * d * e                        # selected K and V, every layer/head
    scoring = plan.abstract_gpu_bytes + plan.abstract_cache_bytes   # every abstract scored once
    miss_bytes = plan.miss_pages_per_token * plan.page_bytes
    abstract_fetch = plan.abstract_cache_bytes * (1 - plan.hit_rate)
    remaining = plan.host_pages + plan.nvme_pages
    nvme_bytes = miss_bytes * (plan.nvme_pages / remaining) if remaining else 0.0
    return (m.weight_bytes / hw.gpu_mem_bytes_per_s
            + kv_read / hw.gpu_mem_bytes_per_s
            + scoring / hw.gpu_mem_bytes_per_s
            + (miss_bytes + abstract_fetch) / hw.h2d_bytes_per_s
            + nvme_bytes / hw.disk_read_bytes_per_s)


def expected_misses(plan) -> float:
    # A scored page was selected last step with p = hit rate (then it is in the reuse cache); otherwise
    # it is on the GPU only if its home is there.
    m = plan.model
    p_home = plan.gpu_home_pages / plan.total_pages
    return m.num_layers * m.num_kv_heads * plan.top_pages_per_head * (1 - plan.effective_hit_rate) * (1 - p_home)


# -- (a) 24 GiB GPU / 64 GiB RAM, 128K: KV does not fit beside the weights, host tier holds the rest --

def test_a_rtx4090_128k_spills_to_host():
    hw = machine(24 * GiB, 64 * GiB, 60 * GiB)
    assert hw.host_cap_bytes == 44 * GiB  # the 60 GiB available less a quarter of the 64 GiB machine
    p = make_plan(LLAMA_8B, "128k", hw)

    # KV: 131072 tokens * 32 layers * 8 heads * 128 dims * 2 (K,V) * 2 bytes
    assert p.kv_bytes_per_token == 131072
    assert p.kv_total_bytes == 17_179_869_184 == 16 * GiB
    # P=16: a K page is 16*128*2 = 4 KiB < 8 KiB -> no. P=32: 8 KiB copies; abstracts
    # 131072/32 = 4096 pages/head * 256 heads = 1,048,576 pages * 512 B = 512 MiB <= 10% of 24 GiB
    assert p.page_size == 32 and p.page_size_auto
    assert p.page_bytes == 16384 and p.transfer_bytes == 8192
    assert p.total_pages == 1_048_576 and p.pages_per_head == 4096
    assert p.abstract_mode == "page" and p.abstract_gpu_bytes == 512 * 2**20
    # budget 2048 / 32 + 1 = 65 entries; sinks 64/32 = 2 pages, window 512/32 + 1 = 17 pages -> 46 scored
    assert (p.selected_pages_per_head, p.top_pages_per_head) == (65, 46)
    assert p.resident_pages == 256 * 19 == 4864

    # workspace of an 8192-token chunk (bf16 activations, a = 2):
    #   hidden 4*8192*4096*2 = 268,435,456      q/k/v 2*8192*(32+16)*128*2 = 201,326,592
    #   MLP 4*8192*14336*2 = 939,524,096        attention 8192*32*128*4 + 2*8192*32*4 = 136,314,880
    #   KV stream 2*8192*8*128*2*2 = 67,108,864 logits 128256*4*4 = 2,052,096
    assert p.prefill_chunk == 8192
    assert p.workspace_bytes == 1_614_761_984
    assert p.workspace_bytes == sum(workspace_breakdown(LLAMA_8B, 8192, stream_kv=True).values())
    # selection: 2*((32+8)*4096*4 + 8*65*16) = 1,327,360; page table 1,048,576*4 = 4,194,304
    assert p.selection_bytes == 1_327_360 and p.page_table_bytes == 4_194_304
    # slots = (24 GiB - weights - 512 MiB reserve - abstracts - table - selection - workspace) // 16 KiB
    #       = (25,769,803,776 - 16,060,000,000 - 536,870,912 - 536,870,912 - 4,194,304 - 1,327,360
    #          - 1,614,761,984) // 16384 = 7,015,778,304 // 16384 = 428,209
    assert p.gpu_slots == 428_209
    # every GPU slot caches pages whose home is the host pool (written through, never written back)
    assert p.gpu_cache_slots == 428_209 and p.gpu_home_pages == 0
    assert not p.all_on_gpu
    assert p.host_pages == 1_048_576  # all 16 GiB of pages fit 30 GiB of host
    assert p.nvme_pages == 0
    assert p.gpu_used_bytes <= hw.gpu_cap_bytes and p.gpu_free_bytes < p.page_bytes
    assert p.prefetch_depth == 1
    assert p.miss_pages_per_token == pytest.approx(expected_misses(p))
    assert p.decode_s_per_token == pytest.approx(expected_decode_s(p))
    assert sum(t.seconds for t in p.decode_terms) == pytest.approx(p.decode_s_per_token)
    # weights/HBM = 16.06e9 / 900e9 = 17.8 ms dominates
    assert p.bottleneck.startswith("weights")


# -- (b) 12 GB GPU / 32 GB RAM, 128K --

def test_fp8_offloaded_pages_halve_page_bytes_but_not_the_on_gpu_decision():
    """offload_kv_dtype_bytes=1 (--kv-dtype fp8): tiered pages take 8 KiB instead of 16, so the same
    GPU bytes hold twice the cache slots and the host half the bytes; abstracts and the question
    whether everything fits on the GPU (in the model dtype) stay as they were."""
    hw = machine(24 * GiB, 128 * GiB, 120 * GiB, host_mem="72GiB")
    fp8 = dataclasses.replace(LLAMA_8B, offload_kv_dtype_bytes=1)
    bf16_plan, fp8_plan = make_plan(LLAMA_8B, "512k", hw), make_plan(fp8, "512k", hw)
    assert not bf16_plan.all_on_gpu and not fp8_plan.all_on_gpu
    assert fp8_plan.page_size == bf16_plan.page_size == 32
    assert fp8_plan.page_bytes * 2 == bf16_plan.page_bytes == 16 * 1024
    assert fp8_plan.kv_total_bytes * 2 == bf16_plan.kv_total_bytes and fp8_plan.kv_bytes_per_token == 65536
    assert fp8_plan.page_abstract_bytes == bf16_plan.page_abstract_bytes
    assert 1.9 < fp8_plan.gpu_slots / bf16_plan.gpu_slots < 2.1
    assert any("1 byte(s) per element" in n for n in fp8_plan.notes)
    # 32K fits on the GPU in bf16: fp8 changes nothing there.
    assert make_plan(fp8, "32k", hw).all_on_gpu and make_plan(fp8, "32k", hw).page_bytes == 16 * 1024
    with pytest.raises(ConfigError, match="offload_kv_dtype_bytes"):
        dataclasses.replace(LLAMA_8B, offload_kv_dtype_bytes=3)


def test_b_weights_larger_than_gpu_name_the_shortfall():
    hw = machine(12_000_000_000, 32_000_000_000, 28_000_000_000)
    with pytest.raises(CapacityError) as err:
        make_plan(LLAMA_8B, "128k", hw)
    msg = str(err.value)
    # 16.06e9 - 12e9 = 4.06e9 B = 3.78 GiB short
    assert format_bytes(4_060_000_000) in msg and "3.78 GiB" in msg
    assert "smaller model" in msg and "quantized" in msg

    # with a --gpu-mem below the card's size the message points at --gpu-mem
    with pytest.raises(CapacityError, match="--gpu-mem"):
        make_plan(LLAMA_8B, "128k", machine(24 * GiB, 64 * GiB, 60 * GiB, gpu_mem="12GB"))


def test_b_smaller_model_fits_with_host_tier():
    # Every page's home is the host (the GPU only caches copies), so the host cap must hold the
    # whole 14 GiB KV: --host-mem 15GiB of the 28 GB available.
    hw = machine(12_000_000_000, 32_000_000_000, 28_000_000_000, host_mem="15GiB")
    p = make_plan(LLAMA_3B, "128k", hw)
    # KV: 131072 * 28 * 8 * 128 * 2 * 2 = 15,032,385,536 B (14 GiB) > 12e9 - 6.4e9
    assert p.kv_total_bytes == 15_032_385_536
    assert not p.all_on_gpu and p.host_pages > 0 and p.nvme_pages == 0
    assert p.gpu_home_pages + p.host_pages == p.total_pages == 131072 // 32 * 28 * 8
    assert p.host_pages * p.page_bytes <= hw.host_cap_bytes == 15 * GiB
    assert p.decode_s_per_token == pytest.approx(expected_decode_s(p))


# -- (c) 80 GB / 128 GB, 128K: everything on the GPU --

def test_c_everything_fits_on_gpu():
    hw = machine(80_000_000_000, 128_000_000_000, 120_000_000_000)
    p = make_plan(LLAMA_8B, "128k", hw)
    # 16.06e9 weights + 17.18e9 KV + 0.54e9 abstracts + 1.55e9 workspace + 0.54e9 reserve < 80e9
    assert p.all_on_gpu and p.host_pages == 0 and p.nvme_pages == 0
    assert p.gpu_home_pages == p.total_pages and p.gpu_breakdown["KV pages"] == p.kv_total_bytes
    assert p.prefetch_depth == 0 and p.miss_pages_per_token == 0
    assert p.workspace_breakdown["KV stream buffer"] == 0  # no host tier to stream past KV from
    assert any("fits on the GPU" in n for n in p.notes)
    # decode = (weights + 2080 selected tokens of KV + abstracts) / HBM
    kv_read = 32 * 8 * (65 * 32) * 2 * 128 * 2
    assert p.decode_s_per_token == pytest.approx((16_060_000_000 + kv_read + p.abstract_gpu_bytes) / 900e9)
    assert p.decode_s_per_token == pytest.approx(expected_decode_s(p))


def test_dense_needs_all_kv_on_gpu():
    p = make_plan(LLAMA_8B, "128k", machine(80_000_000_000, 128_000_000_000, 120_000_000_000), attention="dense")
    assert p.all_on_gpu and p.abstract_mode == "none" and p.abstract_gpu_bytes == 0
    # dense reads all 131072 tokens of KV: 16 GiB / 900 GB/s
    assert p.decode_terms[1].bytes == 17_179_869_184
    with pytest.raises(CapacityError, match="--attention topk"):
        make_plan(LLAMA_8B, "128k", machine(24 * GiB, 64 * GiB, 60 * GiB), attention="dense")


# -- (d) 24 GiB / 16 GiB host, 256K: NVMe tier --

def test_d_nvme_tier_with_kv_dir():
    hw = machine(24 * GiB, 16 * GiB, 12 * GiB)
    assert hw.host_cap_bytes == 6 * GiB
    p = make_plan(LLAMA_8B, "256k", with_disk(hw, 1 * TiB))
    # KV 262144 * 131072 = 32 GiB; GPU holds ~6 GiB of pages, host ~6 GiB -> ~20 GiB to NVMe
    assert p.kv_total_bytes == 32 * GiB
    assert p.nvme_pages > 0
    assert p.gpu_home_pages + p.host_pages + p.nvme_pages == p.total_pages == 262144 // 32 * 256
    # host: 6 GiB // 16 KiB = 393,216 slots, of which one step's scored pages (11,776) stage NVMe reads
    assert p.host_staging_pages == 11_776 and p.host_pages == 393_216 - 11_776
    assert p.nvme_bytes > 19 * GiB
    assert p.decode_s_per_token == pytest.approx(expected_decode_s(p))
    disk = next(t for t in p.decode_terms if t.link == "disk")
    assert disk.bytes > 0 and disk.bytes_per_s == 1.5e9


def test_d_nvme_needed_without_kv_dir():
    hw = machine(24 * GiB, 16 * GiB, 12 * GiB)
    with pytest.raises(CapacityError) as err:
        make_plan(LLAMA_8B, "256k", hw)
    msg = str(err.value)
    assert "--kv-dir" in msg and "--host-mem" in msg and "--ctx" in msg
    with pytest.raises(CapacityError, match="free"):
        make_plan(LLAMA_8B, "256k", with_disk(hw, 5 * GiB))


# -- (e) page size --

def test_e_page_size_auto():
    hw = machine(24 * GiB, 64 * GiB, 60 * GiB)
    # 32K: P=32 abstracts 32768/32*256*512 = 128 MiB, well inside 2.4 GiB
    assert make_plan(LLAMA_8B, "32k", hw).page_size == 32
    # 1M: P=32 -> 1048576/32*256*512 = 4 GiB > 2.4 GiB; P=64 -> 2 GiB fits
    p = make_plan(LLAMA_8B, "1M", with_disk(hw, 2 * TiB))
    assert p.page_size == 64 and p.abstract_mode == "page" and p.abstract_gpu_bytes == 2 * GiB
    # head_dim 64: a K page of 32 tokens is only 4 KiB, so 64 is the smallest page
    small = dataclasses.replace(LLAMA_3B, head_dim=64, name="d64")
    assert make_plan(small, "32k", hw).page_size == 64
    # an explicit page size is kept
    assert make_plan(LLAMA_8B, "32k", hw, page_size=16).page_size == 16


# -- (f) chunk abstracts --

def test_f_chunk_abstracts_at_1m_plus():
    hw = with_disk(machine(24 * GiB, 64 * GiB, 60 * GiB), 8 * TiB)
    # 1M at P=32: page abstracts 4 GiB > 10% of 24 GiB (2.4 GiB) -> chunks; C=8: 4 GiB / 8 = 512 MiB fits
    p = make_plan(LLAMA_8B, "1M", hw, page_size=32)
    assert p.abstract_mode == "chunk" and p.chunk_pages == 8
    assert p.abstract_gpu_bytes == 512 * 2**20 and p.abstract_host_bytes == 4 * GiB
    # the selected chunks' page abstracts: 256 heads * 46 chunks * 8 pages * 512 B
    assert p.abstract_cache_bytes == 256 * 46 * 8 * 512
    assert p.decode_s_per_token == pytest.approx(expected_decode_s(p))
    # 4M auto: even P=128 gives 4194304/128*256*512 = 4 GiB of page abstracts -> P=128 + chunks
    p4 = make_plan(LLAMA_8B, "4M", hw)
    assert p4.page_size == 128 and p4.abstract_mode == "chunk"
    assert p4.gpu_home_pages + p4.host_pages + p4.nvme_pages == p4.total_pages
    assert p4.decode_s_per_token == pytest.approx(expected_decode_s(p4))


# -- errors and settings --

def test_prefill_chunk_given_and_too_big():
    hw = machine(24 * GiB, 64 * GiB, 60 * GiB)
    assert make_plan(LLAMA_8B, "128k", hw, prefill_chunk=2048).prefill_chunk == 2048
    with pytest.raises(CapacityError, match="--prefill-chunk"):
        make_plan(LLAMA_8B, "128k", hw, prefill_chunk=65536)


def test_bad_settings():
    hw = machine(24 * GiB, 64 * GiB, 60 * GiB)
    with pytest.raises(ConfigError, match="--budget"):
        make_plan(LLAMA_8B, "32k", hw, budget_tokens=256)
    with pytest.raises(ConfigError):
        make_plan(LLAMA_8B, "32k", hw, page_size=48)
    with pytest.raises(ConfigError):
        make_plan(LLAMA_8B, "32k", hw, attention="sparse")
    with pytest.raises(ConfigError, match="--gpu-mem"):
        machine(24 * GiB, 64 * GiB, 60 * GiB, gpu_mem="32GiB")


def test_short_context_and_cpu_only():
    p = make_plan(LLAMA_3B, 100, machine(24 * GiB, 64 * GiB, 60 * GiB))
    assert p.all_on_gpu and p.prefill_chunk == 128 and p.pages_per_head == 4
    cpu = detect_hardware(None, None, host_total_bytes=64 * GiB, host_available_bytes=60 * GiB, calibration=None)
    assert not cpu.on_gpu and cpu.device_cap_bytes == 48 * GiB  # 80% of available on CPU
    pc = make_plan(LLAMA_3B, "32k", cpu)
    assert pc.device == "cpu" and pc.all_on_gpu
    assert pc.decode_terms[0].bytes_per_s == 40e9  # DRAM default


@pytest.mark.parametrize("attention", ["topk", "dense"])
def test_cpu_plan_over_host_memory_says_what_a_cpu_run_can_do(attention):
    """A CPU run keeps the whole KV cache in host memory (no NVMe tier, --kv-dir unused there)."""
    cpu = detect_hardware(None, None, host_total_bytes=64 * GiB, host_available_bytes=60 * GiB, calibration=None,
                          kv_dir=None)
    with pytest.raises(CapacityError, match=r"on the CPU the whole KV cache stays in host memory: .* Use a smaller "
                                            r"--ctx \(about [1-9]\d*k fits\), raise --host-mem, or run on a GPU$") as exc:
        make_plan(LLAMA_3B, "1M", cpu, attention=attention)
    assert "--kv-dir" not in str(exc.value)


def test_model_spec_from_dict():
    from lcrun.runtime.model_config import ModelConfig
    cfg = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, name="Llama-3.1-8B")
    spec = ModelSpec.from_dict(cfg.to_dict(), weight_bytes=16_060_000_000)
    assert spec == dataclasses.replace(LLAMA_8B, trained_window=cfg.max_position_embeddings)
    hf = {"num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "hidden_size": 3072,
          "vocab_size": 128256, "intermediate_size": 8192, "max_position_embeddings": 131072}
    assert ModelSpec.from_dict(hf, weight_bytes=6.4e9).head_dim == 128
    assert ModelSpec.from_dict(hf, weight_bytes=6.4e9).trained_window == 131072
    with pytest.raises(ConfigError, match="weight_bytes"):
        ModelSpec.from_dict(cfg.to_dict())


# -- calibration --

def test_calibration_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("LCRUN_CACHE_DIR", str(tmp_path / "cache"))
    assert calibration_path() == tmp_path / "cache" / "calibration.json"
    assert Calibration.load("NVIDIA GeForce RTX 4090") is None
    kv_dir = tmp_path / "kv"
    kv_dir.mkdir()
    cal = Calibration("NVIDIA GeForce RTX 4090", h2d_bytes_per_s=24.5e9, gpu_mem_bytes_per_s=950e9,
                      disk_read_bytes_per_s=6e9, disk_write_bytes_per_s=4e9, disk_dir=str(kv_dir))
    path = cal.save()
    assert path == calibration_path() and path.exists()
    Calibration("Other GPU", hostname="elsewhere", h2d_bytes_per_s=1e9).save()  # kept side by side
    loaded = Calibration.load("NVIDIA GeForce RTX 4090")
    assert loaded == cal and loaded.hostname == socket.gethostname() and loaded.measured_at
    assert Calibration.load("Other GPU", hostname="elsewhere").h2d_bytes_per_s == 1e9

    hw = detect_hardware("NVIDIA GeForce RTX 4090", 24 * GiB, kv_dir=kv_dir)
    assert hw.h2d_bytes_per_s == 24.5e9 and hw.source("h2d_bytes_per_s") == "measured"
    assert hw.disk_read_bytes_per_s == 6e9 and hw.source("disk_read_bytes_per_s") == "measured"
    assert hw.kv_dir_free_bytes and hw.kv_dir_free_bytes > 0
    other = detect_hardware("Some Other GPU", 24 * GiB)
    assert other.h2d_bytes_per_s == 20e9 and other.source("h2d_bytes_per_s") == "default"
    text = format_plan(make_plan(LLAMA_3B, "32k", hw))
    assert "(measured)" in text

    path.write_text("{not json")
    assert Calibration.load("NVIDIA GeForce RTX 4090") is None  # a broken cache means defaults


# -- output --

def test_format_plan_and_to_dict():
    hw = with_disk(machine(24 * GiB, 16 * GiB, 12 * GiB), 1 * TiB)
    p = make_plan(LLAMA_8B, "256k", hw)
    text = format_plan(p)
    for key in ("Memory plan: Llama-3.1-8B", "weights", "runtime reserve", "workspace", "MLP", "page abstracts",
                "KV page cache", "Host (pinned)", "NVMe: /mnt/nvme/kv", "page size", "32 tokens",
                "token budget", "prefetch depth", "hit rate", "Decode time per token", "host->GPU page misses",
                "NVMe page reads", "total", "bottleneck", "(default)", format_bytes(p.kv_total_bytes)):
        assert key in text, key
    d = json.loads(json.dumps(p.to_dict()))
    assert d["page_size"] == 32 and d["nvme_pages"] == p.nvme_pages
    assert d["hardware"]["sources"]["h2d_bytes_per_s"] == "default"
    assert d["decode_s_per_token"] == pytest.approx(sum(t["seconds"] for t in d["decode_terms"]))


def test_planner_does_not_import_torch():
    code = "import sys, lcrun.planner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_constants_documented_rule():
    # the rule constants the docs quote
    assert plan_mod.ABSTRACT_SHARE == 0.10 and plan_mod.MIN_TRANSFER_BYTES == 8192
    assert plan_mod.DEFAULT_HIT_RATE == 0.8 and plan_mod.PAGE_SIZES == (16, 32, 64, 128)


def test_prefetch_two_layers_ahead_when_the_link_is_slow():
    # At 1 GB/s host->GPU the ~22 MiB of misses per token take ~0.7 ms per layer, more than a
    # layer of compute (~17.8 ms / 32 = 0.56 ms): fetch two layers ahead.
    hw = dataclasses.replace(machine(24 * GiB, 64 * GiB, 60 * GiB), h2d_bytes_per_s=1e9)
    p = make_plan(LLAMA_8B, "128k", hw)
    assert p.prefetch_depth == 2 and p.min_gpu_slots == 4864 + 3 * 8 * 46
    assert p.bottleneck.startswith("host->GPU")
    assert p.decode_s_per_token == pytest.approx(expected_decode_s(p))
    assert make_plan(LLAMA_8B, "128k", machine(24 * GiB, 64 * GiB, 60 * GiB)).prefetch_depth == 1


def test_calibrate_measures_disk_and_the_plan_uses_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lcrun.cli import main
    monkeypatch.setenv("LCRUN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "kv").mkdir()  # calibrate does not create a missing --kv-dir (tests/test_inputs.py)
    res = CliRunner().invoke(main, ["calibrate", "--device", "cpu", "--kv-dir", str(tmp_path / "kv")])
    assert res.exit_code == 0, res.output
    cal = Calibration.load(None)
    assert cal.disk_read_bytes_per_s > 0 and cal.disk_write_bytes_per_s > 0
    assert not list((tmp_path / "kv").iterdir())  # the measurement's page files are gone
    hw = detect_hardware(None, None, kv_dir=str(tmp_path / "kv"))
    assert hw.source("disk_read_bytes_per_s") == "measured"


def test_a_gpu_run_measures_the_gpu_links_once_and_keeps_the_disk_numbers(tmp_path, monkeypatch, capsys):
    import torch

    from lcrun.offload import calibrate
    monkeypatch.setenv("LCRUN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_measure(device):
        calls.append(device)
        return 30e9, 2000e9
    monkeypatch.setattr(calibrate, "measure_gpu", fake_measure)
    Calibration(gpu_name="GPU X", disk_read_bytes_per_s=3e9, disk_dir=str(tmp_path)).save()
    cal = calibrate.gpu_calibration(torch.device("cpu"), "GPU X")
    assert calls and (cal.h2d_bytes_per_s, cal.gpu_mem_bytes_per_s, cal.disk_read_bytes_per_s) == (30e9, 2000e9, 3e9)
    assert "measured this GPU's links once" in capsys.readouterr().err
    stored = Calibration.load("GPU X")
    assert stored.gpu_mem_bytes_per_s == 2000e9 and stored.disk_read_bytes_per_s == 3e9
    hw = detect_hardware("GPU X", 24 * GiB, calibration=stored)
    assert hw.source("gpu_mem_bytes_per_s") == "measured" and hw.gpu_mem_bytes_per_s == 2000e9
    calibrate.gpu_calibration(torch.device("cpu"), "GPU X")
    assert len(calls) == 1  # stored: not measured again


def test_gpu_link_measurement_can_be_off_and_never_stops_a_run(tmp_path, monkeypatch, capsys):
    import torch

    from lcrun.offload import calibrate
    monkeypatch.setenv("LCRUN_CACHE_DIR", str(tmp_path / "cache"))

    def broken(device):
        raise RuntimeError("no pinned memory")
    monkeypatch.setattr(calibrate, "measure_gpu", broken)
    assert calibrate.gpu_calibration(torch.device("cpu"), "GPU Y") is None
    assert "could not measure the GPU's links (RuntimeError: no pinned memory)" in capsys.readouterr().err
    monkeypatch.setenv(calibrate.AUTO_ENV, "0")
    monkeypatch.setattr(calibrate, "measure_gpu", lambda device: pytest.fail("measured although turned off"))
    assert calibrate.gpu_calibration(torch.device("cpu"), "GPU Y") is None
    assert Calibration.load("GPU Y") is None


# -- two abstract sets past the trained window; --attention auto --

LLAMA_8B_128K = dataclasses.replace(LLAMA_8B, trained_window=131072)


def test_two_abstract_sets_past_the_trained_window():
    hw = with_disk(machine(24 * GiB, 64 * GiB, 60 * GiB), 8 * TiB)
    inside = make_plan(LLAMA_8B_128K, "128k", hw)
    assert inside.abstract_sets == 1 and inside.page_abstract_bytes == 512 * 2**20
    past = make_plan(LLAMA_8B_128K, "256k", hw)
    # 262144/32 = 8192 pages/head * 256 heads * 512 B, twice: true-position and page-relative min/max
    assert past.abstract_sets == 2 and past.page_size == 32
    assert past.page_abstract_bytes == past.gpu_breakdown["page abstracts"] == 2 * GiB
    assert next(t for t in past.decode_terms if t.name == "abstract scoring").bytes == 1 * GiB  # a step ranks one set
    assert any("two abstracts" in n for n in past.notes)
    assert "x 2 sets" in format_plan(past)
    true_pos = make_plan(LLAMA_8B_128K, "256k", hw, positions="true")
    assert true_pos.abstract_sets == 1 and true_pos.page_abstract_bytes == 1 * GiB
    assert make_plan(LLAMA_8B, "256k", hw).abstract_sets == 1  # trained window unknown
    assert make_plan(LLAMA_8B_128K, "32k", hw, positions="window").abstract_sets == 2  # window positions: always
    assert make_plan(LLAMA_8B_128K, "16k", hw, attention="dense").abstract_sets == 0
    # Twice the abstracts double the page size sooner: at 512K 32-token pages' 4 GiB pass 10% of 24 GiB.
    assert make_plan(LLAMA_8B_128K, "512k", hw).page_size == 64
    assert make_plan(LLAMA_8B_128K, "512k", hw, positions="true").page_size == 32
    with pytest.raises(ConfigError, match="--positions must be one of"):
        make_plan(LLAMA_8B_128K, "32k", hw, positions="rope")


def test_auto_attention_on_a_gpu_follows_the_predicted_decode_time():
    from lcrun.planner import choose_attention
    hw = with_disk(machine(24 * GiB, 64 * GiB, 60 * GiB), 8 * TiB)
    assert hw.gpu_cap_bytes == 24 * GiB  # no --gpu-mem: the card's total memory
    for ctx in ("1k", "2k", "4k", "32k"):
        choice = choose_attention(LLAMA_8B_128K, ctx, hw)
        dense = make_plan(LLAMA_8B_128K, ctx, hw, attention="dense")
        topk = make_plan(LLAMA_8B_128K, ctx, hw, attention="topk")
        want = "dense" if dense.decode_s_per_token <= topk.decode_s_per_token else "topk"
        assert choice.attention == want == choice.plan.attention, ctx
        assert choice.plan.decode_s_per_token == (dense if want == "dense" else topk).decode_s_per_token
    short = choose_attention(LLAMA_8B_128K, "1k", hw)  # within the budget dense reads what top-k reads
    assert short.attention == "dense" and short.line().startswith("attention: dense (the whole KV cache")
    mid = choose_attention(LLAMA_8B_128K, "32k", hw)
    assert mid.attention == "topk" and "top-k is predicted faster" in mid.reason
    # 128K: the dense KV cache (16 GiB) does not fit beside 15 GiB of weights under 24 GiB.
    full = choose_attention(LLAMA_8B_128K, "128k", hw)
    assert full.attention == "topk" and full.plan.attention == "topk"
    assert full.line().startswith("attention: top-k (the KV cache for 131,072 tokens needs 16.00 GiB, more than "
                                  "the 24.00 GiB cap leaves")
    assert "\n" not in full.line() and full.warning is None
    # Past the trained window: top-k even where dense would fit (an 80 GB card).
    big = with_disk(machine(80 * GiB, 256 * GiB, 250 * GiB), 8 * TiB)
    past = choose_attention(LLAMA_8B_128K, "256k", big)
    assert past.attention == "topk" and "past the model's trained window of 131,072" in past.reason
    assert "ms/token" in past.reason
    # Asked for dense past the window: allowed, with a one-line warning.
    dense = choose_attention(LLAMA_8B_128K, "256k", big, attention="dense")
    assert dense.attention == "dense" and dense.plan.attention == "dense" and dense.reason.startswith("--attention dense")
    assert "trained window of 131,072 tokens will degrade" in dense.warning and "\n" not in dense.warning
    assert choose_attention(LLAMA_8B_128K, "64k", big, attention="dense").warning is None
    assert choose_attention(LLAMA_8B_128K, "1k", hw, positions="window").attention == "topk"
    with pytest.raises(ConfigError, match="--positions window needs --attention topk"):
        choose_attention(LLAMA_8B_128K, "1k", hw, attention="dense", positions="window")
    with pytest.raises(ConfigError, match="--attention must be one of auto, dense, topk"):
        choose_attention(LLAMA_8B_128K, "1k", hw, attention="sparse")
    # Neither fits: top-k's shortfall is the error.
    with pytest.raises(CapacityError, match="--kv-dir"):
        choose_attention(LLAMA_8B_128K, "128k", machine(24 * GiB, 16 * GiB, 12 * GiB))


def test_auto_attention_on_the_cpu():
    from lcrun.planner import choose_attention
    cpu = detect_hardware(None, None, host_total_bytes=64 * GiB, host_available_bytes=60 * GiB, calibration=None)
    spec = dataclasses.replace(LLAMA_3B, trained_window=131072)
    fits = choose_attention(spec, "32k", cpu)
    assert fits.attention == "dense" and fits.plan is None and "fits in host memory" in fits.reason
    assert choose_attention(spec, "32k", cpu, cpu_plan=True).plan.attention == "dense"
    small = detect_hardware(None, None, host_mem="8GiB", host_total_bytes=64 * GiB, host_available_bytes=60 * GiB,
                            calibration=None)
    over = choose_attention(spec, "32k", small)  # 5.96 GiB of weights + 3.5 GiB of KV > 8 GiB
    assert over.attention == "topk" and "over the host memory cap of 8.00 GiB" in over.reason
    past = choose_attention(spec, "256k", cpu)
    assert past.attention == "topk" and "trained window of 131,072" in past.reason


def test_kv_counted_per_layer_kind():
    """Gemma 3 12B's shape: only its 8 global layers of 48 hold context-long KV; the 40 local layers'
    1024-token windows are a fixed cost on the device, in the breakdown and the decode terms."""
    local = 2 * 40 * 8 * 256 * 2 * 1024
    gemma = ModelSpec(num_layers=48, num_kv_heads=8, num_heads=16, head_dim=256, hidden_size=3840,
                      vocab_size=262208, weight_bytes=23_500_000_000, intermediate_size=15360,
                      kv_layers=8, local_kv_bytes=local, name="gemma-3-12b")
    as_llama = dataclasses.replace(gemma, kv_layers=None, local_kv_bytes=0)
    assert gemma.kv_bytes_per_token * 6 == as_llama.kv_bytes_per_token
    assert gemma.kv_bytes(1000) == 1000 * gemma.kv_bytes_per_token + local
    hw = machine(48 * GiB, 128 * GiB, 120 * GiB)
    p = make_plan(gemma, 131072, hw, attention="topk")
    assert p.all_on_gpu and p.kv_total_bytes == p.total_pages * p.page_bytes
    assert p.total_pages == -(-131072 // p.page_size) * 8 * 8
    assert p.gpu_breakdown["local-layer windows"] == local
    assert sum(p.gpu_breakdown.values()) <= p.device_cap_bytes
    assert any(t.name == "local-layer windows" and t.bytes == local for t in p.decode_terms)
    assert not make_plan(as_llama, 131072, hw, attention="topk").all_on_gpu  # six times the KV does not fit
    assert "sliding-window layers" in format_plan(p)
    with pytest.raises(ConfigError, match="kv_layers"):
        dataclasses.replace(gemma, kv_layers=49)


def test_gpu_link_rates_are_the_best_repetition_and_the_disk_the_median(monkeypatch):
    """Another process on the GPU slows some repetitions of a calibration: a link can do what its
    fastest repetition did. The disk keeps the median (its fastest reads may be cached)."""
    from lcrun.offload import calibrate as cal
    clock = {"t": 0.0}
    monkeypatch.setattr(cal.time, "perf_counter", lambda: clock["t"])

    def calls(durations):
        steps = iter(durations)

        def run():
            clock["t"] += next(steps)
        return run

    assert cal._rate(100, calls([0.4, 0.1, 0.3]), repeats=3, best=True) == pytest.approx(1000.0)
    assert cal._rate(100, calls([0.4, 0.1, 0.3]), repeats=3) == pytest.approx(100 / 0.3)
