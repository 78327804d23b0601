"""The fuzz targets of fuzz/ (issue 22, item 2), each run briefly on its seeds: the short CI run. A crash (an
exception other than the target's typed error, a hang, an allocation past 2 GB) fails the test and prints
the input; longer runs are in docs/hostile-input.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

FUZZ = Path(__file__).parent.parent / "fuzz"
TARGETS = ["gguf_reader", "safetensors_reader", "gguf_tokenizer", "chat_template"]
SECONDS = 8


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(target, tmp_path):
    cmd = [sys.executable, str(FUZZ / f"{target}.py"), "--seconds", str(SECONDS), "--artifacts", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 120)
    log = out.stdout + out.stderr
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*")) + list(tmp_path.glob("oom-*"))
    assert out.returncode == 0 and not crashes, log[-4000:]
    runs = re.search(r"stat::number_of_executed_units: (\d+)", log)
    assert runs and int(runs.group(1)) >= 20, log[-2000:]  # it really ran inputs, not only its seeds
