"""The docs stay true: every hook is documented, every file the architecture names exists."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from sglang_core import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def _hooks() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "sglang_core_spec")]


def test_every_hook_has_a_docstring_and_a_section_in_plugins_md():
    plugins_md = (ROOT / "docs" / "plugins.md").read_text()
    hooks = _hooks()
    assert len(hooks) >= 9
    for name in hooks:
        assert inspect.getdoc(getattr(hookspecs, name)), f"hook {name} has no docstring"
        assert name in plugins_md, f"docs/plugins.md does not mention hook {name}"


def test_architecture_names_only_existing_files():
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:sglang_core|plugins)/[\w/.]+)`", text))
    assert paths
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names missing files: {missing}"


def test_readme_lists_every_architecture_the_built_in_plugins_serve():
    """The README's model table is exactly what ``sglang-core plugins --models`` prints for the
    plugins sglang-core itself ships (a third-party plugin installed beside it is not listed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "sglang_core.cli", "plugins", "--models"], capture_output=True,
                         text=True, env=env, check=True).stdout
    built_in = {ep.name for ep in entry_points(group="sglang_core.plugins") if ep.dist.name == "sglang-core"}
    served = {tuple(line.split()) for line in out.splitlines()}
    served = {(arch, plugin) for arch, plugin in served if plugin in built_in}
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", readme, re.MULTILINE))
    assert ("LlamaForCausalLM", "llama") in served
    assert listed == served, f"README only: {sorted(listed - served)}; served only: {sorted(served - listed)}"


def test_testing_md_has_a_row_for_every_test_file():
    """Each ``tests/test_*.py`` is named in the first column of a row of docs/testing.md's table."""
    table = (ROOT / "docs" / "testing.md").read_text().split("## What each file proves", 1)[1]
    first_columns = [line.split(" | ", 1)[0] for line in table.splitlines() if line.startswith("| `")]
    named = {name for column in first_columns for name in re.findall(r"`(test_\w+\.py)`", column)}
    files = {path.name for path in (ROOT / "tests").glob("test_*.py")}
    assert "test_docs.py" in named
    assert files <= named, f"docs/testing.md has no row for: {sorted(files - named)}"
