"""The file provider against half-written files (issue 9, item 7), through a real proxy process.

Rule (meshproxy/providers/file.py): a change is taken only when the file is whole and stable
(same stat and content hash on two polls, consistent read); an empty, whitespace-only or
comment-only file is not a configuration (an empty one is `{}`); a prefix that does not parse
is rejected with the file's path and the last good configuration keeps serving; a configuration
that removes every router is applied with a warning. Traefik's own contract for the file
provider is the same last-good-wins one (a file that fails to parse is logged and ignored).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ProxyProcess, lb, request, router, wait_for


def config(url: str, *hosts: str) -> dict[str, Any]:
    return {
        "http": {
            "routers": {h.split(".")[0]: router(f"Host(`{h}`)", "s") for h in hosts},
            "services": {"s": lb(url)},
        }
    }


def as_yaml(url: str, *hosts: str) -> str:
    """Block YAML with double-quoted rules: a cut inside a rule is not valid YAML."""
    lines = ["# written by the test, in place", "http:", "  routers:"]
    for host in hosts:
        lines += [
            f"    {host.split('.')[0]}:",
            f'      rule: "Host(`{host}`)"',
            "      service: s",
            "      entryPoints: [web]",
        ]
    lines += [
        "  services:",
        "    s:",
        "      loadBalancer:",
        f'        servers: [{{url: "{url}"}}]',
    ]
    return "\n".join(lines) + "\n"


def last_error(proxy: ProxyProcess) -> str:
    return proxy.rawdata()["meshproxy"]["lastConfigError"] or ""


def refusals(proxy: ProxyProcess) -> int:
    """How many times the proxy has refused a file so far (each refusal is logged)."""
    log = proxy.log_path.read_text()
    return log.count("not a configuration (write {}") + log.count("rejected, keeping the last")


class Load:
    """Requests to `a.test` in a loop (bounded: 5,000 requests or 60 s), recording statuses."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: Counter[int] = Counter()
        self.done = asyncio.Event()

    async def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.done.is_set() and sum(self.statuses.values()) < 5000:
            if time.monotonic() > deadline:
                break
            self.statuses[(await request(self.port, host="a.test")).status] += 1
            await asyncio.sleep(0.005)


def holds(proxy: ProxyProcess) -> int:
    """How many times the proxy has seen a new state of the file and not applied it: refused
    (empty, does not parse) or waiting for its writer to close it (inotify)."""
    return refusals(proxy) + proxy.log_path.read_text().count("is being written")


