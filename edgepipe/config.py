"""The pipeline config: YAML in, a validated and cross-checked :class:`Pipeline` out.

Loading goes in fixed steps, each reporting every error it finds as one line that names the
path and the offending value (``stages.detector.iou_thres: Input should be less than or equal to
1 (got 1.5)``): read and parse the YAML; interpolate ``${VAR}`` and ``${VAR:-default}`` in string
values (``$${`` is a literal ``${``); validate the top level (``name``, ``metrics``, ``runtime``);
validate each stage's settings against its plugin's model (the plugin's Config plus
``type: Literal[<name>]``, see :mod:`edgepipe.registry`); then the graph checks (inputs exist, no
cycles, sources take no inputs and reach a sink, kinds fit). All of it is static: stage
constructors run (they are cheap by contract) but nothing opens a device; ``edgepipe run`` adds
each stage's ``check()`` in the supervisor.
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Type

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from typing_extensions import Literal

from edgepipe.registry import PluginError, Registry
from edgepipe.stage import Sink, Source, Stage, StageConfig, StageContext

__all__ = [
    "NAME_PATTERN",
    "ConfigError",
    "MetricsConfig",
    "Pipeline",
    "PipelineConfig",
    "RuntimeConfig",
    "interpolate",
    "load_config",
    "parse_config",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)
_LISTEN_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):[0-9]{1,5}$")


class ConfigError(Exception):
    """A config that cannot run; ``errors`` holds one line per problem."""

    def __init__(self, errors: List[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


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


class Pipeline:
    """A validated config with what the runtime needs: per stage its class, an instance (cheap,
    unstarted; used for checks), its type, its settings dict as written (to diff on reload), its
    input link policy, what it emits, and whether any live source feeds it."""

    def __init__(
        self,
        config: PipelineConfig,
        types: Dict[str, str],
        classes: Dict[str, Type[Stage]],
        instances: Dict[str, Stage],
        settings: Dict[str, Dict[str, Any]],
        path: Optional[str] = None,
    ) -> None:
        self.config = config
        self.types = types
        self.classes = classes
        self.instances = instances
        self.settings = settings
        self.path = path
        self.policies: Dict[str, str] = {}
        self.output_kinds: Dict[str, Optional[str]] = {}

    @property
    def stages(self) -> Dict[str, StageConfig]:
        return self.config.stages

    def kind(self, name: str) -> str:
        return self.classes[name].kind

    def consumers(self, name: str) -> List[str]:
        """Stages that list ``name`` among their inputs, in config order."""
        return [n for n, s in self.stages.items() if name in s.inputs]

    def upstream(self, name: str) -> Set[str]:
        """Every stage ``name`` takes input from, directly or through others."""
        return _upstream(self, name)

    def upstream_sources(self, name: str) -> Set[str]:
        return {n for n in self.upstream(name) if self.kind(n) == "source"}

    def flow_order(self) -> List[str]:
        """Stage names with every stage after its inputs (config order otherwise)."""
        return _topological(self)

    def workers(self) -> Dict[str, List[str]]:
        """Worker name -> its stages: a stage's ``worker`` setting, else a worker of its own."""
        out: Dict[str, List[str]] = {}
        for name, s in self.stages.items():
            out.setdefault(s.worker or name, []).append(name)
        return out


# The last alternative catches a ``${`` that is neither ``$${`` nor a well-formed reference.
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def interpolate(value: Any, env: Mapping[str, str], path: str, errors: List[str]) -> Any:
    """``${VAR}``/``${VAR:-default}`` in every string of a parsed YAML tree (keys untouched).

    A YAML alias makes a node appear at several places: it is interpolated once (the copies
    stay shared). An alias that refers to a node holding it (a cycle) is a ConfigError naming
    the path where it closes the loop."""
    return _Interpolator(env, errors).walk(value, path)


