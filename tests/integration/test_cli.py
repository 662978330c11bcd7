"""The command line as a user meets it (issue 9, item 18), through the real CLI in
subprocesses: `--help` on every command lists the flags and exits 0 without starting anything;
every start-up failure is one line on stderr naming the file, option or address, with a
non-zero exit and no traceback. Traefik's behaviour is the reference: `traefik --help` lists
its flags, an unknown flag is refused naming it, start-up errors are one log line.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from meshproxy.config.static import flag_reference
from meshproxy.controller.flags import _FIELDS, DESCRIPTIONS
from tests.helpers import free_port


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,  # a command that starts a service instead would hang: fail
        check=False,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshproxy: error: "), lines
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["proxy", "--help"], ["--entryPoints.<name>.address", "--providers.file.filename"]),
        (["proxy", "-h"], ["--metrics.prometheus.buckets", "--configFile"]),
        (["proxy", "--entryPoints.web.address=:1", "--help"], ["--ping.entryPoint"]),
        (["controller", "--help"], ["--acl", "--defaultMode", "--limitHTTPPort", "--manifests"]),
        (["cleanup", "--help"], ["--namespace", "--kubeconfig"]),
        (["check", "--help"], ["--kind"]),
        (["local", "--help"], ["--http-port", "--acl", "--defaultMode", "--apiPort"]),
        (["version", "--help"], ["meshproxy version"]),
        (["--help"], ["proxy", "controller", "cleanup", "check", "local"]),
        ([], ["usage: meshproxy"]),
    ],
)
def test_help_lists_the_flags_and_exits_zero_without_starting_anything(args, expected):
    """`--help` anywhere in the arguments: the flag list on stdout, exit 0, within the timeout
    (before this, `proxy --help` started a proxy on ~60 ports and `controller --help` failed
    with `--help needs a value`)."""
    result = run_cli(*args)
    assert result.returncode == 0, result
    for flag in expected:
        assert flag in result.stdout, flag
    assert result.stderr == ""


def test_proxy_help_lists_every_static_option():
    """Every option of the static configuration (and so every dotted flag) is listed."""
    text = run_cli("proxy", "--help").stdout
    flags = [flag for flag, _ in flag_reference()]
    assert len(flags) > 80
    missing = [flag for flag in flags if flag not in text]
    assert missing == []


def test_controller_help_lists_every_flag_it_accepts():
    """Every flag the controller parses (but the deprecated --smi alias) has a help line."""
    text = run_cli("controller", "--help").stdout
    documented = {flag.lower() for flag in DESCRIPTIONS}
    assert set(_FIELDS) - {"smi"} <= documented
    for flag in DESCRIPTIONS:
        assert f"--{flag} " in text


@pytest.fixture
def busy_port():
    """A loopback port held by a listening socket for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_proxy_start_up_failures_are_one_line_naming_the_culprit(tmp_path, busy_port):
    """The start-up failures a user meets first, each one line that names the file, option or
    address, exit 1 (2 for a usage error), no traceback."""
    dynamic = tmp_path / "dynamic.yaml"
    dynamic.write_text("{}\n")
    missing = tmp_path / "missing.yaml"
    web = f"--entryPoints.web.address=127.0.0.1:{free_port()}"
    provider = f"--providers.file.filename={dynamic}"
    cases = [
        (["--configFile", str(missing)], [str(missing), "No such file"]),
        ([f"--configFile={tmp_path}"], [str(tmp_path), "Is a directory"]),
        (["--configFile"], ["--configFile needs a file name"]),
        ([web, f"--providers.file.filename={missing}"], ["providers.file.filename", str(missing)]),
        ([web, f"--providers.file.filename={tmp_path}"], ["is a directory"]),
        ([web, f"--providers.file.directory={missing}"], ["providers.file.directory"]),
        (
            [f"--entryPoints.web.address=127.0.0.1:{busy_port}", provider],
            ["entrypoint web", f"127.0.0.1:{busy_port}", "Address already in use"],
        ),
        (
            [web, provider, f"--entryPoints.traefik.address=127.0.0.1:{busy_port}", "--ping"],
            ["entrypoint traefik", f"127.0.0.1:{busy_port}", "Address already in use"],
        ),
        (["--entryPoints.web.address=nonsense", provider], ["entryPoints.web.address"]),
        (
            ["--entryPoints.web.address=no-such-host.invalid:1", provider],
            ["entrypoint web", "no-such-host.invalid:1"],
        ),
        (
            [web, provider, "--entryPoints.web.forwardedHeaders.trustedIPs=10.0.0.0/33"],
            ["entryPoints.web.forwardedHeaders.trustedIPs", "10.0.0.0/33"],
        ),
        (["stray"], ["unexpected argument 'stray'"]),
    ]
    for args, needles in cases:
        assert_one_line_failure(run_cli("proxy", *args), *needles)