def slow_rewrite_cases(url: str) -> dict[str, tuple[str, int, str]]:
    """id -> (new text, cut point, the error the proxy reports for the prefix when it only
    has the stat debounce)."""
    yaml_text = as_yaml(url, "a.test", "extra.test")
    json_text = json.dumps(config(url, "a.test", "extra.test"), indent=1)
    return {
        "yaml-cut-in-a-rule": (yaml_text, yaml_text.index("extra.te") + 5, "invalid YAML"),
        "json-cut-in-half": (json_text, len(json_text) // 2, "invalid YAML/JSON"),
        "yaml-cut-after-the-comment": (yaml_text, yaml_text.index("\n") + 1, "empty"),
        # a valid, smaller document: router `a` without its service (404 if applied);
        # only the writer watch can tell it is not finished
        "yaml-cut-at-a-line-boundary": (yaml_text, yaml_text.index("  services:"), ""),
    }


SLOW_CASES = [
    ("inotify", "yaml-cut-in-a-rule"),
    ("inotify", "json-cut-in-half"),
    ("inotify", "yaml-cut-after-the-comment"),
    ("inotify", "yaml-cut-at-a-line-boundary"),
    ("poll", "yaml-cut-in-a-rule"),
    ("poll", "json-cut-in-half"),
    ("poll", "yaml-cut-after-the-comment"),
]


@pytest.mark.parametrize(("watch", "case"), SLOW_CASES, ids=[f"{w}-{c}" for w, c in SLOW_CASES])
async def test_a_slow_in_place_rewrite_never_serves_a_partial_config(
    watch, case, backends, proxy_factory, monkeypatch
):
    """Rewrite the file in place, slowly: truncate (empty), wait until the proxy has seen it
    and held, write a prefix, wait until it has seen that and held, write the rest, close.
    No request to the existing route gets anything but 200, and the finished file is applied.
    `poll` forces the stat debounce alone (no inotify): there the refusals name the file."""
    if watch == "poll":
        monkeypatch.setenv("MESHPROXY_FILE_WATCH", "poll")
    backend = await backends()
    proxy = await proxy_factory(config(backend.url, "a.test"))
    text, cut, prefix_error = slow_rewrite_cases(backend.url)[case]
    generation = proxy.generation()
    load = Load(proxy.port)
    task = asyncio.create_task(load.run())
    try:
        await wait_for(lambda: load.statuses[200] >= 5, 10, "load running")
        held = holds(proxy)
        with open(proxy.config_file, "w") as f:
            f.flush()  # truncated: the file is empty now
            await wait_for(lambda: holds(proxy) > held, 10, "the empty file held")
            held = holds(proxy)
            f.write(text[:cut])
            f.flush()
            await wait_for(lambda: holds(proxy) > held, 10, "the prefix held")
            if watch == "poll":
                assert prefix_error in last_error(proxy)
                assert str(proxy.config_file) in last_error(proxy)
            assert proxy.generation() == generation  # nothing was applied meanwhile
            served_before_rest = load.statuses[200]
            await wait_for(lambda: load.statuses[200] > served_before_rest + 5, 10, "load")
            f.write(text[cut:])
        await wait_for(lambda: proxy.generation() == generation + 1, 10, "the whole file applied")
        assert (await request(proxy.port, host="extra.test")).status == 200
    finally:
        load.done.set()
        await task
    assert set(load.statuses) == {200}, (case, load.statuses)
    log = proxy.log_path.read_text()
    if watch == "inotify":
        assert "is being written (open for writing); waiting until it is closed" in log
    else:
        assert "is being written" not in log


@pytest.mark.parametrize("case", ["yaml-cut-in-a-rule", "json-cut-in-half"])
async def test_a_truncated_file_is_rejected_with_its_path(case, backends, proxy_factory):
    """A writer that stopped halfway and closed the file (crashed, disk full): the prefix does
    not parse, it is rejected with the file's path and the parse error, the last good
    configuration keeps serving."""
    backend = await backends()
    proxy = await proxy_factory(config(backend.url, "a.test"))
    text, cut, _ = slow_rewrite_cases(backend.url)[case]
    generation = proxy.generation()
    Path(proxy.config_file).write_text(text[:cut])
    await wait_for(lambda: "invalid YAML/JSON" in last_error(proxy), 10, "prefix rejected")
    assert str(proxy.config_file) in last_error(proxy)
    assert proxy.generation() == generation
    assert (await request(proxy.port, host="a.test")).status == 200
    assert f"configuration from file {proxy.config_file} rejected" in proxy.log_path.read_text()


@pytest.mark.parametrize(
    "content",
    ["", "\n  \n\t\n", "# nothing yet\n", "---\n"],
    ids=["empty", "blank", "comment", "doc"],
)
async def test_an_empty_file_keeps_the_last_good_config(content, backends, proxy_factory):
    """An empty (or whitespace-, comment-only) file is not a configuration: it is refused,
    the routes keep serving, and the refusal is visible in /api/rawdata and the log."""
    backend = await backends()
    proxy = await proxy_factory(config(backend.url, "a.test"))
    generation = proxy.generation()
    Path(proxy.config_file).write_text(content)
    await wait_for(lambda: "empty" in last_error(proxy), 10, "the empty file refused")
    assert proxy.generation() == generation
    assert (await request(proxy.port, host="a.test")).status == 200
    # and the next real configuration is applied as usual
    proxy.write(config(backend.url, "a.test", "b.test"))
    await wait_for(lambda: proxy.generation() == generation + 1, 10, "next config")
    assert (await request(proxy.port, host="b.test")).status == 200
    assert last_error(proxy) == ""


async def test_an_explicit_empty_config_applies_with_a_warning(backends, proxy_factory):
    """`{}` is an intentionally empty configuration: applied (404 for every request), and
    since it removes every router, a warning says so."""
    backend = await backends()
    proxy = await proxy_factory(config(backend.url, "a.test", "b.test"))
    generation = proxy.generation()
    Path(proxy.config_file).write_text("{}\n")
    await wait_for(lambda: proxy.generation() == generation + 1, 10, "{} applied")
    assert (await request(proxy.port, host="a.test")).status == 404
    log = proxy.log_path.read_text()
    assert "the new configuration has no router: every one of the 2 routers was removed" in log


async def test_a_deleted_file_keeps_the_last_good_config_until_it_returns(backends, proxy_factory):
    """A missing file is an unreadable configuration, logged once; the routes keep serving;
    the file written again is applied."""
    backend = await backends()
    proxy = await proxy_factory(config(backend.url, "a.test"))
    generation = proxy.generation()
    Path(proxy.config_file).unlink()
    await wait_for(lambda: "No such file" in last_error(proxy), 10, "missing file reported")
    await asyncio.sleep(0)  # the proxy keeps polling; the route keeps serving
    assert (await request(proxy.port, host="a.test")).status == 200
    proxy.write(config(backend.url, "a.test", "b.test"))
    await wait_for(lambda: proxy.generation() == generation + 1, 10, "file back")
    assert (await request(proxy.port, host="b.test")).status == 200
    assert proxy.log_path.read_text().count("cannot read") == 1


async def test_directory_mode_refuses_an_empty_file_and_names_a_broken_one(backends, tmp_path):
    """`providers.file.directory`: one file of the directory empty, or cut, is refused with
    that file's name; the merged last good configuration keeps serving."""
    backend = await backends()
    directory = tmp_path / "dynamic"
    directory.mkdir()
    (directory / "routers.yaml").write_text(
        "http:\n  routers:\n    a: {rule: 'Host(`a.test`)', service: s, entryPoints: [web]}\n"
    )
    (directory / "services.json").write_text(
        json.dumps({"http": {"services": {"s": lb(backend.url)}}})
    )
    proxy = ProxyProcess(
        tmp_path, extra_flags=[f"--providers.file.directory={directory}"], provider="directory"
    )
    try:
        await proxy.start()
        generation = proxy.generation()
        (directory / "services.json").write_text("")
        await wait_for(lambda: "services.json: empty" in last_error(proxy), 10, "empty refused")
        assert (await request(proxy.port, host="a.test")).status == 200
        (directory / "services.json").write_text('{"http": {"services": {"s": ')
        await wait_for(lambda: "services.json: $: invalid" in last_error(proxy), 10, "cut named")
        assert (await request(proxy.port, host="a.test")).status == 200
        assert proxy.generation() == generation
    finally:
        proxy.stop()
