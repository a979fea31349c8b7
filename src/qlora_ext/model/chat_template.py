"""Chat templates rendered as transformers renders them, in a bounded sandbox.

The environment is transformers' (ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks; `{% break %}`/`{% continue %}`; `{% generation %}` blocks; `raise_exception`,
`strftime_now`, `tojson` with json.dumps semantics, `namespace` refusing underscore names),
so that a model's own template compiles here and renders the same text.

A template comes from a model file, so it is data, not code: it may not load other templates
(include/import/extends are refused when it compiles), and one rendering is bounded in time
(every loop iteration and every call checks a deadline) and in size (the output, every string
or list built by `*`, `+`, `~`, `%`, a filter or a call, and every integer argument that
could size one, are checked against a limit that grows with the input's length).  Whatever
goes wrong while rendering comes back as one ValueError naming the template's file."""
from __future__ import annotations

import functools
import json
import re
import time
from contextvars import ContextVar
from datetime import datetime

# Fixed part of the size limit (characters or items); the rest grows with the messages' length.
BASE_LIMIT = 1 << 20
# Seconds one rendering may take; real templates take milliseconds.
TIME_LIMIT = 5.0
_BIG_NUMBER = re.compile(r"\d{7,}")


class TemplateLimitError(ValueError):
    """A rendering ran past its time or size bound."""


class _Budget:
    def __init__(self, limit: int, seconds: float):
        self.limit, self.deadline, self.seconds = limit, time.monotonic() + seconds, seconds
        self.chunks: list = []
        self.out_len = 0  # characters in chunks
        self.generation_spans: list = []

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"rendering took longer than {self.seconds:g} s")

    def check_size(self, value, what: str = "a value"):
        if isinstance(value, (str, list, tuple, dict, bytes)) and len(value) > self.limit:
            raise TemplateLimitError(f"{what} of {len(value):,} items is over the limit of {self.limit:,}")
        return value

    def check_args(self, args, kwargs, what: str) -> None:
        """Integer arguments: widths and counts that would size a string or list."""
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.limit:
                raise TemplateLimitError(f"{what}: argument {a} is over the size limit of {self.limit:,}")

    def check_format(self, text: str, what: str) -> None:
        for m in _BIG_NUMBER.finditer(text):
            if int(m.group()) > self.limit:
                raise TemplateLimitError(f"{what}: width {m.group()} is over the size limit of {self.limit:,}")


def _size(seq) -> int:
    """Items of a string, or of a list counting its strings' and lists' lengths."""
    if isinstance(seq, str):
        return len(seq)
    return sum(len(x) if isinstance(x, (str, list, tuple)) else 1 for x in seq) or 1


