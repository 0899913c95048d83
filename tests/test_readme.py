"""Every ```python block of README.md runs as a script and exits cleanly (the README's examples are
what users copy first). Unchanged, except that with ``CI`` set the flights examples train on 5,000
rows instead of 20,000 (the suite's time budget; every line still runs)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from benchmarks.common import quick_mode

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)


def test_readme_has_an_example_per_method():
    names = ["HGPMarginal", "SVGPVAE", "AsyncProximalSVI", "SimplexGPMarginal"]
    assert all(any(name in block for block in BLOCKS) for name in names)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / f"readme_{index}.py"
    code = BLOCKS[index]
    if quick_mode():
        code = code.replace("load_flights(num_train=20_000)", "load_flights(num_train=5_000)")
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{run.stderr[-3000:]}"
