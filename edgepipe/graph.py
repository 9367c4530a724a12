"""The stage graph of a pipeline: its shape and the cross-checks over it.

A :class:`Pipeline` is one record per stage (:class:`StageSpec`: name, type, class, validated
config, an unstarted instance, the settings as written, its input link policy, what it emits,
its worker). :func:`check_graph` refuses what cannot run (dangling or repeated inputs, a source
with inputs, a sink used as an input, a cycle, a source that reaches no sink, kinds that do not
fit) and decides each link's policy; :func:`check_upstream` runs each stage's own static
cross-check; :func:`carry_originals` turns on ``keep_original`` where a drawing sink needs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Type

from edgepipe.stage import Sink, Source, Stage, StageConfig, StageContext

if TYPE_CHECKING:  # the config models import this module
    from edgepipe.config import PipelineConfig

__all__ = ["NAME_PATTERN", "Pipeline", "StageSpec", "carry_originals", "check_graph", "check_upstream"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)


@dataclass
class StageSpec:
    """One stage of a validated pipeline."""

    name: str
    type: str  # the plugin (entry point) name
    cls: Type[Stage]
    config: StageConfig  # validated against the plugin's model
    instance: Stage  # cheap and unstarted: pre-flight checks, validation hooks
    settings: Dict[str, Any]  # as written (after interpolation), compared on reload
    policy: str = "block"  # how its input link behaves ('latest' or 'block'); set by check_graph
    output_kind: Optional[str] = None  # what it emits (see edgepipe.stage.DATA_KINDS), if known

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def inputs(self) -> List[str]:
        return list(self.config.inputs)

    @property
    def worker(self) -> str:
        """The worker process it runs in: its ``worker`` setting, else one of its own."""
        return self.config.worker or self.name


class Pipeline:
    """A validated config: the top-level settings (``config``), one :class:`StageSpec` per stage
    (``specs``, in config order), the file it came from, and per setting path the environment
    variables its value came from (``variables``)."""

    def __init__(
        self,
        config: PipelineConfig,
        specs: Dict[str, StageSpec],
        path: Optional[str] = None,
        variables: Optional[Dict[str, List[str]]] = None,
    ) -> None:
        self.config = config
        self.specs = specs
        self.path = path
        self.variables = variables or {}

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def stages(self) -> Dict[str, StageConfig]:
        """Stage name -> validated config (what ``config.stages`` holds)."""
        return {n: s.config for n, s in self.specs.items()}

    # Views over the records, by stage name.
    @property
    def instances(self) -> Dict[str, Stage]:
        return {n: s.instance for n, s in self.specs.items()}

    @property
    def policies(self) -> Dict[str, str]:
        return {n: s.policy for n, s in self.specs.items()}

    @property
    def output_kinds(self) -> Dict[str, Optional[str]]:
        return {n: s.output_kind for n, s in self.specs.items()}

    def kind(self, name: str) -> str:
        return self.specs[name].kind

    def consumers(self, name: str) -> List[str]:
        """Stages that list ``name`` among their inputs, in config order."""
        return [n for n, s in self.specs.items() if name in s.config.inputs]

    def upstream(self, name: str) -> Set[str]:
        """Every stage ``name`` takes input from, directly or through others."""
        seen: Set[str] = set()
        todo = list(self.specs[name].config.inputs)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.specs[n].config.inputs)
        return seen

    def upstream_sources(self, name: str) -> Set[str]:
        return {n for n in self.upstream(name) if self.kind(n) == "source"}

    def flow_order(self) -> List[str]:
        """Stage names with every stage after its inputs (config order otherwise)."""
        order: List[str] = []
        done: Set[str] = set()

        def visit(n: str) -> None:
            if n in done:
                return
            done.add(n)
            for i in self.specs[n].config.inputs:
                visit(i)
            order.append(n)

        for n in self.specs:
            visit(n)
        return order

    def workers(self) -> Dict[str, List[str]]:
        """Worker name -> its stages: a stage's ``worker`` setting, else a worker of its own."""
        out: Dict[str, List[str]] = {}
        for name, s in self.specs.items():
            out.setdefault(s.worker, []).append(name)
        return out

    def worker_of(self, stage: str) -> str:
        return self.specs[stage].worker

    def preflight(self, names: Optional[List[str]] = None) -> List[str]:
        """Each stage's ``check()`` (or only those in ``names``): one line per failure."""
        from edgepipe.stage import StageError

        errors = []
        for name, spec in self.specs.items():
            if names is not None and name not in names:
                continue
            try:
                spec.instance.check()
            except StageError as exc:
                errors.append(f"stages.{name}: {' '.join(str(exc).split())}")
            except Exception as exc:  # a plugin bug: still one line, naming the stage
                errors.append(f"stages.{name}: check failed: {type(exc).__name__}: {exc}")
        return errors

    def variable_settings(self, stages: List[str]) -> List[str]:
        """The settings of these stages whose values came from environment variables."""
        return [path for path in self.variables if any(path.startswith(f"stages.{s}.") for s in stages)]

    def hint(self, setting: str) -> str:
        """`` (from ${VAR} in FILE)`` when the value at ``setting`` came from environment
        variables, else ``""``: what to change, for a message about that setting."""
        names = self.variables.get(setting)
        if not names:
            return ""
        where = f" in {self.path}" if self.path else ""
        return f" (from {', '.join('${' + n + '}' for n in names)}{where})"