class _Interpolator:
    def __init__(self, env: Mapping[str, str], errors: List[str]) -> None:
        self.env = env
        self.errors = errors
        self.done: Dict[int, Any] = {}  # id of a container already walked -> its result
        self.active: Set[int] = set()  # containers on the path being walked (cycle check)

    def walk(self, value: Any, path: str) -> Any:
        if isinstance(value, (dict, list)):
            key = id(value)
            if key in self.active:
                raise ConfigError([f"{path or 'config'}: a YAML alias refers to a node that holds it (a cycle)"])
            if key in self.done:
                return self.done[key]
            self.active.add(key)
            try:
                if isinstance(value, dict):
                    out: Any = {k: self.walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
                else:
                    out = [self.walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
            finally:
                self.active.discard(key)
            self.done[key] = out
            return out
        if not isinstance(value, str) or "$" not in value:
            return value
        return _VAR.sub(lambda m: self.sub(m, value, path), value)

    def sub(self, m: re.Match, value: str, path: str) -> str:
        if m.group(0) == "$${":
            return "${"
        if m.group(0) == "${":
            self.errors.append(
                f"{path}: malformed variable reference in {value!r}: expected ${{NAME}} or "
                "${NAME:-default} (write $${ for a literal ${)"
            )
            return m.group(0)
        name, default = m.group(1), m.group(2)
        if name in self.env:
            return self.env[name]
        if default is not None:
            return default
        self.errors.append(f"{path}: environment variable {name!r} is not set (in {value!r})")
        return m.group(0)


def _loc(loc: Tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
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
        raise ConfigError([f"{path or 'config'}: cannot be loaded: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"]) from None


def _first_causes(errors: List[str]) -> List[str]:
    unset = [e.split(": ", 1)[0] for e in errors if _INTERPOLATION_ERROR.search(e)]
    out = []
    for e in errors:
        where = e.split(": ", 1)[0]
        if not _INTERPOLATION_ERROR.search(e) and any(where == u or where.startswith(u + ".") for u in unset):
            continue
        out.append(e)
    return out


_INTERPOLATION_ERROR = re.compile(r"^[^:]*: (environment variable '.*' is not set|malformed variable reference)")


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
    data = interpolate(data, env, "", errors)

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

    types: Dict[str, str] = {}
    classes: Dict[str, Type[Stage]] = {}
    validated: Dict[str, StageConfig] = {}
    settings: Dict[str, Dict[str, Any]] = {}
    for name, raw in raw_stages.items():
        name = str(name)
        if not _NAME_RE.match(name):
            errors.append(
                f"stages.{name}: a stage name is 1-63 letters, digits, '_' or '-', starting with a letter or digit"
            )
            continue
        if not isinstance(raw, dict):
            errors.append(f"stages.{name}: expected a mapping of settings, got {raw!r:.60}")
            continue
        settings[name] = raw
        typ = raw.get("type")
        if not isinstance(typ, str):
            errors.append(
                f"stages.{name}.type: required, one of {', '.join(registry.names)} (got {typ!r:.40})"
            )
            continue
        try:
            cls = registry.get(typ)
            model = registry.plugins[typ].settings_model()
        except PluginError as exc:
            errors.append(f"stages.{name}.type: {exc}")
            continue
        try:
            validated[name] = model.model_validate(raw)
        except ValidationError as exc:
            allowed = ", ".join(k for k in model.model_fields if k != "type")
            for line in format_validation_error(exc, f"stages.{name}"):
                key = line[len(f"stages.{name}.") :].split(":", 1)[0]
                if line.endswith(": unknown key") and key in raw:
                    line += f"; allowed: {allowed}"  # a typo at the top shows its fix
                errors.append(line)
            continue
        types[name], classes[name] = typ, cls
    if errors or base is None:
        raise ConfigError(errors)

    config = PipelineConfig.model_construct(
        name=base.name, stages=validated, metrics=base.metrics, runtime=base.runtime
    )
    instances: Dict[str, Stage] = {}
    for name, cls in classes.items():
        try:
            instances[name] = cls(validated[name], StageContext(name))
        except Exception as exc:  # a plugin's constructor refusing its settings
            errors.append(f"stages.{name}: {type(exc).__name__}: {' '.join(str(exc).split())}")
    if errors:
        raise ConfigError(errors)
    pipeline = Pipeline(config, types, classes, instances, settings, path)
    errors += check_graph(pipeline)
    if errors:
        raise ConfigError(errors)
    errors += check_upstream(pipeline)
    if errors:
        raise ConfigError(errors)
    carry_originals(pipeline)
    return pipeline


def carry_originals(p: Pipeline) -> None:
    """Turn on ``keep_original_option`` (the letterbox stage's ``keep_original``) in the stages
    upstream of every sink that ``needs_original``, where the config does not set it either way
    (see :class:`edgepipe.stage.Sink`). The walk up a path stops at the first such stage."""
    for name, stage in list(p.instances.items()):
        if not getattr(stage, "needs_original", False):
            continue
        seen: Set[str] = set()
        todo = list(p.stages[name].inputs)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            option = p.classes[n].keep_original_option
            if option is None:
                todo.extend(p.stages[n].inputs)
                continue
            cfg = p.stages[n]
            if option not in cfg.model_fields_set and not getattr(cfg, option):
                cfg = cfg.model_copy(update={option: True})
                p.config.stages[n] = cfg
                p.instances[n] = p.classes[n](cfg, StageContext(n))


def check_graph(p: Pipeline) -> List[str]:
    """Cross-checks over the stage graph; fills ``p.policies`` and ``p.output_kinds``."""
    errors: List[str] = []
    names = list(p.stages)
    for name, s in p.stages.items():
        is_source = issubclass(p.classes[name], Source)
        for i in s.inputs:
            if i not in p.stages:
                errors.append(f"stages.{name}.inputs: {i!r} is not a stage; known: {', '.join(names)}")
            elif i == name:
                errors.append(f"stages.{name}.inputs: a stage cannot be its own input")
        if len(set(s.inputs)) != len(s.inputs):
            errors.append(f"stages.{name}.inputs: lists a stage twice (got {s.inputs!r})")
        if is_source and s.inputs:
            errors.append(f"stages.{name}.inputs: a source takes no inputs (got {s.inputs!r})")
        if not is_source and not s.inputs:
            errors.append(f"stages.{name}.inputs: a {p.kind(name)} needs at least one input")
        for i in s.inputs:
            if i in p.stages and issubclass(p.classes[i], Sink):
                errors.append(f"stages.{name}.inputs: {i!r} is a sink; sinks emit nothing")
        if s.worker is not None and not _NAME_RE.match(s.worker):
            errors.append(f"stages.{name}.worker: not a valid worker name (got {s.worker!r})")
    if errors:
        return errors

    cycle = _find_cycle(p)
    if cycle:
        return [f"stages.{cycle[0]}.inputs: cycle {' -> '.join(cycle)}"]

    for name in names:
        if p.kind(name) != "source":
            continue
        seen, todo = {name}, [name]
        reached = False
        while todo and not reached:
            for c in p.consumers(todo.pop()):
                reached = reached or p.kind(c) == "sink"
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        if not reached:
            errors.append(f"stages.{name}: source {name!r} reaches no sink")

    for name in _topological(p):
        inst = p.instances[name]
        kind = inst.output_kind()
        if kind is None and p.kind(name) != "source":
            kinds = {p.output_kinds[i] for i in p.stages[name].inputs}
            kind = kinds.pop() if len(kinds) == 1 else None
        p.output_kinds[name] = kind
        accepts = p.classes[name].accepts
        for i in p.stages[name].inputs:
            got = p.output_kinds[i]
            if accepts and got is not None and got not in accepts:
                errors.append(
                    f"stages.{name}.inputs: {i!r} emits {got}, but {p.types[name]} accepts "
                    f"{' or '.join(accepts)}"
                )
        policy = p.stages[name].policy
        if policy is None and p.kind(name) != "source":
            live = any(_is_live(p.instances[s]) for s in p.upstream_sources(name))
            policy = "latest" if live else "block"
        p.policies[name] = policy or "block"
    return errors


def check_upstream(p: Pipeline) -> List[str]:
    """Each stage's :meth:`Stage.check_upstream` against the stages it takes input from."""
    errors: List[str] = []
    order = p.flow_order()
    for name in order:
        above = p.upstream(name)
        upstream = {n: p.instances[n] for n in order if n in above}
        try:
            p.instances[name].check_upstream(upstream)
        except ValueError as exc:
            errors.append(f"stages.{name}: {' '.join(str(exc).split())}")
    return errors


def _upstream(p: Pipeline, name: str) -> Set[str]:
    seen: Set[str] = set()
    todo = list(p.stages[name].inputs)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(p.stages[n].inputs)
    return seen


def _is_live(stage: Stage) -> bool:
    return bool(getattr(stage, "live", True))


def _find_cycle(p: Pipeline) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1 visiting, 2 done
    stack: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        stack.append(n)
        for i in p.stages[n].inputs:
            if state.get(i) == 1:
                return stack[stack.index(i) :] + [i]
            if i not in state:
                found = visit(i)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in p.stages:
        if n not in state:
            found = visit(n)
            if found:
                # Report in data-flow order (producer first).
                return list(reversed(found))
    return None


def _topological(p: Pipeline) -> List[str]:
    order: List[str] = []
    done: Set[str] = set()

    def visit(n: str) -> None:
        if n in done:
            return
        done.add(n)
        for i in p.stages[n].inputs:
            visit(i)
        order.append(n)

    for n in p.stages:
        visit(n)
    return order


def load_config(
    path: str, registry: Optional[Registry] = None, env: Optional[Mapping[str, str]] = None
) -> Pipeline:
    """Read, parse and validate a config file; ConfigError (one line per problem) otherwise.
    No input, however broken or hostile, ends in another exception."""
    try:
        return _load_config(path, registry, env)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a pipeline config"]) from None
    except Exception as exc:  # never a traceback for a file a user wrote
        raise ConfigError([f"{path}: cannot be loaded: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"]) from None


MAX_VALUES = 1_000_000
"""The most values a config may expand to through YAML aliases: a real one has a few hundred; a
few lines of nested aliases can stand for billions ("billion laughs")."""


def _load_config(path: str, registry: Optional[Registry], env: Optional[Mapping[str, str]]) -> Pipeline:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        # yaml.safe_load in two steps, to see the nodes: it keeps a repeated key's last value.
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {' '.join(str(problem).split())}"]) from None
    if data is None:
        raise ConfigError([f"{path}: the file is empty"])
    if _expanded_size(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigError([
            f"{path}: expands to more than {MAX_VALUES} values through YAML aliases; "
            "a pipeline config is far smaller"
        ])
    duplicates = _duplicate_keys(node, "", set())
    if duplicates:
        raise ConfigError(duplicates)
    return parse_config(data, registry, env, path=os.path.abspath(path))


def _expanded_size(data: Any, limit: int) -> int:
    """How many values ``data`` holds with every alias expanded (a shared node counts each time
    it appears), without expanding anything; stops counting past ``limit``. Cycles count once
    here (the interpolation step names them)."""
    sizes: Dict[int, int] = {}

    def size(value: Any) -> int:
        if not isinstance(value, (dict, list)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # on the path: a cycle back to it counts 1
        total = 1
        for item in (value.values() if isinstance(value, dict) else value):
            total += size(item)
            if total > limit:
                break
        sizes[key] = total
        return total

    return size(data)


def _duplicate_keys(node: Any, path: str, seen_nodes: Set[int]) -> List[str]:
    """One line per mapping key written twice (a second stage of the same name would silently
    replace the first)."""
    if id(node) in seen_nodes:  # an alias: checked where its anchor is
        return []
    seen_nodes.add(id(node))
    errors: List[str] = []
    if isinstance(node, yaml.MappingNode):
        lines: Dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            where = f"{path}.{name}" if path else name
            line = key.start_mark.line + 1
            if name in lines:
                errors.append(f"{where}: duplicate key (lines {lines[name]} and {line})")
            lines.setdefault(name, line)
            errors += _duplicate_keys(value, where, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            errors += _duplicate_keys(item, f"{path}[{i}]", seen_nodes)
    return errors
