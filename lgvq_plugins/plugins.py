"""The plugin manager: built-ins and third-party entry points, loaded the same way.

Third-party packages declare an entry point in the ``lgvq_plugins`` group; the module it
names implements some of the hooks in :mod:`lgvq_plugins.hookspecs`. Environment:

* ``LGVQ_PLUGINS=a,b`` — load only these third-party plugins (entry-point names);
  an empty value loads none. Built-ins always load.
* ``LGVQ_STRICT_PLUGINS=1`` — a plugin that fails to import, implements a hook that does
  not exist, or fails while registering is an error instead of a warning (use it in CI).
* ``LGVQ_DISABLE_ENTRYPOINTS=1`` — built-ins only.

Hooks are called through pluggy (``tryfirst``, ``trylast``, ``specname`` and ``hookwrapper``
work as in any pluggy host), one plugin at a time so that the ``register`` callback knows
whom it serves: what each plugin registered is recorded, and a plugin that fails half-way
is rolled back to the state before it (see docs/plugins.md).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from lgvq_plugins import hookspecs
from lgvq_plugins.registry import KINDS, Origin, Registry

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME
IN_PROCESS = "<in-process>"  # the distribution shown for plugins passed to register_plugin

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
    "lgvq_plugins.data.plugin",
    "lgvq_plugins.evaluation.metrics",
    "lgvq_plugins.tasks.plugin",
)

#: hook name → registry kind, in the order the hooks are called at load
HOOK_KINDS: dict[str, str] = {
    "register_quantizers": "quantizer",
    "register_backbones": "backbone",
    "register_text_encoders": "text_encoder",
    "register_alignment_losses": "alignment_loss",
    "register_perceptual_losses": "perceptual_loss",
    "register_datasets": "dataset",
    "register_tasks": "task",
    "register_metrics": "metric",
}


class PluginLoadError(RuntimeError):
    """A plugin failed to import or register while strict mode is on (or a built-in or an
    in-process plugin failed, which is always an error)."""


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
        self._loading = False
        self._lock = threading.RLock()

    # -- loading ----------------------------------------------------------------------
    def load(self, *, entrypoints: bool = True) -> None:
        """Import built-ins and (optionally) entry points, then call every register hook.

        All or nothing for the built-ins: if one fails (or conflicts with a name registered
        in code without ``exist_ok=True``), everything plugins registered is taken back and
        the error propagates; the next call tries again.
        """
        with self._lock:
            if self._loaded or self._loading:  # _loading: a plugin module asked for the host
                return
            self._loading = True
            try:
                version = _own_version()
                for module_name in DEFAULT_PLUGINS:
                    module = importlib.import_module(module_name)  # a broken built-in is our bug
                    self.infos[module_name] = PluginInfo(module_name, "lgvq-plugins", version, True)
                    self.pm.register(module, name=module_name)
                if entrypoints:
                    self._load_entrypoints()
                self._drop_unknown_hooks()
                self._call_hooks(list(HOOK_KINDS))
                self._loaded = True
            except BaseException:
                self._undo_load()
                raise
            finally:
                self._loading = False

    def _undo_load(self) -> None:
        for name, plugin in list(self.pm.list_name_plugin()):
            for registry in self.registries.values():
                registry.remove_owner(name)
            if plugin is not None:
                self.pm.unregister(plugin)
        self.infos.clear()

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
                self.pm.register(module, name=ep.name)  # pluggy checks hook signatures here
            except Exception as exc:  # noqa: BLE001 - contain any third-party failure
                self._fail(info, f"could not be imported ({type(exc).__name__}: {exc})", exc)

    def _drop_unknown_hooks(self) -> None:
        """``pm.check_pending()``: a plugin implementing a hook that no hookspec declares
        (usually a misspelling) is named with the hook and skipped (strict mode: an error)."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                plugin = exc.plugin
                name = self.pm.get_name(plugin) or repr(plugin)
                info = self.infos.setdefault(name, PluginInfo(name, "?", "?", False))
                unknown = sorted(c.name for c in (self.pm.get_hookcallers(plugin) or [])
                                 if not c.has_spec())
                hints = []
                for hook in unknown:
                    close = difflib.get_close_matches(hook, list(HOOK_KINDS), n=1, cutoff=0.6)
                    hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
                what = (f"implements {', '.join(hints)}, which is not a hook of lgvq_plugins "
                        f"(hooks: {', '.join(HOOK_KINDS)})")
                self.pm.unregister(plugin)
                if info.builtin:
                    raise PluginLoadError(f"built-in plugin {name!r} {what}") from exc
                self._fail(info, what, exc)

    # -- calling hooks ----------------------------------------------------------------
    def _call_order(self, hook_name: str) -> list[Any]:
        """Plugins implementing ``hook_name`` in the order pluggy calls them: ``tryfirst``
        first, ``trylast`` last, otherwise the most recently registered first."""
        order: list[Any] = []
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            if not (impl.hookwrapper or impl.wrapper) and not any(p is impl.plugin for p in order):
                order.append(impl.plugin)
        return order

    def _call_hooks(self, hook_names: list[str], only: Any = None) -> None:
        """Call each hook (in ``HOOK_KINDS`` order) for each plugin (in pluggy's order), or
        only for the plugin object ``only``."""
        for hook_name in hook_names:
            for plugin in self._call_order(hook_name):
                if only is not None and plugin is not only:
                    continue
                name = self.pm.get_name(plugin)
                if name is not None:  # None: rolled back earlier in this load
                    self._call_one(hook_name, name, plugin)

    def _call_one(self, hook_name: str, name: str, plugin: Any) -> None:
        info = self.infos.setdefault(name, PluginInfo(name, "?", "?", False))
        info.hooks = sorted(c.name for c in (self.pm.get_hookcallers(plugin) or []) if c.has_spec())
        kind = HOOK_KINDS[hook_name]
        # A pluggy hook caller restricted to this plugin: its hookimpl options and its
        # wrappers apply, and the register callback below knows whom it serves.
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        try:
            caller(register=self._register_callback(info, kind))
        except Exception as exc:  # noqa: BLE001 - contain any plugin failure
            self.rollback(name)
            if info.builtin:
                raise
            self._fail(info, f"failed in {hook_name} ({type(exc).__name__}: {exc}); what it had "
                             "registered was taken back", exc)

    def _register_callback(self, info: PluginInfo, kind: str) -> Callable[..., Any]:
        registry = self.registries[kind]
        origin = Origin.BUILTIN if info.builtin else Origin.PLUGIN
        source = _describe(info)

        def register(name: str, factory: Callable[..., Any], exist_ok: bool = False) -> Callable[..., Any]:
            """Register ``factory`` under ``name`` (see lgvq_plugins.hookspecs)."""
            wrapped = registry.add(name, factory, source=source, exist_ok=exist_ok, origin=origin,
                                   owner=info.name)
            info.registered.setdefault(kind, []).append(name)
            return wrapped

        return register

    def rollback(self, name: str) -> None:
        """Take back everything plugin ``name`` registered and unregister it from pluggy;
        components it replaced (``exist_ok=True``) are in effect again, in gin's table too."""
        for registry in self.registries.values():
            registry.remove_owner(name)
        info = self.infos.get(name)
        if info is not None:
            info.registered.clear()
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)

    def _fail(self, info: PluginInfo, what: str, exc: Exception) -> None:
        message = f"plugin {info.name!r} from distribution {info.distribution!r} {what}"
        info.error = message
        if info.distribution == IN_PROCESS:  # registered explicitly by code: always an error
            raise PluginLoadError(message) from exc
        if _strict():
            raise PluginLoadError(message + "; LGVQ_STRICT_PLUGINS is set") from exc
        warnings.warn(message + "; it was skipped (set LGVQ_STRICT_PLUGINS=1 to make this an error)",
                      PluginWarning, stacklevel=4)

    # -- in-process plugins -----------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str | None = None) -> str:
        """Register an in-process plugin object (a module, class or instance with hookimpls)
        and call its register hooks now. Returns the name to pass to :meth:`unregister_plugin`.

        Raises:
            PluginLoadError: the plugin implements an unknown hook or fails while
                registering; nothing it registered stays.
        """
        self.load()
        with self._lock:
            name = name or getattr(plugin, "__name__", None) or repr(plugin)
            if self.pm.get_plugin(name) is not None:
                raise ValueError(f"a plugin named {name!r} is already registered; pass another name")
            self.pm.register(plugin, name=name)  # pluggy checks hook signatures here
            self.infos[name] = PluginInfo(name, IN_PROCESS, "", False)
            try:
                self._drop_unknown_hooks()
                self._call_hooks(list(HOOK_KINDS), only=plugin)
            except PluginLoadError:
                self.rollback(name)
                self.infos.pop(name, None)
                raise
            return name

    def unregister_plugin(self, name: str) -> None:
        """Undo :meth:`register_plugin`: the plugin and everything it registered go away,
        and whatever it replaced is back."""
        with self._lock:
            self.rollback(name)
            self.infos.pop(name, None)


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
    new = get_host(load=False)
    for kind, reg in old.registries.items():
        for e in reg.entries():
            if e.origin == Origin.CODE:
                new.registries[kind].add(e.name, e.original, source=e.source, exist_ok=e.exist_ok,
                                         origin=Origin.CODE)


def plugin_infos() -> list[PluginInfo]:
    """Every loaded (or failed) plugin, built-ins first, then what code registered."""
    host = get_host()
    code: dict[str, list[str]] = {}
    for kind, reg in host.registries.items():
        for e in reg.entries():
            if e.origin == Origin.CODE:
                code.setdefault(kind, []).append(e.name)
    infos = sorted(host.infos.values(), key=lambda i: (not i.builtin, i.name))
    if code:
        infos.append(PluginInfo("<registered in code>", "", "", False, [], code))
    return infos
