"""Property tests of the dynamic configuration decoder (meshproxy.config.dynamic): arbitrary
bytes and arbitrary values at any place of a configuration decode or raise ConfigDecodeError
with located errors; YAML alias bombs and deep nesting are refused quickly; key case does not
matter (Traefik's paerser matches keys case-insensitively, reference §1.0)."""

from __future__ import annotations

import json
import time

import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshproxy.config.decode import MAX_DEPTH, ConfigDecodeError, to_builtins
from meshproxy.config.dynamic import DynamicConfig, decode_dynamic, decode_dynamic_obj
from tests.helpers import FIXTURES


def decodes_or_reports(payload: bytes | str | object) -> DynamicConfig | None:
    """Decode; a ConfigDecodeError must carry at least one error, each a path and a message."""
    try:
        if isinstance(payload, (bytes, str)):
            return decode_dynamic(payload)
        return decode_dynamic_obj(payload)
    except ConfigDecodeError as exc:
        assert exc.errors
        for error in exc.errors:
            assert isinstance(error.path, str) and error.message
        return None


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_decode_or_raise_config_decode_error(data):
    """Any byte string (invalid UTF-8, NULs, half a YAML document) is a configuration or a
    ConfigDecodeError."""
    decodes_or_reports(data)


YAML_TOKENS = [
    "http:", "tcp:", "udp:", "tls:", "routers:", "services:", "middlewares:", "r:", "s:",
    "rule:", "service:", "priority:", "loadBalancer:", "servers:", "- url:", "weight:",
    "entryPoints:", "retry:", "attempts:", "interval:", "&a", "*a", "!!binary", "!!python/none",
    "{", "}", "[", "]", ",", ":", "-", "?", "|", ">", "'", '"', "#", "\n", "  ", "\t", "1",
    "-1", "1.5", "1e400", "9" * 5000, "null", "~", "true", "yes", "2001-12-14", "0x1F", ".inf",
    "Host(`a`)", "10s", "\u00e9", "\x00",
]  # fmt: skip


@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=60).map(" ".join))
def test_yaml_shaped_text_decodes_or_raises_config_decode_error(text):
    """Text made of YAML and Traefik configuration pieces (anchors, tags, huge numbers,
    timestamps) is a configuration or a ConfigDecodeError."""
    decodes_or_reports(text)


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True),
        st.text(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=20,
)
KEYS = [
    "rule", "service", "priority", "entryPoints", "middlewares", "tls", "ruleSyntax",
    "loadBalancer", "servers", "url", "weight", "healthCheck", "interval", "sticky", "cookie",
    "weighted", "services", "mirroring", "failover", "retry", "attempts", "initialInterval",
    "circuitBreaker", "expression", "rateLimit", "average", "burst", "period", "headers",
    "customRequestHeaders", "stripPrefix", "prefixes", "address", "sourceRange", "ipAllowList",
]  # fmt: skip
SKELETONS = [
    lambda v: {"http": {"routers": {"r": v}}},
    lambda v: {"http": {"routers": {"r": {"rule": "Path(`/`)", "service": "s", "tls": v}}}},
    lambda v: {"http": {"services": {"s": v}}},
    lambda v: {"http": {"services": {"s": {"loadBalancer": v}}}},
    lambda v: {"http": {"services": {"s": {"loadBalancer": {"servers": [v]}}}}},
    lambda v: {"http": {"middlewares": {"m": v}}},
    lambda v: {"http": {"middlewares": {"m": {"retry": v}}}},
    lambda v: {"http": {"middlewares": {"m": {"circuitBreaker": v}}}},
    lambda v: {"http": {"middlewares": {"m": {"headers": v}}}},
    lambda v: {"http": {"serversTransports": {"t": v}}},
    lambda v: {"tcp": {"routers": {"r": v}}},
    lambda v: {"tcp": {"services": {"s": v}}},
    lambda v: {"udp": {"services": {"s": v}}},
    lambda v: {"tls": v},
    lambda v: {"http": v},
    lambda v: v,
]
structured = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5),
)


@given(st.sampled_from(SKELETONS), structured, st.sampled_from(["object", "json", "yaml"]))
# found by the soak: JSON writes U+10000 as the escapes \ud800\udc00, which PyYAML reads as
# two lone surrogates that msgspec could not encode (a UnicodeEncodeError escaped)
@example(SKELETONS[0], "\U00010000", "json")
@example(SKELETONS[2], {"\udc80": 1}, "object")
def test_arbitrary_values_anywhere_decode_or_raise_located_errors(skeleton, value, form):
    """Any value (wrong types, unknown keys, nulls, NaN, huge integers) at any place of a
    configuration, given as data, JSON or YAML, is a configuration or a ConfigDecodeError
    whose every error names a path."""
    payload = skeleton(value)
    if form == "json":
        decodes_or_reports(json.dumps(payload))
    elif form == "yaml":
        decodes_or_reports(yaml.safe_dump(payload))
    else:
        decodes_or_reports(payload)


@given(st.integers(2, 12), st.integers(2, 12))
def test_alias_bombs_are_refused_quickly(width, levels):
    """ "Billion laughs": each anchor refers `width` times to the previous one, `levels` deep.
    Documents that expand beyond the decoder's bound are refused with a ConfigDecodeError
    (measured without expanding them); smaller ones decode. Never a hang or a RecursionError."""
    lines = ["a0: &a0 [x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(
        f"http: {{routers: {{r: {{rule: Path(`/`), service: s, tls: {{x: *a{levels - 1}}}}}}}}}"
    )
    started = time.perf_counter()
    decodes_or_reports("\n".join(lines))
    assert time.perf_counter() - started < 2.0


@settings(max_examples=max(10, settings().max_examples // 4))
@given(st.integers(1, 3 * MAX_DEPTH), st.sampled_from(["[", "{a: "]))
def test_deep_nesting_is_refused_not_a_recursion_error(depth, opener):
    """Nesting beyond MAX_DEPTH is a ConfigDecodeError (PyYAML and the decoder recurse)."""
    closer = "]" if opener == "[" else "}"
    decodes_or_reports("http: " + opener * depth + closer * depth)


def _fixture_payloads() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*-config.json"))]


def _recase(value, choices):
    """`value` with every struct key re-cased by the next choice (names of routers, services
    and middlewares are map keys and keep their case)."""
    if isinstance(value, list):
        return [_recase(v, choices) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        kind = next(choices)
        new_key = {0: key, 1: key.lower(), 2: key.upper()}[kind]
        out[new_key] = _recase_names(item, choices) if key in NAMED else _recase(item, choices)
    return out


NAMED = {"routers", "services", "middlewares", "serversTransports"}


def _recase_names(value, choices):
    if not isinstance(value, dict):
        return value
    return {name: _recase(item, choices) for name, item in value.items()}


@given(st.sampled_from(range(3)), st.randoms(use_true_random=False))
def test_key_case_does_not_change_the_decoded_configuration(index, rnd):
    """Traefik matches configuration keys case-insensitively (`loadBalancer`, `loadbalancer`,
    `LOADBALANCER`): a Traefik Mesh fixture with its keys re-cased decodes to the same
    configuration as the original."""
    fixtures = _fixture_payloads()
    original = fixtures[index % len(fixtures)]
    recased = _recase(original, iter(lambda: rnd.randint(0, 2), None))
    assert to_builtins(decode_dynamic_obj(recased)) == to_builtins(decode_dynamic_obj(original))