_BUDGET: ContextVar = ContextVar("qlora_ext_chat_template_budget", default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    # outside ChatTemplate.render (a template of environment() rendered directly): sizes are
    # still bounded, each hook starting its own clock
    return b if b is not None else _Budget(BASE_LIMIT, TIME_LIMIT)


class _CheckedIter:
    """The iterable of a template's for loop, checking the deadline as it goes."""

    def __init__(self, iterable):
        self._it = iter(iterable)
        self._budget = _budget()

    def __iter__(self):
        return self

    def __next__(self):
        self._budget.tick()
        return next(self._it)


class _SizedCheckedIter(_CheckedIter):
    def __init__(self, iterable):
        super().__init__(iterable)
        self._len = len(iterable)

    def __len__(self):  # loop.length / loop.last without materializing the sequence
        return self._len


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class Bounds(Extension):
        """`{% generation %}` blocks (their character spans in the output are recorded, as
        transformers' assistant mask does) and the hooks the bounding rewrite calls."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            b = _budget()
            b.generation_spans.append((b.out_len, b.out_len + len(text)))
            return text

        @staticmethod
        def checked_iter(iterable):
            return _SizedCheckedIter(iterable) if hasattr(iterable, "__len__") else _CheckedIter(iterable)

        @staticmethod
        def concat(*parts):
            b = _budget()
            parts = [str(p) for p in parts]
            if sum(len(p) for p in parts) > b.limit:
                raise TemplateLimitError(f"a string built with '~' is over the size limit of {b.limit:,}")
            return "".join(parts)

    class Rewrite(NodeTransformer):
        """Routes every for loop's iterable and every '~' through the Bounds hooks; refuses
        statements that load other templates."""

        def __init__(self, ext_id):
            self.ext_id = ext_id

        def hook(self, name, args, lineno):
            return nodes.Call(nodes.ExtensionAttribute(self.ext_id, name), args, [], None, None, lineno=lineno)

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = self.hook("checked_iter", [node.iter], node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return self.hook("concat", node.nodes, node.lineno)

        def refuse(self, node):
            kind = type(node).__name__.lower().replace("fromimport", "from-import")
            raise jinja2.TemplateSyntaxError(f"'{kind}' is not allowed: a chat template may not load other "
                                             "templates", node.lineno)

        visit_Include = visit_Import = visit_FromImport = visit_Extends = refuse

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            return Rewrite(Bounds.identifier).visit(tree)

        def call_binop(self, context, operator, left, right):
            b = _budget()
            b.tick()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and _size(seq) * n > b.limit:
                        raise TemplateLimitError(f"'*' would build {_size(seq) * n:,} items, over the size "
                                                 f"limit of {b.limit:,}")
            elif operator == "**":
                if isinstance(right, int) and isinstance(left, (int, float)) and abs(left) > 1 and right > 256:
                    raise TemplateLimitError(f"'**' with exponent {right} is over the limit of 256")
            elif operator == "%" and isinstance(left, str):
                b.check_format(left, "'%' formatting")
            return b.check_size(super().call_binop(context, operator, left, right), f"the result of '{operator}'")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            b = _budget()
            b.tick()
            method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            if getattr(method, "__self__", None).__class__ is str and getattr(method, "__name__", "") in (
                    "format", "format_map"):
                b.check_format(method.__self__, "str.format")
            b.check_args(args, kwargs, getattr(__obj, "__name__", "a call"))
            return b.check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")

    def bounded_filter(name, f):
        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
        def run(*args, **kwargs):
            b = _budget()
            b.tick()
            # the value filtered, then its arguments (after jinja's context/environment, if passed)
            values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                            jinja2.nodes.EvalContext))]
            if name == "format" and values and isinstance(values[0], str):
                b.check_format(values[0], "filter 'format'")
            b.check_args(values[1:], kwargs, f"filter '{name}'")
            return b.check_size(f(*args, **kwargs), f"the result of filter '{name}'")

        return run

    def raise_exception(message):
        raise jinja2.TemplateError(str(message))

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # json.dumps, not jinja's HTML-escaping tojson: what transformers renders
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore names (no way to reach object internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 (jinja's Namespace takes self in *args too)
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for k in attrs:
                Namespace._check(k)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Bounds, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace)
    return env


@functools.lru_cache(maxsize=1)
def environment():
    """The one template environment (compiling is per template; the environment is shared)."""
    return _environment()


class ChatTemplate:
    """A compiled chat template: `render(messages, ...) -> (text, generation_spans)`."""

    time_limit = TIME_LIMIT

    def __init__(self, source_text: str, where: str = "tokenizer"):
        from jinja2 import TemplateError

        if not isinstance(source_text, str):
            raise ValueError(f"{where}: chat template must be a string, got {type(source_text).__name__}")
        self.where = where
        self.has_generation_blocks = bool(re.search(r"\{%-?\s*generation\s*-?%\}", source_text))
        try:
            self._template = environment().from_string(source_text)
        except TemplateError as e:
            raise ValueError(f"{where}: chat template does not compile ({e})") from None
        except RecursionError:
            raise ValueError(f"{where}: chat template does not compile (nested too deeply)") from None

    def render(self, messages, add_generation_prompt: bool = False, **kwargs) -> tuple:
        """(text, [(start, end)] character spans of `{% generation %}` blocks)."""
        size = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
        budget = _Budget(BASE_LIMIT + 8 * size, self.time_limit)
        token = _BUDGET.set(budget)
        try:
            for chunk in self._template.generate(messages=list(messages),
                                                 add_generation_prompt=add_generation_prompt, **kwargs):
                budget.chunks.append(chunk)
                budget.out_len += len(chunk)
                if budget.out_len > budget.limit:
                    raise TemplateLimitError(f"the rendered text is over the size limit of {budget.limit:,} "
                                             "characters")
                budget.tick()
            text = "".join(budget.chunks)
        except TemplateLimitError as e:
            raise ValueError(f"{self.where}: chat template stopped: {e}") from None
        except RecursionError:
            raise ValueError(f"{self.where}: chat template failed: recursion too deep") from None
        except MemoryError:
            raise ValueError(f"{self.where}: chat template failed: out of memory") from None
        except Exception as e:  # noqa: BLE001 - the template is data: any fault in it is a bad input
            raise ValueError(f"{self.where}: chat template failed: {type(e).__name__}: {e}") from None
        finally:
            _BUDGET.reset(token)
        return text, list(budget.generation_spans)
