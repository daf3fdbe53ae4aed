"""The perf/ scripts import (a device run is the wrong place to find a broken import), and the
quantized-weights quality script runs end to end on the CPU with the demo model."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import perf
from lcrun.runtime.loading import default_model

MODULES = sorted(m.name for m in pkgutil.walk_packages(perf.__path__, "perf.") if not m.name.endswith("__main__"))


def test_perf_modules_import_without_side_effects():
    """In a fresh process (an import that patched lcrun would leak into every later test of this
    worker): each module imports, and lcrun's classes are the same objects afterwards."""
    code = (
        "import importlib\n"
        "from lcrun.runtime.paged_cache import PagedTopKCache\n"
        "init = PagedTopKCache.__init__\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "assert PagedTopKCache.__init__ is init, 'a perf module patched lcrun at import'\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_quant_quality_writes_its_rows(tmp_path):
    out = tmp_path / "q.json"
    subprocess.run([sys.executable, "-m", "perf.quant_quality", "--model", default_model(), "--modes", "bf16,q8_0",
                    "--tokens", "40", "--out", str(out)], check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["meta"]["command"].startswith("quant_quality.py --model")
    rows = {r["weights"]: r for r in result["rows"]}
    assert rows["bf16"]["top1_agreement"] == 1.0 and rows["q8_0"]["top1_agreement"] > 0.8
    assert 1 < rows["bf16"]["perplexity"] < 1000 and rows["q8_0"]["weight_bytes"] < rows["bf16"]["weight_bytes"]
