"""The code keeps working on Python 3.8 (JetPack 5), checked without a 3.8 interpreter.

`vermin` reads every module and names the minimum Python version each construct or library call
needs; it runs with annotations treated as evaluated, so ``list[int]``-style generics count.
vermin's own ``X | Y`` detection is a heuristic that also fires on bit flags (``os.R_OK |
os.W_OK``), so unions are checked here by reading the syntax tree instead: an ``X | Y`` annotation
is fine under ``from __future__ import annotations`` until something evaluates it, and pydantic
(model fields) and typer (command parameters) do, at import time, which on 3.8 is a TypeError.
Methods that vermin cannot see on a variable of unknown type (``s.removeprefix``) are looked for by
name. Each check is first shown to catch planted violations, so a broken check cannot pass
silently.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("edgepipe", "plugins", "tools", "benchmarks", "tests")
# --exclude long: torch's Tensor.long() reads as Python 2's `long`, and a file whose versions
# "cannot be combined" drops out of the verdict (so a real violation in it would go unseen).
VERMIN_ARGS = ["-t=3.8-", "--no-tips", "--violations", "--eval-annotations", "--pessimistic",
               "--exclude", "long"]


def vermin(*paths: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("vermin")
    if not exe.exists():
        found = shutil.which("vermin")
        if found is None:
            pytest.fail("vermin is not installed (it is in the test extra: pip install -e '.[test]')")
        exe = Path(found)
    return subprocess.run(
        [str(exe), *VERMIN_ARGS, *map(str, paths)], capture_output=True, text=True, timeout=300
    )


PLANTED = {
    "cache.py": "import functools\n\n@functools.cache\ndef f() -> int:\n    return 1\n",
    "zip_strict.py": "def f(a, b):\n    return list(zip(a, b, strict=True))\n",
    "match.py": "def f(x):\n    match x:\n        case 1:\n            return 2\n",
    "generic.py": "from __future__ import annotations\n\ndef f(x: list[int]) -> dict[str, int]:\n    return {}\n",
    "resources.py": "import importlib.resources\n\nDATA = importlib.resources.files('edgepipe')\n",
    "dict_union.py": "A = {'a': 1} | {'b': 2}\n",
    "torch_long.py": "import sys\n\ndef f(t):\n    return t.long(), sys.version_info >= (3, 12)\n",
}


def test_vermin_catches_planted_violations(tmp_path):
    for name, code in PLANTED.items():
        (tmp_path / name).write_text(code)
    proc = vermin(tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    flagged = {Path(line.split()[-1]).name for line in proc.stdout.splitlines() if line.startswith("!2")}
    assert flagged == set(PLANTED) - {"torch_long.py"}, proc.stdout  # and nothing else
    assert "could not be combined" not in proc.stdout


def test_code_needs_nothing_newer_than_python_38():
    proc = vermin(*(REPO / d for d in SCANNED if (REPO / d).is_dir()))
    report = proc.stdout + proc.stderr
    assert "could not be combined" not in report, (
        "vermin could not decide a file's version (a false positive? add an --exclude):\n" + report
    )
    assert proc.returncode == 0, "code that needs Python > 3.8:\n" + report


# --------------------------------------------------------------------------------------- methods

# Methods added after 3.8 on types vermin cannot infer for a variable (it only knows literals).
NEWER_METHODS = {
    "removeprefix": "3.9", "removesuffix": "3.9", "is_relative_to": "3.9", "with_stem": "3.9",
    "bit_count": "3.10", "hardlink_to": "3.10",
}


def newer_method_calls(source: str, filename: str) -> List[str]:
    return [
        f"{filename}:{node.lineno}: .{node.func.attr}() needs Python {NEWER_METHODS[node.func.attr]}"
        for node in ast.walk(ast.parse(source, filename))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in NEWER_METHODS
    ]


def test_method_check_catches_planted_calls():
    source = "def f(s, p):\n    return s.removeprefix('x'), p.is_relative_to(p), s.strip()\n"
    assert newer_method_calls(source, "m.py") == [
        "m.py:2: .removeprefix() needs Python 3.9", "m.py:2: .is_relative_to() needs Python 3.9"
    ]


def test_no_methods_newer_than_python_38():
    problems: List[str] = []
    for path, rel in _scanned_files():
        problems += newer_method_calls(path.read_text(encoding="utf-8"), rel)
    assert not problems, "\n".join(problems)


def _scanned_files() -> Iterator[Tuple[Path, str]]:
    for d in SCANNED:
        for path in sorted((REPO / d).rglob("*.py")):
            yield path, str(path.relative_to(REPO))


# --------------------------------------------------------------------------------------- unions

PYDANTIC_BASES = {"BaseModel", "BaseSettings", "RootModel", "StageConfig", "TypedDict"}
TYPER_PARAMS = {"Option", "Argument"}
EVALUATING_DECORATORS = {"validate_call", "validate_arguments", "command", "callback"}


def _name(node: ast.AST) -> str:
    """`a.b.C` or `C` -> "C"; calls -> the called name."""
    if isinstance(node, ast.Call):
        return _name(node.func)
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript):  # Generic[T], RootModel[int]
        return _name(node.value)
    return ""


def _bad_parts(annotation: ast.AST) -> Iterator[str]:
    """The parts of an annotation that Python 3.8 cannot evaluate."""
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return
    for node in ast.walk(annotation):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            yield "X | Y (use Optional[X] / Union[X, Y])"
        elif isinstance(node, ast.Subscript) and _name(node.value) in {
            "list", "dict", "set", "frozenset", "tuple", "type"
        } and isinstance(node.value, ast.Name):
            yield f"{node.value.id}[...] (use typing.{node.value.id.capitalize()})"


def evaluated_annotation_problems(source: str, filename: str) -> List[str]:
    """``file:line: ...`` for every annotation that pydantic or typer evaluates and 3.8 cannot."""
    tree = ast.parse(source, filename)
    # Pydantic models: classes deriving (within this module, by name) from a known base.
    models: Set[str] = set(PYDANTIC_BASES)
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for c in classes:
            if c.name not in models and any(_name(b) in models for b in c.bases):
                models.add(c.name)
                changed = True
    # Typer commands: registered with app.command()(f) / @app.command(), or with Option/Argument.
    commands: Set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Call)
            and _name(node.func) in EVALUATING_DECORATORS
            and node.args
            and isinstance(node.args[0], ast.Name)
        ):
            commands.add(node.args[0].id)

    found: List[Tuple[int, str, str]] = []
    for c in classes:
        if c.name in models and c.name not in PYDANTIC_BASES:
            for stmt in c.body:
                if isinstance(stmt, ast.AnnAssign):
                    for part in _bad_parts(stmt.annotation):
                        found.append((stmt.lineno, f"field of pydantic model {c.name}", part))
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        defaults = fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]
        evaluated = (
            fn.name in commands
            or any(_name(d) in EVALUATING_DECORATORS for d in fn.decorator_list)
            or any(isinstance(d, ast.Call) and _name(d) in TYPER_PARAMS for d in defaults)
        )
        if not evaluated:
            continue
        for a in args:
            for part in _bad_parts(a.annotation) if a.annotation is not None else ():
                found.append((a.lineno, f"parameter {a.arg!r} of {fn.name}()", part))
        # typing.get_type_hints (typer, pydantic) evaluates the return annotation too.
        for part in _bad_parts(fn.returns) if fn.returns is not None else ():
            found.append((fn.lineno, f"return of {fn.name}()", part))
    return [f"{filename}:{line}: {what}: {part}" for line, what, part in sorted(found)]


def test_union_check_catches_planted_annotations():
    source = textwrap.dedent(
        '''
        from __future__ import annotations
        import os
        from typing import Optional
        import typer
        from pydantic import BaseModel

        class Base(BaseModel):
            a: Optional[int] = None
            b: int | None = None

        class Child(Base):
            c: "list[int]" = []

        class Plain:
            d: int | None = None  # not evaluated: fine

        def cmd(x: str | None = typer.Option(None), y: Optional[str] = None) -> None:
            pass

        def registered(z: dict[str, int]) -> int | None:
            return os.R_OK | os.W_OK  # bit flags, not a union

        def helper(w: int | None = None) -> None:  # never evaluated: fine
            pass

        app = typer.Typer()
        app.command()(registered)
        '''
    )
    problems = evaluated_annotation_problems(source, "m.py")
    assert [p.split(": ", 2)[:2] for p in problems] == [
        ["m.py:10", "field of pydantic model Base"],
        ["m.py:13", "field of pydantic model Child"],
        ["m.py:18", "parameter 'x' of cmd()"],
        ["m.py:21", "parameter 'z' of registered()"],
        ["m.py:21", "return of registered()"],
    ], problems


def test_evaluated_annotations_work_on_python_38():
    problems: List[str] = []
    for path, rel in _scanned_files():
        problems += evaluated_annotation_problems(path.read_text(encoding="utf-8"), rel)
    assert not problems, "annotations evaluated at runtime that Python 3.8 cannot evaluate:\n" + (
        "\n".join(problems)
    )
