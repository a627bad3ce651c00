"""The wheel of this checkout, installed (not editable) in a fresh virtual environment, holds every
file of ``sglang_core/`` and ``plugins/`` and loads every plugin ``pyproject.toml`` registers.

An editable install imports straight from the source folders, so a package the build forgets only
goes missing from a wheel; this test is the one place that notices.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import pytest

# The standard library reads TOML from Python 3.11 on; older interpreters skip this one test.
tomllib = pytest.importorskip("tomllib")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> its source folder in the checkout
SOURCE_FOLDERS = {"sglang_core": "sglang_core", "sglang_plugins": "plugins"}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")

# Runs inside the fresh environment: where each package and every loaded plugin module came from.
REPORT_ORIGINS = """
import importlib, json, sys, sysconfig
modules = sys.argv[1:]
for name in modules:
    importlib.import_module(name)
print(json.dumps({
    "site_packages": sysconfig.get_paths()["purelib"],
    "files": {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
              if name.partition(".")[0] in ("sglang_core", "sglang_plugins")},
}))
"""


def package_files(folder: Path) -> set[str]:
    """Every file under ``folder`` (byte-code caches aside), relative to it."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def registered_plugins() -> dict[str, str]:
    """Entry-point name -> module, as our pyproject.toml registers the built-in plugins."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["entry-points"]["sglang_core.plugins"]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


class Installed(NamedTuple):
    wheel: Path
    venv: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """A fresh virtual environment holding the checkout's wheel; torch and the other dependencies come
    from the environment running the tests (--system-site-packages), so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("packaging")
    # Build from a copy: a build/ folder left in the checkout by an earlier build would go into the
    # wheel too and could hide a package this configuration misses.
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in SOURCE_FOLDERS.values():
        shutil.copytree(ROOT / folder, source / folder, ignore=IGNORED)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp / "wheel"), str(source)], cwd=tmp)
    (wheel,) = (tmp / "wheel").glob("sglang_core-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=tmp)
    # When the tests themselves run in a virtual environment, --system-site-packages reaches only
    # the base interpreter's packages; add this environment's the same way (after the new one's
    # own, .pth files processed: an editable sglang-core here stays visible, and must lose).
    (venv_site_packages(venv) / "outer_environment.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages()))
    # pip comes from the outer environment; --ignore-installed leaves that environment's own
    # (editable) sglang-core alone instead of trying to replace it.
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
         "--ignore-installed", str(wheel)], cwd=tmp)
    return Installed(wheel, venv)


def venv_site_packages(venv: Path) -> Path:
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    return site_packages


def venv_env() -> dict[str, str]:
    """Nothing points at the checkout: its sources must not be importable by accident."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def test_wheel_holds_only_the_two_packages(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        top_level = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert top_level - dist_info == set(SOURCE_FOLDERS)  # no tests/, benchmarks/, examples/


def test_installed_package_has_every_source_file(installed):
    venv = installed.venv
    out = run([str(venv / "bin" / "python"), "-c", REPORT_ORIGINS], cwd=venv, env=venv_env())
    site_packages = Path(json.loads(out)["site_packages"])
    assert site_packages.is_relative_to(venv)
    for package, folder in SOURCE_FOLDERS.items():
        missing = package_files(ROOT / folder) - package_files(site_packages / package)
        assert not missing, f"not in the wheel's {package}: {sorted(missing)}"


def test_every_registered_plugin_loads_from_the_installed_copy(installed):
    venv = installed.venv
    plugins = registered_plugins()
    listing = run([str(venv / "bin" / "sglang-core"), "plugins", "--json"], cwd=venv, env=venv_env())
    rows = {row["name"]: row for row in json.loads(listing)}
    for name, module in plugins.items():
        assert name in rows, f"plugin {name} not discovered in the installed wheel"
        assert rows[name]["module"] == module
        assert rows[name]["loaded"], f"plugin {name}: {rows[name]['error']}"

    # The outer environment's editable install must not have supplied any of it.
    out = run([str(venv / "bin" / "python"), "-c", REPORT_ORIGINS, "sglang_core.cli", *plugins.values()],
              cwd=venv, env=venv_env())
    origins = json.loads(out)
    site_packages = Path(origins["site_packages"])
    assert set(plugins.values()) <= set(origins["files"])
    for name, file in origins["files"].items():
        assert file is not None, f"{name} has no __init__.py in the installed wheel"
        assert Path(file).is_relative_to(site_packages), f"{name} imported from {file}, not the installed wheel"
