"""Plugin discovery: the stage types installed under the ``edgepipe.stages`` entry-point group.

Every stage type, first-party (``edgepipe_plugins``) or a third party's, is an entry point whose
name is the config's ``type`` and whose object is a :class:`edgepipe.stage.Stage` subclass. Names
are discovered from the installed metadata without importing anything; a plugin's module is
imported only when a config uses its type (or when ``edgepipe plugins``/``schema config`` asks for
all of them), so a broken or heavy plugin costs nothing to a config that does not name it. A
plugin that fails to import, or whose object is not a proper stage class, is reported as one line
naming the plugin, its target and the exception.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Dict, List, Mapping, Optional, Type

from pydantic import Field, create_model
from typing_extensions import Literal

from edgepipe.stage import KINDS, Stage, StageConfig

__all__ = ["GROUP", "Plugin", "PluginError", "Registry"]

GROUP = "edgepipe.stages"


class PluginError(Exception):
    """A plugin cannot be used; the message is one line naming it."""


class Plugin:
    """One entry point of the group: its name (the config ``type``), target and distribution.

    :meth:`load` imports it once and caches the class or the error.
    """

    def __init__(self, name: str, target: str, dist: Optional[str], entry_point: Any) -> None:
        self.name = name
        self.target = target
        self.dist = dist
        self._entry_point = entry_point
        self._cls: Optional[Type[Stage]] = None
        self._error: Optional[str] = None
        self._model: Optional[Type[StageConfig]] = None

    def load(self) -> Type[Stage]:
        """The stage class; PluginError (one line) when it cannot be imported or is not a stage."""
        if self._cls is None and self._error is None:
            try:
                obj = self._entry_point.load()
            except Exception as exc:  # any import-time failure of foreign code
                self._error = (
                    f"plugin {self.name!r} ({self.target}) failed to import: "
                    f"{type(exc).__name__}: {_one_line(exc)}"
                )
            else:
                self._error = _check_class(self.name, self.target, obj)
                if self._error is None:
                    self._cls = obj
        if self._error is not None:
            raise PluginError(self._error)
        assert self._cls is not None
        return self._cls

    @property
    def error(self) -> Optional[str]:
        """The load error, loading first if needed (None when the plugin is usable)."""
        try:
            self.load()
        except PluginError as exc:
            return str(exc)
        return None

    def settings_model(self) -> Type[StageConfig]:
        """The plugin's Config with ``type: Literal[<name>]`` added: one member of the config's
        discriminated union, and what a stage's settings validate against."""
        if self._model is None:
            cls = self.load()
            tag: Any = Literal[self.name]  # type: ignore[valid-type]
            self._model = create_model(  # type: ignore[call-overload]
                f"{cls.__name__}Settings",
                __base__=cls.Config,
                __doc__=cls.description() or None,
                type=(tag, Field(description=f"Stage type: {cls.description() or self.name}")),
            )
        assert self._model is not None
        return self._model


def _check_class(name: str, target: str, obj: Any) -> Optional[str]:
    where = f"plugin {name!r} ({target})"
    if not (isinstance(obj, type) and issubclass(obj, tuple(KINDS.values()))):
        return f"{where} is not a Source, Processor or Sink subclass (got {obj!r:.80})"
    config = getattr(obj, "Config", None)
    if not (isinstance(config, type) and issubclass(config, StageConfig)):
        return f"{where} has a Config that is not a StageConfig subclass (got {config!r:.80})"
    if "type" in config.model_fields:
        return f"{where} declares a 'type' field in its Config; the registry adds it"
    abstract = getattr(obj, "__abstractmethods__", None)
    if abstract:
        missing = ", ".join(sorted(abstract))
        return f"{where} does not implement {missing}"
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


class _Loaded:
    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def load(self) -> Any:
        return self.obj


def _entry_points() -> List[Any]:
    eps: Any = importlib.metadata.entry_points()
    if hasattr(eps, "select"):  # Python 3.10+
        return list(eps.select(group=GROUP))
    return list(eps.get(GROUP, []))  # Python 3.8/3.9: a dict of group -> entry points


class Registry:
    """The installed stage types. ``Registry.discover()`` reads the metadata; ``names`` lists every
    type; :meth:`get` loads one; :meth:`conflicts` lists names registered twice with different
    targets (the first one found wins)."""

    def __init__(self, plugins: Dict[str, Plugin], conflicts: Optional[List[str]] = None) -> None:
        self.plugins = plugins
        self.conflicts = conflicts or []

    @classmethod
    def discover(cls) -> Registry:
        plugins: Dict[str, Plugin] = {}
        conflicts: List[str] = []
        for ep in _entry_points():
            dist = getattr(getattr(ep, "dist", None), "name", None)
            if ep.name in plugins:
                if plugins[ep.name].target != ep.value:
                    conflicts.append(
                        f"stage type {ep.name!r} is registered twice: {plugins[ep.name].target} "
                        f"and {ep.value}; using the first"
                    )
                continue
            plugins[ep.name] = Plugin(ep.name, ep.value, dist, ep)
        return cls(dict(sorted(plugins.items())), conflicts)

    @classmethod
    def from_classes(cls, classes: Dict[str, Type[Stage]]) -> Registry:
        """A registry of the given classes, no metadata involved (embedding, tests)."""
        plugins = {}
        for name, obj in classes.items():
            target = f"{obj.__module__}:{obj.__qualname__}"
            plugins[name] = Plugin(name, target, None, _Loaded(obj))
        return cls(dict(sorted(plugins.items())))

    @property
    def names(self) -> List[str]:
        return list(self.plugins)

    def get(self, name: str) -> Type[Stage]:
        """The stage class of type ``name``; PluginError (one line) if unknown or broken."""
        plugin = self.plugins.get(name)
        if plugin is None:
            raise PluginError(f"{name!r} is not a stage type; known: {', '.join(self.names)}")
        return plugin.load()

    def validate(self, name: str, raw: Mapping[str, Any]) -> StageConfig:
        """Stage settings as written (with ``type``) validated against the plugin ``name``'s
        model: the one way a stage config is validated (config loading, worker start, reload).
        PluginError when the plugin cannot be used, pydantic's ValidationError when the settings
        do not fit it."""
        plugin = self.plugins.get(name)
        if plugin is None:
            raise PluginError(f"{name!r} is not a stage type; known: {', '.join(self.names)}")
        return plugin.settings_model().model_validate(raw)

    def describe(self) -> List[Dict[str, Any]]:
        """Every type (loading all): name, kind, description, target, distribution, error."""
        out = []
        for name, plugin in self.plugins.items():
            error = plugin.error
            cls = None if error else plugin.load()
            out.append(
                {
                    "name": name,
                    "kind": cls.kind if cls else None,
                    "description": cls.description() if cls else "",
                    "accepts": list(cls.accepts) if cls else [],
                    "produces": cls.produces if cls else None,
                    "target": plugin.target,
                    "distribution": plugin.dist,
                    "error": error,
                }
            )
        return out