def check_graph(p: Pipeline) -> List[str]:
    """Cross-checks over the stage graph; sets each spec's ``policy`` and ``output_kind``."""
    errors: List[str] = []
    names = list(p.specs)
    for name, spec in p.specs.items():
        inputs = spec.config.inputs
        is_source = issubclass(spec.cls, Source)
        for i in inputs:
            if i not in p.specs:
                errors.append(f"stages.{name}.inputs: {i!r} is not a stage; known: {', '.join(names)}")
            elif i == name:
                errors.append(f"stages.{name}.inputs: a stage cannot be its own input")
        if len(set(inputs)) != len(inputs):
            errors.append(f"stages.{name}.inputs: lists a stage twice (got {inputs!r})")
        if is_source and inputs:
            errors.append(f"stages.{name}.inputs: a source takes no inputs (got {inputs!r})")
        if not is_source and not inputs:
            errors.append(f"stages.{name}.inputs: a {spec.kind} needs at least one input")
        for i in inputs:
            if i in p.specs and issubclass(p.specs[i].cls, Sink):
                errors.append(f"stages.{name}.inputs: {i!r} is a sink; sinks emit nothing")
        if spec.config.worker is not None and not NAME_RE.match(spec.config.worker):
            errors.append(f"stages.{name}.worker: not a valid worker name (got {spec.config.worker!r})")
    if errors:
        return errors

    cycle = _find_cycle(p)
    if cycle:
        return [f"stages.{cycle[0]}.inputs: cycle {' -> '.join(cycle)}"]

    for name in names:
        if p.kind(name) == "source" and not any(p.kind(c) == "sink" for c in _downstream(p, name)):
            errors.append(f"stages.{name}: source {name!r} reaches no sink")

    for name in p.flow_order():
        spec = p.specs[name]
        kind = spec.instance.output_kind()
        if kind is None and spec.kind != "source":
            kinds = {p.specs[i].output_kind for i in spec.config.inputs}
            kind = kinds.pop() if len(kinds) == 1 else None
        spec.output_kind = kind
        accepts = spec.cls.accepts
        for i in spec.config.inputs:
            got = p.specs[i].output_kind
            if accepts and got is not None and got not in accepts:
                errors.append(
                    f"stages.{name}.inputs: {i!r} emits {got}, but {spec.type} accepts "
                    f"{' or '.join(accepts)}"
                )
        policy = spec.config.policy
        if policy is None and spec.kind != "source":
            live = any(bool(getattr(p.specs[s].instance, "live", True)) for s in p.upstream_sources(name))
            policy = "latest" if live else "block"
        spec.policy = policy or "block"
    return errors


def check_upstream(p: Pipeline) -> List[str]:
    """Each stage's :meth:`Stage.check_upstream` against the stages it takes input from."""
    errors: List[str] = []
    order = p.flow_order()
    for name in order:
        above = p.upstream(name)
        upstream = {n: p.specs[n].instance for n in order if n in above}
        try:
            p.specs[name].instance.check_upstream(upstream)
        except ValueError as exc:
            errors.append(f"stages.{name}: {' '.join(str(exc).split())}")
    return errors


def carry_originals(p: Pipeline) -> None:
    """Turn on ``keep_original_option`` (the letterbox stage's ``keep_original``) in the stages
    upstream of every stage that ``needs_original`` (see :class:`edgepipe.stage.Sink`), where
    the config does not set it either way. The walk up a path stops at the first such stage."""
    for spec in list(p.specs.values()):
        if not getattr(spec.instance, "needs_original", False):
            continue
        seen: Set[str] = set()
        todo = list(spec.config.inputs)
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            up = p.specs[n]
            option = up.cls.keep_original_option
            if option is None:
                todo.extend(up.config.inputs)
                continue
            if option not in up.config.model_fields_set and not getattr(up.config, option):
                up.config = up.config.model_copy(update={option: True})
                up.instance = up.cls(up.config, StageContext(n, pipeline=p.name))


def _downstream(p: Pipeline, name: str) -> Set[str]:
    seen: Set[str] = set()
    todo = [name]
    while todo:
        for c in p.consumers(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _find_cycle(p: Pipeline) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1 visiting, 2 done
    stack: List[str] = []

    def visit(n: str) -> Optional[List[str]]:
        state[n] = 1
        stack.append(n)
        for i in p.specs[n].config.inputs:
            if state.get(i) == 1:
                return stack[stack.index(i) :] + [i]
            if i not in state:
                found = visit(i)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in p.specs:
        if n not in state:
            found = visit(n)
            if found:
                # Report in data-flow order (producer first).
                return list(reversed(found))
    return None
