"""Cold start: a fit in a fresh process imports neither torch's compiler stack nor sympy (each
costs seconds at start-up), and ``import torchmix`` alone does not import torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CODE = """
import sys
import torchmix
assert "torch" not in sys.modules, "import torchmix imported torch"
d = torchmix.load_dataset("sleepstudy")
r = torchmix.mix("Reaction ~ Days + (1 + Days | Subject)", d, progress=False)
assert r.converged
c = torchmix.load_dataset("contraception")
r = torchmix.mix("use01 ~ age + urban + (1 | district)", c, family="binomial", progress=False)
assert r.converged
heavy = [m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules]
print("HEAVY", heavy)
"""


@pytest.mark.slow
def test_fit_in_fresh_process_imports_no_compiler_stack():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=str(ROOT),
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout
