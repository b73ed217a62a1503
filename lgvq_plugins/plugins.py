"""The plugin manager: built-ins and third-party entry points, loaded the same way.

Third-party packages declare an entry point in the ``lgvq_plugins`` group; the module it
names implements some of the hooks in :mod:`lgvq_plugins.hookspecs`. Environment:

* ``LGVQ_PLUGINS=a,b`` — load only these third-party plugins (entry-point names);
  an empty value loads none. Built-ins always load.
* ``LGVQ_STRICT_PLUGINS=1`` — a plugin that fails to import or register is an error
  instead of a warning (use it in CI).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from lgvq_plugins import hookspecs
from lgvq_plugins.registry import KINDS, Registry

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME

#: Built-in plugin modules. They go through the same manager as third-party ones.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "lgvq_plugins.backbones.vq",
    "lgvq_plugins.backbones.cvq",
    "lgvq_plugins.backbones.vqvae",
    "lgvq_plugins.backbones.vqgan",
    "lgvq_plugins.backbones.perceptual",
    "lgvq_plugins.text.plugin",
    "lgvq_plugins.guidance.losses",
    "lgvq_plugins.data.shapes",
    "lgvq_plugins.evaluation.metrics",
)

#: hook name → registry kind
HOOK_KINDS: dict[str, str] = {
    "register_quantizers": "quantizer",
    "register_backbones": "backbone",
    "register_text_encoders": "text_encoder",
    "register_alignment_losses": "alignment_loss",
    "register_datasets": "dataset",
    "register_tasks": "task",
    "register_metrics": "metric",
}


class PluginLoadError(RuntimeError):
    """A plugin failed to import or register while strict mode is on."""


class PluginWarning(UserWarning):
    """A plugin failed to import or register and was skipped."""


@dataclass
class PluginInfo:
    """What ``lgvq plugins`` prints for one plugin."""

    name: str
    distribution: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


def _strict() -> bool:
    return os.environ.get("LGVQ_STRICT_PLUGINS", "").lower() in {"1", "true", "yes", "on"}


def _allowed_third_party() -> set[str] | None:
    raw = os.environ.get("LGVQ_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


class PluginHost:
    """Owns the pluggy manager, the registries and the record of who registered what."""

    def __init__(self) -> None:
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
        self.infos: dict[str, PluginInfo] = {}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading ----------------------------------------------------------------------
    def load(self, *, entrypoints: bool = True) -> None:
        """Import built-ins and (optionally) entry points, then run every register hook."""
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            version = _own_version()
            for module_name in DEFAULT_PLUGINS:
                module = importlib.import_module(module_name)  # a broken built-in is our bug: raise
                self.pm.register(module, name=module_name)
                self.infos[module_name] = PluginInfo(module_name, "lgvq-plugins", version, True)
            if entrypoints:
                self._load_entrypoints()
            for name, plugin in list(self.pm.list_name_plugin()):
                self._run_register_hooks(name, plugin)

    def _load_entrypoints(self) -> None:
        allowed = _allowed_third_party()
        seen: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen:
                continue  # the same distribution visible twice on sys.path
            seen.add(ep.name)
            if allowed is not None and ep.name not in allowed:
                continue
            dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
            version = ep.dist.version if ep.dist is not None else "?"
            info = PluginInfo(ep.name, dist, version, False)
            self.infos[ep.name] = info
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - contain any third-party failure
                self._fail(info, f"could not be imported ({type(exc).__name__}: {exc})", exc)

    def _run_register_hooks(self, plugin_name: str, plugin: Any) -> None:
        info = self.infos.setdefault(plugin_name, PluginInfo(plugin_name, "?", "?", False))
        hook_names = [h.name for h in (self.pm.get_hookcallers(plugin) or [])]
        info.hooks = sorted(hook_names)
        added: list[tuple[str, str]] = []
        try:
            for hook_name in info.hooks:
                kind = HOOK_KINDS[hook_name]
                registry = self.registries[kind]

                def register(name: str, factory: Callable[..., Any], exist_ok: bool = False,
                             _kind: str = kind, _registry: Registry = registry) -> Callable[..., Any]:
                    wrapped = _registry.add(name, factory, source=_describe(info), exist_ok=exist_ok)
                    added.append((_kind, name))
                    info.registered.setdefault(_kind, []).append(name)
                    return wrapped

                getattr(plugin, hook_name)(register=register)
        except Exception as exc:  # noqa: BLE001
            if info.builtin:
                raise
            # Take back whatever the broken plugin managed to register, so nothing half-made stays.
            for kind, name in added:
                self.registries[kind].remove(name)
            info.registered.clear()
            self.pm.unregister(plugin)
            self._fail(info, f"failed while registering ({type(exc).__name__}: {exc})", exc)

    def _fail(self, info: PluginInfo, what: str, exc: Exception) -> None:
        message = f"plugin {info.name!r} from distribution {info.distribution!r} {what}"
        info.error = message
        if _strict():
            raise PluginLoadError(message + "; LGVQ_STRICT_PLUGINS is set") from exc
        warnings.warn(message + "; it was skipped (set LGVQ_STRICT_PLUGINS=1 to make this an error)",
                      PluginWarning, stacklevel=3)

    # -- in-process plugins -----------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register an in-process plugin object (a module or class with hookimpls) and run
        its register hooks now. Returns the name to pass to :meth:`unregister_plugin`."""
        self.load()
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        self.pm.register(plugin, name=name)
        self.infos[name] = PluginInfo(name, "<in-process>", "", False)
        self._run_register_hooks(name, plugin)
        return name

    def unregister_plugin(self, name: str) -> None:
        """Undo :meth:`register_plugin`: the plugin and everything it registered go away."""
        info = self.infos.pop(name, None)
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        if info is not None:
            for kind, names in info.registered.items():
                for component in names:
                    self.registries[kind].remove(component)


