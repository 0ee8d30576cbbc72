"""Every delta-rule Pallas kernel fits a Hopper SM: each kernel's Triton IR (exported for `cuda`
on this CPU machine) compiled with pip `triton` for sm_90a needs at most 227 KB of shared
memory per block, spills at most a few hundred bytes a thread and transposes no dot result
that feeds another dot (a pattern Triton has miscompiled on Hopper), in bf16 at the Qwen3-Next
head size (d = 128, Hv = 2 Hk) and at d = 64. No GPU is needed."""

import importlib.util
import sys

import pytest

pytest.importorskip("triton", reason="pip triton (the test extra, Linux x86-64) compiles the IR")


def _tool(repo_root):
    path = repo_root / "benchmarks" / "gpu" / "kernel_resources.py"
    spec = importlib.util.spec_from_file_location("kernel_resources", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("head_dim", [128, 64])
def test_every_kernel_fits_hopper(repo_root, head_dim):
    tool = _tool(repo_root)
    rows = tool.kernel_resources("bfloat16", head_dim)
    names = [row.name for row in rows]
    assert names == ["inverse", "prepare", "state_pass", "output", "local_dv",
                     "state_pass_backward", "output_backward", "wy_backward"], names
    problems = [problem for row in rows for problem in row.problems()]
    assert not problems, problems
