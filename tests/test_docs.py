"""The docs stay true: every hook is documented, every file the architecture names exists."""

from __future__ import annotations

import inspect
import re
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
