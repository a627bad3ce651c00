"""benchmarks/compile_check.py's kernel list stays in step with the kernels (every constexpr given,
no stray names), and without a Triton 3.6 folder the check says it skipped. The compiling itself
needs that folder (docs/gpu.md); the GPU run is what proves it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_check.py"


@pytest.fixture(scope="module")
def compile_check():
    spec = importlib.util.spec_from_file_location("compile_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_launch_fits_its_kernel(compile_check):
    problems = {f"{name} launch {i}": compile_check.launch_problems(kernel, launch)
                for name, kernel in compile_check.KERNELS.items() for i, launch in enumerate(kernel.launches)}
    assert {where: found for where, found in problems.items() if found} == {}


def test_launch_problems_names_what_is_wrong(compile_check):
    kernel = compile_check.KERNELS["sum_pairs"]
    launch = dict(kernel.launches[0])
    del launch["TOP_K"]
    launch.update(HIDDEN_TYPO=4, hidden=64)
    assert compile_check.launch_problems(kernel, launch) == [
        "no value for constexpr TOP_K", "HIDDEN_TYPO is neither a parameter nor a launch option",
        "hidden=64: a non-constexpr takes a type or the constant 1"]


def test_skips_without_the_triton_folder(compile_check, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TRITON36_DIR", raising=False)
    for argv in ([], ["--triton", str(tmp_path)]):
        monkeypatch.setattr(sys, "argv", ["compile_check.py", "rotary", *argv])
        assert compile_check.main() == 0
        assert capsys.readouterr().out.startswith("SKIPPED: ")