@pytest.mark.parametrize(
    ("flag", "unknown", "suggestion"),
    [
        ("--entryPoints.web.adress=:80", "entryPoints.web.adress", "entryPoints.web.address"),
        ("--entrypoints.web.forwardedheaders.insecur", "insecur", "forwardedHeaders.insecure"),
        ("--metrics.prometheus.bukets=0.1", "metrics.prometheus.bukets", "buckets"),
        ("--providers.file.filname=x.yaml", "providers.file.filname", "providers.file.filename"),
        ("--log.levle=INFO", "log.levle", "log.level"),
        ("--pingg", "pingg", "ping"),
    ],
)
def test_a_misspelt_proxy_flag_names_the_unknown_key(flag, unknown, suggestion, tmp_path):
    """Traefik refuses a key it does not know (`field not found, node: adress`); we name it
    and the closest known key, instead of failing later on a side effect (the empty address)."""
    result = run_cli("proxy", "--entryPoints.web.address=:1", flag)
    assert_one_line_failure(result, f"{unknown}: unknown option", "did you mean", suggestion)


def test_a_misspelt_key_in_the_static_file_names_it_and_the_file(tmp_path):
    static = tmp_path / "static.yaml"
    static.write_text("entryPoints:\n  web:\n    adress: ':80'\n")
    result = run_cli("proxy", f"--configFile={static}")
    assert_one_line_failure(result, str(static), "entryPoints.web.adress: unknown option")


def test_a_known_traefik_option_we_lack_is_only_a_warning(tmp_path):
    """Traefik options meshproxy does not implement (here the Docker provider) are accepted
    with a warning, so existing Traefik command lines still start (checked with `check`)."""
    static = tmp_path / "static.yaml"
    static.write_text("entryPoints:\n  web:\n    address: ':80'\nproviders:\n  docker: {}\n")
    result = run_cli("check", str(static), "--kind=static")
    assert result.returncode == 0, result
    assert "providers.docker: not implemented by meshproxy" in result.stdout


def test_controller_start_up_failures_are_one_line(tmp_path, busy_port):
    """Missing manifests, an unreadable kubeconfig, a busy API port, unknown or valueless
    flags: one line each, naming the file, flag or address."""
    manifests = tmp_path / "m"
    manifests.mkdir()
    cases = [
        (["--manifests", str(tmp_path / "nope")], ["--manifests", "nope", "not a directory"]),
        (["--kubeconfig", str(tmp_path / "kc")], ["--kubeconfig", "kc", "no such file"]),
        (
            [f"--manifests={manifests}", "--apiHost=127.0.0.1", f"--apiPort={busy_port}"],
            ["API", f"127.0.0.1:{busy_port}", "Address already in use"],
        ),
        (["--bogus"], ["unknown flag --bogus"]),
        (["--apiPort"], ["--apiPort needs a value"]),
        (["--defaultMode=quic"], ["--defaultMode must be http, tcp or udp"]),
        (["--acl=perhaps"], ["--acl expects true or false"]),
    ]
    for args, needles in cases:
        assert_one_line_failure(run_cli("controller", *args), *needles)
    assert_one_line_failure(run_cli("cleanup", "--bogus=1"), "unknown flag --bogus")


def test_check_and_local_and_unknown_commands_fail_in_one_line(tmp_path, busy_port):
    assert_one_line_failure(run_cli("check", str(tmp_path / "x.yaml")), "x.yaml", "No such file")
    assert_one_line_failure(run_cli("check"), "required: file")
    assert_one_line_failure(run_cli("local", "--bogus"), "unknown flag --bogus")
    assert_one_line_failure(
        run_cli("local", f"--manifests={tmp_path / 'nope'}"), "--manifests", "not a directory"
    )
    result = run_cli("local", f"--manifests={tmp_path}", f"--apiPort={busy_port}")
    assert result.returncode == 1
    assert f"meshproxy: error: API: cannot listen on 127.0.0.1:{busy_port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert_one_line_failure(run_cli("frobnicate"), "unknown command 'frobnicate'")


def test_check_still_reports_every_error_of_a_dynamic_file(tmp_path):
    """`check` is the one command whose job is a full report: every error with its path."""
    bad = tmp_path / "dynamic.yaml"
    bad.write_text("http:\n  routers:\n    r: {rule: 'Host(`a`)', service: s, nope: 1}\n")
    result = run_cli("check", str(bad))
    assert result.returncode == 1
    assert "http.routers.r.nope" in result.stdout
