"""The chat-template environment: transformers' features, sandboxed, bounded in time and size."""
import time

import pytest

from qlora_ext.model.chat_template import ChatTemplate

MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def render(source, limit_s=1.0, **kwargs):
    t = ChatTemplate(source, "tok/tokenizer_config.json")
    t.time_limit = limit_s
    return t.render(MSGS, **kwargs)


@pytest.mark.parametrize("source,want", [
    ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}", "hi"),
    ("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}", "yo"),
    ("{{ {'a': '<é>', 'b': [1]}|tojson }}", '{"a": "<é>", "b": [1]}'),  # json.dumps: no HTML escaping
    ("{{ {'b': 1, 'a': 2}|tojson(indent=2, sort_keys=true) }}", '{\n  "a": 2,\n  "b": 1\n}'),
    ("{% for m in messages %}{{ loop.length }}{{ loop.last }} {% endfor %}", "2False 2True "),
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "2"),
    ("{{ messages[::-1]|map(attribute='content')|join(',') }}", "yo,hi"),
])
def test_transformers_features(source, want):
    assert render(source)[0] == want


def test_strftime_now_and_generation_spans():
    text, spans = render("{{ strftime_now('%Y') }}|{% for m in messages %}{% generation %}{{ m.content }}"
                         "{% endgeneration %}.{% endfor %}")
    assert text == time.strftime("%Y") + "|hi.yo." and [text[a:b] for a, b in spans] == ["hi", "yo"]


def test_raise_exception_is_a_value_error_naming_the_file():
    with pytest.raises(ValueError, match=r"tok/tokenizer_config.json: chat template failed: .*roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")


@pytest.mark.parametrize("source", ["{% include 'x.jinja' %}", "{% import 'x' as y %}",
                                    "{% from 'x' import y %}", "{% extends 'base' %}"])
def test_loading_other_templates_is_refused_at_compile_time(source):
    with pytest.raises(ValueError, match=r"tok/tokenizer_config.json: chat template does not compile "
                                         r"\('[a-z-]+' is not allowed"):
        ChatTemplate(source, "tok/tokenizer_config.json")


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__ }}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% set ns = namespace(_x=1) %}",
    "{{ messages.append(1) }}",
])
def test_sandbox_holds(source):
    with pytest.raises(ValueError, match="chat template failed"):
        render(source)


@pytest.mark.parametrize("source,what", [
    # 10^10 iterations, without and with output
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% for m in messages recursive %}{% for i in range(100000) %}{% for j in range(100000) %}"
     "{% endfor %}{% endfor %}{% endfor %}", "longer than"),
    ("{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}", "longer than"),
    # 10^8-character strings, built in one step or by doubling
    ("{{ 'x' * 100000000 }}", "size limit"),
    ("{{ ['x' * 1000000] * 100 }}", "size limit"),
    ("{{ 'x'|center(100000000) }}", "size limit"),
    ("{{ 'x'.ljust(100000000) }}", "size limit"),
    ("{{ '%0100000000d' % 1 }}", "size limit"),
    ("{{ '%0100000000d'|format(1) }}", "size limit"),
    ("{{ '{:>100000000}'.format(1) }}", "size limit"),
    ("{{ '{0:>{1}}'.format(1, 100000000) }}", "size limit"),
    ("{{ 2 ** 100000000 }}", "limit of 256"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "size limit"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "size limit"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "limit"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s|replace('x', 'xx') %}"
     "{% endfor %}", "limit"),
])
def test_rendering_is_bounded(source, what):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"tok/tokenizer_config.json: chat template stopped: .*{what}"):
        render(source, limit_s=1.0)
    assert time.perf_counter() - t0 < 5


def test_recursion_is_a_clean_error():
    with pytest.raises(ValueError, match="recursion too deep"):
        render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")


def test_long_real_inputs_fit_the_limit():
    """The size limit grows with the messages: a long conversation renders."""
    t = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}", "t")
    msgs = [{"role": "user", "content": "w" * 3_000_000}, {"role": "assistant", "content": "z" * 10}]
    assert len(t.render(msgs)[0]) == 3_000_010
