"""Templates in rules and in installer files: Jinja2 in its sandbox, compiled when the rules load.

A value of rules.yaml with `{{`, `{%` or `{#` in it is a template; so is every file a rule
serves (`files:`). They are compiled with the rules, so a syntax error, an attribute of
Python's internals (`__class__`), an include outside the templates folder or a variable
no source can ever supply is a `file:line` error before any machine asks.

Rendering is bounded: undefined variables are errors (StrictUndefined), not empty text;
no loop runs more than MAX_STEPS steps in all, no render makes more than MAX_CALLS calls or
takes more than RENDER_SECONDS, and no output is longer than its field or file allows. A
template that breaks a bound raises TemplateFailure, and the rule takes its failure path.
Only a curated set of filters is there, none that can make text far larger than its input
(`center(10**9)`), and no global but `range` (bounded) and `dict`: without `namespace()`,
no state is carried from one loop step to the next.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import SandboxedEnvironment

MARKS = ("{{", "{%", "{#")
MAX_STEPS = 100_000  # loop steps of range() in one render
MAX_CALLS = 10_000  # calls (methods, macros, globals) in one render
RENDER_SECONDS = 0.2
MAX_FIELD_CHARS = 4096  # a rendered value of rules.yaml
MAX_FILE_CHARS = 1024 * 1024  # a rendered file
MAX_REPEAT_CHARS = 1024 * 1024  # what `*` may make of a string or a list
SAFE_FILTERS = (
    "abs", "attr", "batch", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float",
    "groupby", "int", "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject",
    "rejectattr", "replace", "reverse", "round", "select", "selectattr", "slice", "sort", "string", "sum",
    "title", "tojson", "trim", "truncate", "unique", "upper", "urlencode", "wordcount",
)


class TemplateFailure(Exception):
    """A template could not be rendered for this machine; the message names no value."""


def is_template(text: str) -> bool:
    return any(mark in text for mark in MARKS)


# --------------------------------------------------------------------------- the budget


class _Budget:
    __slots__ = ("deadline", "steps", "calls")

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.steps = 0
        self.calls = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateFailure(f"rendering took longer than {RENDER_SECONDS:g} s")


_current = threading.local()


def _budget() -> _Budget:
    budget = getattr(_current, "budget", None)
    if budget is None:  # rendered outside render(): no bound would hold
        raise TemplateFailure("a template rendered outside its budget")
    return budget


class _Steps:
    """range(), counted: every step spends from the render's budget."""

    def __init__(self, steps: range) -> None:
        self.steps = steps

    def __iter__(self) -> Iterator[int]:
        budget = _budget()
        for number in self.steps:
            budget.steps += 1
            if budget.steps > MAX_STEPS:
                raise TemplateFailure(f"loops ran more than {MAX_STEPS:,} steps")
            if not budget.steps & 255:
                budget.check_time()
            yield number

    def __len__(self) -> int:
        return len(self.steps)


def _range(*args: int) -> _Steps:
    steps = range(*args)
    if len(steps) > MAX_STEPS:
        raise TemplateFailure(f"a range of {len(steps):,} steps (at most {MAX_STEPS:,})")
    return _Steps(steps)


