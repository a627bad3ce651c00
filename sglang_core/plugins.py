"""Plugin discovery, loading and the registries the hooks fill.

Plugins are entry points in the group ``sglang_core.plugins``; the entry-point name is the plugin
name. Discovery reads metadata only; a plugin module is imported only when selected.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

import pluggy

from sglang_core import hookspecs

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "sglang_core.plugins"

# Core modules registered like plugins (always loaded): the core's own hook implementations.
CORE_PLUGINS = {"core-sampling": "sglang_core.sampling.processors", "core-router": "sglang_core.router.policies"}

# hook name -> registry kind
REGISTRY_HOOKS = {
    "register_models": "models",
    "register_attention_backends": "attention_backends",
    "register_quant_methods": "quant_methods",
    "register_weight_formats": "weight_formats",
    "register_grammar_backends": "grammar_backends",
    "register_logits_processors": "logits_processors",
    "register_api_backends": "api_backends",
    "register_frontends": "frontends",
    "register_tool_parsers": "tool_parsers",
    "register_router_policies": "router_policies",
}


class PluginError(ValueError):
    """A plugin could not be selected, loaded or registered."""


def resolve_target(target: Any) -> Any:
    """Import a lazy ``"module:attr"`` target; any other object is returned as is."""
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


@dataclass
class Registration:
    name: str
    target: Any
    plugin: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        return resolve_target(self.target)


class Registry:
    """Name -> registration for one kind of extension (models, attention backends, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Registration] = {}

    def add(self, name: str, target: Any, plugin: str, **metadata: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind} entry with an invalid name {name!r}")
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"{self.kind} name {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}"
            )
        self._entries[name] = Registration(name, target, plugin, metadata)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> Registration:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise PluginError(f"no {self.kind} entry named {name!r}; registered: {known}")
        return self._entries[name]


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    module: str
    loaded: bool = False
    error: str | None = None
    registered: dict[str, list[str]] = field(default_factory=dict)


def discover() -> dict[str, EntryPoint]:
    """Installed plugins by name, without importing them."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def parse_selection(plugins: str | Iterable[str] | None) -> list[str] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; None or empty means all installed."""
    if plugins is None:
        return None
    names = plugins.split(",") if isinstance(plugins, str) else list(plugins)
    names = [n.strip() for n in names if n and n.strip()]
    return names or None


class PluginManager:
    """Loads the selected plugins and fills one registry per extension kind.

    Each engine owns one; nothing here is a module-level global.
    """

    def __init__(self, plugins: str | Iterable[str] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registries = {kind: Registry(kind) for kind in REGISTRY_HOOKS.values()}
        self.infos: list[PluginInfo] = []
        selection = parse_selection(plugins)
        for name, module in CORE_PLUGINS.items():
            self._load(PluginInfo(name, "sglang-core", _version("sglang-core"), module), strict=True)
        installed = discover()
        if selection is not None:
            missing = [n for n in selection if n not in installed]
            if missing:
                raise PluginError(
                    f"plugin(s) not installed: {', '.join(missing)}; installed: {', '.join(sorted(installed)) or 'none'}"
                )
        for name in sorted(installed) if selection is None else selection:
            ep = installed[name]
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            self._load(PluginInfo(name, dist, version, ep.value), strict=selection is not None)
        self.pm.check_pending()
        self._fill_registries()

    def _load(self, info: PluginInfo, strict: bool) -> None:
        self.infos.append(info)
        try:
            module = resolve_target(info.module)
            if self.pm.is_registered(module):
                return
            self.pm.register(module, name=info.name)
            info.loaded = True
        except Exception as exc:  # a broken plugin must not take the others down
            info.error = f"{type(exc).__name__}: {exc}"
            if strict:
                raise PluginError(
                    f"plugin {info.name!r} failed to load: {info.error}; installed: {', '.join(sorted(discover()))}"
                ) from exc
            logger.warning("plugin %r failed to load:\n%s", info.name, traceback.format_exc())

    def _fill_registries(self) -> None:
        by_name = {info.name: info for info in self.infos}
        for hook_name, kind in REGISTRY_HOOKS.items():
            registry = self.registries[kind]
            # Call each implementation separately so every registration knows its plugin.
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin = impl.plugin_name

                def register(name: str, target: Any, _plugin: str = plugin, **metadata: Any) -> None:
                    registry.add(name, target, _plugin, **metadata)
                    by_name[_plugin].registered.setdefault(kind, []).append(name)

                impl.function(register=register)

    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def loaded_names(self) -> list[str]:
        """Names of the loaded third-party/built-in plugins (what a worker process should load)."""
        return [i.name for i in self.infos if i.loaded and i.name not in CORE_PLUGINS]


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