def _describe(info: PluginInfo) -> str:
    if info.builtin:
        return f"built-in plugin {info.name}"
    return f"plugin {info.name!r} (distribution {info.distribution!r})"


def _own_version() -> str:
    try:
        return metadata.version("lgvq-plugins")
    except metadata.PackageNotFoundError:
        return "0+unknown"


_HOST: PluginHost | None = None
_HOST_LOCK = threading.Lock()


def get_host(*, load: bool = True) -> PluginHost:
    """The process-wide plugin host, loading plugins on first use."""
    global _HOST
    with _HOST_LOCK:
        if _HOST is None:
            _HOST = PluginHost()
    if load:
        _HOST.load(entrypoints=os.environ.get("LGVQ_DISABLE_ENTRYPOINTS", "") == "")
    return _HOST


def reset_plugins() -> None:
    """Forget every plugin and registration; the next access loads them again (for tests).

    Components registered in code with a decorator are kept: they belong to the process,
    not to a plugin, and their modules will not be imported twice.
    """
    global _HOST
    with _HOST_LOCK:
        old = _HOST
        _HOST = None
    if old is None:
        return
    code = {kind: [e for e in (reg.entry(n) for n in reg.names()) if e.source.startswith("code:")]
            for kind, reg in old.registries.items()}
    new = get_host(load=False)
    for kind, entries in code.items():
        for e in entries:
            new.registries[kind].add(e.name, e.original, source=e.source)


def plugin_infos() -> list[PluginInfo]:
    """Every loaded (or failed) plugin, built-ins first."""
    host = get_host()
    code: dict[str, list[str]] = {}
    for kind, reg in host.registries.items():
        for name in reg.names():
            if reg.entry(name).source.startswith("code:"):
                code.setdefault(kind, []).append(name)
    infos = sorted(host.infos.values(), key=lambda i: (not i.builtin, i.name))
    if code:
        infos.append(PluginInfo("<registered in code>", "", "", False, [], code))
    return infos