class BootrulesSandbox(SandboxedEnvironment):
    """Jinja's sandbox (no attribute of Python's internals, no unsafe call), with bounds."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's name)
        budget = _budget()
        budget.calls += 1
        if budget.calls > MAX_CALLS:
            raise TemplateFailure(f"more than {MAX_CALLS:,} calls")
        budget.check_time()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TemplateFailure("an exponent larger than 64")
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, (str, list, tuple)) and isinstance(times, int) \
                        and len(sequence) * times > MAX_REPEAT_CHARS:
                    raise TemplateFailure(f"a repetition longer than {MAX_REPEAT_CHARS:,}")
        return super().call_binop(context, operator, left, right)


def environment(folder: str | None = None) -> BootrulesSandbox:
    """The sandbox templates are compiled in; `folder`: where files may include others from."""
    made = BootrulesSandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
                            loader=jinja2.FileSystemLoader(folder) if folder else None, auto_reload=False)
    made.filters = {name: made.filters[name] for name in SAFE_FILTERS}
    made.tests = dict(made.tests)
    made.globals = {"range": _range, "dict": dict}
    return made


# --------------------------------------------------------------------------- compiled templates


class Lookup:
    """A machine's variables as templates see them: looked up in turn, never merged, until a
    template with logic needs them as one mapping."""

    __slots__ = ("sources",)

    def __init__(self, *sources: Mapping[str, str]) -> None:
        self.sources = sources  # the first that has a name wins

    def get(self, name: str) -> str | None:
        for source in self.sources:
            value = source.get(name)
            if value is not None:
                return value
        return None

    def mapping(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for source in reversed(self.sources):
            merged.update(source)
        return merged


@dataclass(frozen=True)
class Template:
    """A compiled template and the variables it names (beyond its own).

    `parts`: for a template that only puts variables between text (most of them), the text
    and the variable names in turn, rendered without Jinja; None for one with logic.
    """

    text: str
    compiled: Any = field(compare=False, repr=False)
    names: frozenset[str] = frozenset()
    parts: tuple[tuple[bool, str], ...] | None = field(default=None, compare=False, repr=False)

    def render_in(self, found: Lookup, limit: int = MAX_FIELD_CHARS) -> str:
        """The text for the variables `found` gives; TemplateFailure as render()."""
        if self.parts is None:
            return self.render(found.mapping(), limit)
        out = []
        for is_name, text in self.parts:
            if not is_name:
                out.append(text)
                continue
            value = found.get(text)
            if value is None:
                raise TemplateFailure(f"variable '{text}' is not set for this machine")
            out.append(value)
        rendered = "".join(out)
        if len(rendered) > limit:
            raise TemplateFailure(f"the output is longer than {limit:,} characters")
        return rendered

    def render(self, variables: Mapping[str, str], limit: int = MAX_FIELD_CHARS) -> str:
        """The text for these variables; TemplateFailure if a bound is broken or a variable is unset."""
        _current.budget = _Budget(RENDER_SECONDS)
        size, chunks = 0, []
        try:
            for chunk in self.compiled.generate(variables):
                size += len(chunk)
                if size > limit:
                    raise TemplateFailure(f"the output is longer than {limit:,} characters")
                chunks.append(chunk)
                _current.budget.check_time()
        except jinja2.UndefinedError as error:
            raise TemplateFailure(_undefined(error)) from None
        except jinja2.exceptions.SecurityError:
            raise TemplateFailure("it reached for something the sandbox forbids") from None
        except TemplateFailure:
            raise
        except RecursionError:
            raise TemplateFailure("it recursed too deep") from None
        except (ArithmeticError, TypeError, ValueError, LookupError, jinja2.TemplateError) as error:
            raise TemplateFailure(f"it failed: {type(error).__name__}") from None
        finally:
            _current.budget = None
        return "".join(chunks)


def _undefined(error: Exception) -> str:
    text = str(error)
    if text.startswith("'") and text.endswith("' is undefined"):
        return f"variable {text[:-len(' is undefined')]} is not set for this machine"
    return "it used something that is not set for this machine"


class CompileError(Exception):
    """A template that cannot be used; `line` is its line within the template text."""

    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


def compile_text(sandbox: BootrulesSandbox, text: str, name: str | None = None) -> Template:
    """Compile `text`; CompileError for a syntax error, an attribute of Python's internals,
    or an include that is not a plain file of the templates folder."""
    try:
        tree = sandbox.parse(text, name=name)
    except jinja2.TemplateSyntaxError as error:
        raise CompileError(f"template: {error.message}", error.lineno or 1) from None
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        attribute = node.attr if isinstance(node, nodes.Getattr) else (
            node.arg.value if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) else "")
        if attribute.startswith("_"):
            raise CompileError(f"template: {attribute!r} is not an attribute a template may use", node.lineno)
    for included in meta.find_referenced_templates(tree):
        if included is None:
            raise CompileError("template: include, import and extends must name a file, not compute it")
        if sandbox.loader is None:
            raise CompileError("template: only files (files:) may include other templates")
        if included.startswith("/") or ".." in included.split("/"):
            raise CompileError(f"template: {included!r} is outside the templates folder")
    names = set(meta.find_undeclared_variables(tree)) - set(sandbox.globals)
    parts = _plain_parts(tree)
    try:
        compiled = sandbox.from_string(tree) if name is None else sandbox.get_template(name)
    except jinja2.TemplateNotFound as missing:
        raise CompileError(f"template: {missing.name!r} is not in the templates folder") from None
    except jinja2.TemplateSyntaxError as error:
        raise CompileError(f"template: {error.message}", error.lineno or 1) from None
    return Template(text, compiled, frozenset(names), parts)


def _plain_parts(tree: nodes.Template) -> tuple[tuple[bool, str], ...] | None:
    """The template as text and variable names in turn, if that is all it is (no filter, no
    test, no logic, no attribute): (is a name, text or name)."""
    parts: list[tuple[bool, str]] = []
    for statement in tree.body:
        if not isinstance(statement, nodes.Output):
            return None
        for node in statement.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append((False, node.data))
            elif isinstance(node, nodes.Name) and node.ctx == "load":
                parts.append((True, node.name))
            else:
                return None
    return tuple(parts)


def compile_file(sandbox: BootrulesSandbox, folder: str, name: str) -> Template:
    """A file of the templates folder, with the variables of every file it includes."""
    if name.startswith("/") or ".." in name.split("/") or not name:
        raise CompileError(f"{name!r} is not a file of the templates folder")
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read(MAX_FILE_CHARS + 1)
    except FileNotFoundError:
        raise CompileError(f"{name!r} is not in the templates folder ({folder})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CompileError(f"{name!r}: cannot read: {getattr(error, 'strerror', None) or error}") from None
    template = compile_text(sandbox, text, name)
    if template.parts is not None:
        return template  # it includes nothing
    names = set(template.names)
    seen = {name}
    todo = list(meta.find_referenced_templates(sandbox.parse(text)))
    while todo:
        included = todo.pop()
        if included in seen or included is None:
            continue
        seen.add(included)
        source = sandbox.loader.get_source(sandbox, included)[0]  # type: ignore[union-attr]
        names |= set(meta.find_undeclared_variables(sandbox.parse(source))) - set(sandbox.globals)
        todo += meta.find_referenced_templates(sandbox.parse(source))
    return Template(text, template.compiled, frozenset(names))
