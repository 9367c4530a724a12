"""The pipeline config: YAML in, a validated and cross-checked :class:`Pipeline` out.

Loading goes in fixed steps, each reporting every error it finds as one line that names the
path and the offending value (``stages.detector.iou_thres: Input should be less than or equal to
1 (got 1.5)``): read and parse the YAML and interpolate ``${VAR}`` and ``${VAR:-default}``
(:mod:`edgepipe.yamlfile`); validate the top level (``name``, ``metrics``, ``runtime``, the models
here); validate each stage's settings against its plugin's model (:meth:`Registry.validate`);
then the graph checks and each stage's own cross-check (:mod:`edgepipe.graph`). All of it is
static: stage constructors run (they are cheap by contract) but nothing opens a device;
``edgepipe run`` adds each stage's ``check()`` in the supervisor. No input, however broken or
hostile, ends in anything but :class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from typing_extensions import Literal

from edgepipe.graph import (
    NAME_PATTERN,
    NAME_RE,
    Pipeline,
    StageSpec,
    carry_originals,
    check_graph,
    check_upstream,
)
from edgepipe.registry import PluginError, Registry
from edgepipe.stage import StageConfig, StageContext
from edgepipe.yamlfile import ConfigError, interpolate, join_path, read_yaml

__all__ = [
    "NAME_PATTERN",
    "ConfigError",
    "MetricsConfig",
    "Pipeline",
    "PipelineConfig",
    "RuntimeConfig",
    "StageSpec",
    "config_model",
    "interpolate",
    "load_config",
    "parse_config",
]

_LISTEN_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):[0-9]{1,5}$")


class MetricsConfig(BaseModel):
    """The daemon's one HTTP endpoint for Prometheus (``/metrics``) and health (``/healthz``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Serve /metrics and /healthz.")
    listen: str = Field(
        "127.0.0.1:9310",
        description="HOST:PORT to listen on; loopback by default, port 0 picks a free one.",
    )
    auth: Optional[str] = Field(
        None,
        description="'user:password' to require HTTP basic auth (use ${VAR} to keep it out of the file).",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _LISTEN_RE.match(value):
            raise ValueError("expected HOST:PORT, such as 127.0.0.1:9310, [::1]:9310 or :9310 (all addresses)")
        port = int(value.rsplit(":", 1)[1])
        if port > 65535:
            raise ValueError(f"port {port} is out of range (0-65535, 0 picks a free one)")
        return value

    @field_validator("auth")
    @classmethod
    def _user_password(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^[^:]+:.+$", value):
            raise ValueError("expected user:password")
        return value


class RuntimeConfig(BaseModel):
    """How the supervisor runs the workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dir: Optional[str] = Field(
        None,
        description="Directory for the ipc:// sockets, private to the daemon: created 0700 when "
        "missing, tightened to 0700 when it is ours, refused when another user owns it or others "
        "may write in it. Default: $RUNTIME_DIRECTORY (systemd), else a private 0700 directory per "
        "daemon under $XDG_RUNTIME_DIR or the temp dir.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    stop_timeout: float = Field(
        10.0, gt=0, le=3600, description="Seconds to drain on SIGTERM/SIGINT before killing workers."
    )
    status_interval: float = Field(
        30.0, gt=0, description="Seconds between status lines when stderr is not a terminal."
    )
    start_timeout: float = Field(
        300.0, gt=0, description="Seconds a worker may take to become ready (model load, warm-up)."
    )
    hang_timeout: float = Field(
        30.0, gt=0, description="Seconds without a heartbeat after which a ready worker is killed and restarted."
    )
    heartbeat_interval: float = Field(
        0.5, gt=0, le=10, description="Seconds between a worker's heartbeats (metrics snapshots)."
    )
    restart_limit: int = Field(
        5, ge=1, description="Restarts of one worker within restart_window that make the daemon give up."
    )
    restart_window: float = Field(60.0, gt=0, description="Seconds over which restarts are counted.")


class PipelineConfig(BaseModel):
    """An edgepipe pipeline: named stages linked by their ``inputs``, plus metrics and runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        "edgepipe", pattern=NAME_PATTERN, description="Name of this daemon (process titles, runtime dir)."
    )
    stages: Dict[str, StageConfig] = Field(
        ...,
        min_length=1,
        description="Stage name -> settings: 'type' (a plugin, see `edgepipe plugins`), the "
        "plugin's options, 'inputs'.",
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metrics endpoint.")  # type: ignore[arg-type]
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Runtime settings.")  # type: ignore[arg-type]


def _loc(loc: Tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out = join_path(out, part)
    return out


def format_validation_error(exc: ValidationError, prefix: str = "", drop: Optional[str] = None) -> List[str]:
    """One line per pydantic error: ``path: message (got value)``. ``drop`` removes a union tag
    from the locations."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p != drop)
        path = ".".join(p for p in (prefix, _loc(loc)) if p)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        typ = err["type"]
        if typ == "extra_forbidden":
            msg = "unknown key"
            lines.append(f"{path}: {msg}")
            continue
        if typ == "missing":
            lines.append(f"{path}: required key missing")
            continue
        value = err.get("input")
        if typ == "string_pattern_mismatch":
            msg = _pattern_message(str((err.get("ctx") or {}).get("pattern", "")))
        if typ == "value_error" and isinstance(value, dict):
            # A model validator's error: its input is the whole mapping, too long to echo; when
            # it starts by naming one of the keys ("bind: refusing ..."), that key is the path.
            key, sep, rest = msg.partition(": ")
            if sep and key in value:
                path, msg = f"{path}.{key}" if path else key, rest
            lines.append(f"{path}: {msg}")
            continue
        got = _short_repr(value)
        if f"got {got}" in msg:  # the validator already says what it got
            lines.append(f"{path}: {msg}")
        else:
            lines.append(f"{path}: {msg} (got {got})")
    return lines


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200  # cut below anyway; bounded for huge nested values
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 20


def _short_repr(value: Any) -> str:
    try:
        got = _REPR.repr(value)
    except Exception:  # a value whose repr fails: say what it is
        got = f"<{type(value).__name__}>"
    return got if len(got) <= 80 else got[:77] + "..."


def _pattern_message(pattern: str) -> str:
    """A regular expression a value failed, said in words: ``^(latest|block)$`` is "expected one
    of latest, block"; anything else "does not have the expected form" (the field's description,
    in `edgepipe schema config`, says which)."""
    m = re.fullmatch(r"\^\(([A-Za-z0-9_|.-]+)\)\$", pattern)
    if m:
        return "expected one of " + ", ".join(m.group(1).split("|"))
    return "does not have the expected form (see `edgepipe schema config` for this setting)"


def parse_config(
    data: Any,
    registry: Optional[Registry] = None,
    env: Optional[Mapping[str, str]] = None,
    path: Optional[str] = None,
) -> Pipeline:
    """Validate a parsed YAML tree; ConfigError with every problem found, one line per cause:
    a setting whose ``${VAR}`` could not be interpolated is not reported again for the
    placeholder left in its value."""
    try:
        return _parse_config(data, registry, env, path)
    except ConfigError as exc:
        raise ConfigError(_first_causes(exc.errors)) from None
    except RecursionError:
        raise ConfigError([f"{path or 'config'}: nested too deeply to be a pipeline config"]) from None
    except Exception as exc:  # a validator or plugin bug must still be one line, never a traceback
        raise ConfigError([f"{path or 'config'}: cannot be loaded: {_one_line(exc)}"]) from None


def load_config(
    path: str, registry: Optional[Registry] = None, env: Optional[Mapping[str, str]] = None
) -> Pipeline:
    """Read, parse and validate a config file; ConfigError (one line per problem) otherwise.
    No input, however broken or hostile, ends in another exception."""
    try:
        data = read_yaml(path)
        return parse_config(data, registry, env, path=os.path.abspath(path))
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a pipeline config"]) from None
    except Exception as exc:  # never a traceback for a file a user wrote
        raise ConfigError([f"{path}: cannot be loaded: {_one_line(exc)}"]) from None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


_INTERPOLATION_ERROR = re.compile(r"^[^:]*: (environment variable '.*' is not set|malformed variable reference)")


def _first_causes(errors: List[str]) -> List[str]:
    unset = [e.split(": ", 1)[0] for e in errors if _INTERPOLATION_ERROR.search(e)]
    out = []
    for e in errors:
        where = e.split(": ", 1)[0]
        if not _INTERPOLATION_ERROR.search(e) and any(where == u or where.startswith(u + ".") for u in unset):
            continue
        out.append(e)
    return out


def _parse_config(
    data: Any,
    registry: Optional[Registry],
    env: Optional[Mapping[str, str]],
    path: Optional[str],
) -> Pipeline:
    registry = registry or Registry.discover()
    env = os.environ if env is None else env
    errors: List[str] = list(registry.conflicts)
    if not isinstance(data, dict):
        raise ConfigError([f"config: expected a mapping at the top level, got {type(data).__name__}"])
    data, variables = interpolate(data, env, "", errors)

    raw_stages = data.get("stages")
    top = dict(data)
    if isinstance(raw_stages, dict) and raw_stages:
        top["stages"] = {"_": {}}  # validated one by one below, against each plugin's model
    try:
        base = PipelineConfig.model_validate(top)
    except ValidationError as exc:
        errors += format_validation_error(exc)
        base = None
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise ConfigError(errors)

    name = base.name if base is not None else "edgepipe"
    specs: Dict[str, StageSpec] = {}
    for stage, raw in raw_stages.items():
        stage = str(stage)
        spec, problems = _stage_spec(registry, stage, raw, name)
        errors += problems
        if spec is not None:
            specs[stage] = spec
    if errors or base is None:
        raise ConfigError(errors)
    config = PipelineConfig.model_construct(
        name=base.name, stages={n: s.config for n, s in specs.items()}, metrics=base.metrics, runtime=base.runtime
    )
    pipeline = Pipeline(config, specs, path, variables)
    for check in (check_graph, check_upstream):
        errors += check(pipeline)
        if errors:
            raise ConfigError(errors)
    carry_originals(pipeline)
    return pipeline


def _stage_spec(registry: Registry, name: str, raw: Any, pipeline: str) -> Tuple[Optional[StageSpec], List[str]]:
    """One stage's record, or the lines saying why it cannot be made."""
    if not NAME_RE.match(name):
        return None, [f"{join_path('stages', name)}: a stage name is 1-63 letters, digits, '_' or '-', starting with a letter or digit"]
    if not isinstance(raw, dict):
        return None, [f"stages.{name}: expected a mapping of settings, got {raw!r:.60}"]
    typ = raw.get("type")
    if not isinstance(typ, str):
        return None, [f"stages.{name}.type: required, one of {', '.join(registry.names)} (got {typ!r:.40})"]
    try:
        cls = registry.get(typ)
        config = registry.validate(typ, raw)
    except PluginError as exc:
        return None, [f"stages.{name}.type: {exc}"]
    except ValidationError as exc:
        model = registry.plugins[typ].settings_model()
        allowed = ", ".join(k for k in model.model_fields if k != "type")
        lines = []
        for line in format_validation_error(exc, f"stages.{name}"):
            key = line[len(f"stages.{name}.") :].split(":", 1)[0]
            if line.endswith(": unknown key") and key in raw:
                line += f"; allowed: {allowed}"  # a typo at the top shows its fix
            lines.append(line)
        return None, lines
    try:
        instance = cls(config, StageContext(name, pipeline=pipeline))
    except Exception as exc:  # a plugin's constructor refusing its settings
        return None, [f"stages.{name}: {type(exc).__name__}: {' '.join(str(exc).split())}"]
    return StageSpec(name, typ, cls, config, instance, raw), []


def config_model(registry: Registry) -> Tuple[Type[BaseModel], List[str]]:
    """The whole pipeline config as one pydantic model (stages a discriminated union on
    ``type`` over every loadable plugin), with the errors of the plugins left out: what
    ``edgepipe schema config`` prints."""
    members, errors = [], []
    for plugin in registry.plugins.values():
        try:
            members.append(plugin.settings_model())
        except PluginError as exc:
            errors.append(str(exc))
    if not members:
        stage_type: Any = StageConfig
    elif len(members) == 1:
        stage_type = members[0]
    else:
        from typing import Union

        from typing_extensions import Annotated

        stage_type = Annotated[Union[tuple(members)], Field(discriminator="type")]  # type: ignore[valid-type]
    model = create_model(  # type: ignore[call-overload]
        "EdgepipeConfig",
        __base__=PipelineConfig,
        __doc__=PipelineConfig.__doc__,
        stages=(Dict[str, stage_type], PipelineConfig.model_fields["stages"]),
        metrics=(MetricsConfig, PipelineConfig.model_fields["metrics"]),
        runtime=(RuntimeConfig, PipelineConfig.model_fields["runtime"]),
    )
    return model, errors
