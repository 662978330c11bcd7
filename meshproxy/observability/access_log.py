"""Access logs in Traefik's formats, plus meshproxy's "why" code.

Traefik's access log (doc: https://doc.traefik.io/traefik/observability/access-logs/) has three
formats with the same field names: `common` (Traefik's CLF line, ending with the request count,
router name, service URL and duration), `genericCLF` (the plain Combined Log Format part of it)
and `json` (every field, keys sorted as Go's encoder writes a map). Options read from the static
`accessLog` section: `filePath` (default standard output), `format`, `bufferingSize`,
`filters.statusCodes` / `.retryAttempts` / `.minDuration` (a line is kept when any filter that is
set keeps it; none set keeps all), `fields.defaultMode` / `fields.names.X` (keep | drop) and
`fields.headers.defaultMode` / `.names.X` (keep | drop | redact; headers are dropped unless
asked for, as in Traefik). Header fields are `request_<Name>` and `downstream_<Name>` with Go's
canonical names (`X-Real-Ip`).

meshproxy adds `meshproxy_why` (JSON) or a trailing ` why=<code>` (CLF formats, only on lines
that have one, so a successful line is byte for byte Traefik's): why the proxy itself failed or
refused the exchange, one of `WHY_CODES` (set on `Exchange.why` where the failure is decided:
runtime/dispatch.py and the refusing middlewares).

Cost: `record` is the only thing on the request path: one tuple appended to a list, and one
`call_soon` per loop iteration that had requests. Filtering and formatting happen in that
callback, after the requests of the iteration were served; the bytes go to a writer thread
through a queue, so a slow disk never blocks the event loop. When the access log is disabled,
no `AccessLog` exists and dispatch does not call anything.

Bad input: a file that cannot be opened or written (permission denied, disk full: ENOSPC,
/dev/full) loses those lines, never the traffic. Each lost line bumps
`RequestMetrics.access_log_errors` (`meshproxy_accesslog_write_errors_total`) and one error is
logged per minute at most, with the count lost since the previous one. Opening is retried on
the next batch, so a fixed permission or freed disk resumes logging. When more than
`bufferingSize` lines (default 10,000) wait to be written, new ones are dropped and counted the
same way, so memory stays bounded whatever the disk does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshproxy.http.fields import field_list

if TYPE_CHECKING:
    from meshproxy.config.static import AccessLog as AccessLogConfig
    from meshproxy.http.exchange import Exchange

log = logging.getLogger("meshproxy.accesslog")

WHY_CODES = (
    "no_route",  # no router matched (404)
    "no_healthy_server",  # the service has no server up (503)
    "upstream_connect_failure",  # the server could not be reached (502, or 504 on dial timeout)
    "upstream_reset",  # the server broke off the exchange after the request went out (502)
    "timeout",  # no response in time (504)
    "rate_limited",  # rateLimit or inFlightReq refused it (429)
    "breaker_open",  # the circuit breaker answered (503 or its configured code)
    "denied",  # ipAllowList refused the source (403)
    "client_gone",  # the client left before the answer (499)
    "internal_error",  # a bug in the proxy (500)
)

FORMATS = ("common", "genericCLF", "json")
ERROR_LOG_INTERVAL = 60.0  # seconds between two "cannot write the access log" errors
DEFAULT_BUFFER_LINES = 10_000
REDACTED = "REDACTED"

# Traefik's "local" fields (StartLocal, time) use the process's time zone.
_CANONICAL: dict[bytes, str] = {}


def canonical_header(name: bytes | str) -> str:
    """Go's textproto.CanonicalMIMEHeaderKey: `x-real-ip` -> `X-Real-Ip`."""
    if isinstance(name, bytes):
        cached = _CANONICAL.get(name)
        if cached is not None:
            return cached
        text = name.decode("latin-1")
    else:
        text = name
    out = "-".join(part[:1].upper() + part[1:].lower() for part in text.split("-"))
    if isinstance(name, bytes) and len(_CANONICAL) < 4096:
        _CANONICAL[name] = out
    return out


def parse_status_ranges(values: list[str]) -> list[tuple[int, int]]:
    """`["200", "300-302"]` -> [(200, 200), (300, 302)]; ValueError naming a bad entry."""
    ranges = []
    for value in values:
        low, sep, high = value.strip().partition("-")
        try:
            first = int(low)
            last = int(high) if sep else first
        except ValueError:
            message = f"accessLog.filters.statusCodes: {value!r} is not a code or range"
            raise ValueError(message) from None
        if not 100 <= first <= last <= 999:
            raise ValueError(f"accessLog.filters.statusCodes: {value!r} is not a valid range")
        ranges.append((first, last))
    return ranges


def _mode(value: str | None, default: str, allowed: tuple[str, ...], where: str) -> str:
    mode = (value or default).lower()
    if mode not in allowed:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
    return mode


class AccessLogSettings:
    """The static `accessLog` section, checked (ValueError naming the option if invalid)."""

    def __init__(self, config: AccessLogConfig) -> None:
        self.file_path = config.file_path or ""
        fmt = config.format or "common"
        if fmt not in FORMATS:
            raise ValueError(f"accessLog.format: {fmt!r} is not one of {', '.join(FORMATS)}")
        self.format = fmt
        size = config.buffering_size or 0
        if size < 0:
            raise ValueError("accessLog.bufferingSize: must not be negative")
        self.buffer_lines = size or DEFAULT_BUFFER_LINES
        filters = config.filters
        self.status_ranges = parse_status_ranges(filters.status_codes or []) if filters else []
        self.retry_filter = bool(filters and filters.retry_attempts)
        self.min_duration = float(filters.min_duration or 0) if filters else 0.0
        self.filtered = bool(self.status_ranges or self.retry_filter or self.min_duration > 0)
        fields = config.fields
        self.field_default = _mode(
            fields.default_mode if fields else None,
            "keep",
            ("keep", "drop"),
            "accessLog.fields.defaultMode",
        )
        self.field_modes = {
            name: _mode(mode, "keep", ("keep", "drop"), f"accessLog.fields.names.{name}")
            for name, mode in ((fields.names or {}) if fields else {}).items()
        }
        headers = fields.headers if fields else None
        self.header_default = _mode(
            headers.default_mode if headers else None,
            "drop",
            ("keep", "drop", "redact"),
            "accessLog.fields.headers.defaultMode",
        )
        self.header_modes = {
            canonical_header(name): _mode(
                mode, "drop", ("keep", "drop", "redact"), f"accessLog.fields.headers.names.{name}"
            )
            for name, mode in ((headers.names or {}) if headers else {}).items()
        }
        self.any_headers = self.header_default != "drop" or any(
            m != "drop" for m in self.header_modes.values()
        )

    def keep(self, status: int, retries: int, seconds: float) -> bool:
        """Traefik's keepAccessLog: no filter set keeps everything, else any filter may."""
        if not self.filtered:
            return True
        for low, high in self.status_ranges:
            if low <= status <= high:
                return True
        if self.retry_filter and retries > 0:
            return True
        return self.min_duration > 0 and seconds > self.min_duration


_SECONDS: dict[tuple[int, bool], tuple[str, str, str]] = {}


def _second(second: int, local: bool) -> tuple[str, str, str]:
    """(RFC 3339 date-time without fraction, zone suffix, CLF time) of one whole second,
    cached: strftime per line would cost more than the rest of the formatting."""
    key = (second, local)
    hit = _SECONDS.get(key)
    if hit is not None:
        return hit
    parts = time.localtime(second) if local else time.gmtime(second)
    offset = parts.tm_gmtoff if local else 0
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    suffix = "Z" if offset == 0 else f"{sign}{hours:02d}:{minutes:02d}"
    clf = time.strftime("%d/%b/%Y:%H:%M:%S ", parts) + f"{sign}{hours:02d}{minutes:02d}"
    if len(_SECONDS) > 256:
        _SECONDS.clear()
    hit = _SECONDS[key] = (time.strftime("%Y-%m-%dT%H:%M:%S", parts), suffix, clf)
    return hit


def _rfc3339(stamp: float, local: bool, nanos: bool) -> str:
    """Go's time.RFC3339Nano (trailing zeros of the fraction trimmed) or RFC3339."""
    second = int(stamp)
    text, suffix, _ = _second(second, local)
    if nanos:
        fraction = f"{int((stamp - second) * 1e6):06d}".rstrip("0")
        if fraction:
            text += "." + fraction
    return text + suffix


def _clf_time(stamp: float) -> str:
    return _second(int(stamp), True)[2]


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class _Writer:
    """A thread that writes byte blobs to the log file (or standard output), so file I/O
    never runs on the event loop. Reports failures through `on_error(lines_lost, reason)`."""

    def __init__(self, path: str, on_error: Callable[[int, str], None]) -> None:
        self.path = path
        self.on_error = on_error
        self.queue: queue.SimpleQueue[tuple[bytes, int] | None] = queue.SimpleQueue()
        self.waiting_lines = 0  # handed over, not yet written (read by the loop thread)
        self.lock = threading.Lock()
        self.fd = -1
        self.thread = threading.Thread(target=self._run, name="meshproxy-accesslog", daemon=True)
        self.thread.start()

    def put(self, blob: bytes, lines: int) -> None:
        with self.lock:
            self.waiting_lines += lines
        self.queue.put((blob, lines))

    def _open(self) -> int:
        if not self.path:
            return 1
        if self.fd < 0:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self.fd

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                break
            blob, lines = item
            try:
                fd = self._open()
                view = memoryview(blob)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            except OSError as exc:
                self.on_error(lines, exc.strerror or str(exc))
            finally:
                with self.lock:
                    self.waiting_lines -= lines
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


class AccessLog:
    """One process's access log: `record` on the request path, everything else later."""

    def __init__(self, settings: AccessLogSettings, metrics: Any = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pending: list[tuple[Exchange, int, float, float]] = []
        self.start = 0.0  # start time of the line being formatted (the CLF formats' time)
        self.scheduled = False
        self.request_count = 0
        self.lost = 0  # lines lost (write errors, full buffer), for the error log
        self.lost_total = 0
        self.last_error_log = float("-inf")
        self.error_lock = threading.Lock()
        self.writer = _Writer(settings.file_path, self._write_failed)
        fmt = settings.format
        self.format_line: Callable[[dict[str, Any], str, float], str] = (
            _json_line if fmt == "json" else _clf_line if fmt == "common" else _generic_clf_line
        )

    # -- hot path -------------------------------------------------------------------------

    def record(self, ex: Exchange, status: int, seconds: float) -> None:
        """Queue one finished exchange (`status` as answered, `seconds` it took)."""
        self.pending.append((ex, status, seconds, time.time()))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    # -- off the hot path ---------------------------------------------------------------

    def flush(self) -> None:
        """Filter and format what was recorded, and hand it to the writer thread."""
        self.scheduled = False
        pending, self.pending = self.pending, []
        settings = self.settings
        lines = []
        for ex, status, seconds, now in pending:
            self.request_count += 1  # Traefik counts every request, logged or filtered out
            if not settings.keep(status, ex.retries, seconds):
                continue
            try:
                data = self.fields(ex, status, seconds, now)
                lines.append(self.format_line(data, ex.why, now - seconds))
            except Exception:  # a line we cannot format must not cost the others
                log.exception("cannot format an access log line")
        if not lines:
            return
        room = settings.buffer_lines - self.writer.waiting_lines
        if room < len(lines):
            self._lost(len(lines) - max(room, 0), "more than bufferingSize lines wait")
            lines = lines[: max(room, 0)]
            if not lines:
                return
        self.writer.put("".join(lines).encode("utf-8", "replace"), len(lines))

    def fields(self, ex: Exchange, status: int, seconds: float, now: float) -> dict[str, Any]:
        """Traefik's access log fields of one exchange, with the field and header modes
        applied (as Traefik applies them before any format)."""
        request = ex.request
        start = now - seconds
        nanos = int(seconds * 1e9)
        port = request.port
        data: dict[str, Any] = {
            "ClientAddr": _host_port(request.client_ip, request.client_port),
            "ClientHost": request.client_ip,
            "ClientPort": str(request.client_port),
            "ClientUsername": "-",
            "DownstreamContentSize": ex.response_bytes,
            "DownstreamStatus": status,
            "Duration": nanos,
            "RequestAddr": request.host_header.decode("latin-1"),
            "RequestContentSize": request.content_length or 0,
            "RequestCount": self.request_count,
            "RequestHost": request.host,
            "RequestMethod": request.method,
            "RequestPath": ex.request_target.decode("latin-1"),
            "RequestPort": port or "-",
            "RequestProtocol": "HTTP/2.0"
            if request.http_version.startswith("2")
            else f"HTTP/{request.http_version}",
            "RequestScheme": request.scheme,
            "RetryAttempts": ex.retries,
            "StartLocal": _rfc3339(start, True, True),
            "StartUTC": _rfc3339(start, False, True),
            "entryPointName": ex.entrypoint.partition("#")[0],
            "level": "info",
            "msg": "",
            "time": _rfc3339(now, True, False),
        }
        # What the origin (a server) answered: a local answer (404, 429, 403...) has none.
        if ex.server_url or (ex.service and ex.why not in ("", "client_gone")):
            data["OriginStatus"] = status
            data["OriginContentSize"] = ex.response_bytes
            data["OriginDuration"] = nanos  # not split from the proxy's own time (yet)
            data["Overhead"] = 0
        else:
            data["OriginStatus"] = 0
            data["OriginContentSize"] = 0
            data["OriginDuration"] = 0
            data["Overhead"] = nanos
        if ex.router:
            data["RouterName"] = ex.router
        if ex.service:
            data["ServiceName"] = ex.service
        if ex.server_url:
            data["ServiceURL"] = ex.server_url
            data["ServiceAddr"] = ex.server_url.partition("://")[2].partition("/")[0]
        if ex.why:
            data["meshproxy_why"] = ex.why
        settings = self.settings
        if settings.field_modes or settings.field_default == "drop":
            for name in list(data):
                if settings.field_modes.get(name, settings.field_default) == "drop":
                    del data[name]
        if settings.any_headers:
            self._headers(data, "request_", request.headers)
            if ex.response_headers is not None:
                self._headers(data, "downstream_", field_list(ex.response_headers))
        return data

    def _headers(self, data: dict[str, Any], prefix: str, headers: Any) -> None:
        settings = self.settings
        for raw_name, raw_value in headers:
            name = canonical_header(raw_name)
            mode = settings.header_modes.get(name, settings.header_default)
            if mode == "drop":
                continue
            key = prefix + name
            value = REDACTED if mode == "redact" else raw_value.decode("latin-1")
            previous = data.get(key)
            # Go logs the first value of a repeated field (Header.Get)
            if previous is None:
                data[key] = value

    def _lost(self, lines: int, reason: str) -> None:
        with self.error_lock:
            self.lost += lines
            self.lost_total += lines
            if self.metrics is not None:
                self.metrics.access_log_errors += lines
            now = time.monotonic()
            if now - self.last_error_log < ERROR_LOG_INTERVAL:
                return
            self.last_error_log = now
            lost, self.lost = self.lost, 0
        log.error(
            "cannot write the access log %s: %s (%d line(s) lost since the last report; "
            "traffic goes on; next report in %.0f s at the earliest)",
            self.settings.file_path or "<stdout>",
            reason,
            lost,
            ERROR_LOG_INTERVAL,
        )

    def _write_failed(self, lines: int, reason: str) -> None:
        self._lost(lines, reason)

    def close(self, timeout: float = 5.0) -> None:
        """Write out what is queued, then stop the writer thread."""
        self.flush()
        self.writer.close(timeout)


def _quoted(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    return f'"{value}"' if value not in (None, "") else '"-"'


def _plain(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    return "-" if value is None or value == "" else str(value)


def _clf_start(data: dict[str, Any], start: float) -> str:
    stamp = _clf_time(start) if "StartLocal" in data else "-"
    return (
        f"{_plain(data, 'ClientHost')} - {_plain(data, 'ClientUsername')} [{stamp}] "
        f'"{_plain(data, "RequestMethod")} {_plain(data, "RequestPath")} '
        f'{_plain(data, "RequestProtocol")}" {_plain(data, "DownstreamStatus")} '
        f"{_plain(data, 'DownstreamContentSize')} {_quoted(data, 'request_Referer')} "
        f"{_quoted(data, 'request_User-Agent')}"
    )


def _why_suffix(why: str) -> str:
    return f" why={why}\n" if why else "\n"


def _clf_line(data: dict[str, Any], why: str, start: float) -> str:
    """Traefik's `common` line: CLF, then request count, router, service URL, duration."""
    millis = int(data.get("Duration", 0)) // 1_000_000
    return (
        f"{_clf_start(data, start)} {_plain(data, 'RequestCount')} {_quoted(data, 'RouterName')} "
        f"{_quoted(data, 'ServiceURL')} {millis}ms{_why_suffix(why)}"
    )


def _generic_clf_line(data: dict[str, Any], why: str, start: float) -> str:
    """Traefik's `genericCLF`: the Combined Log Format part only."""
    return _clf_start(data, start) + _why_suffix(why)


def _json_line(data: dict[str, Any], why: str, start: float) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def build_access_log(config: AccessLogConfig | None, metrics: Any) -> AccessLog | None:
    """The process's access log from the static `accessLog` section (None: disabled).
    Raises ValueError naming an invalid option."""
    if config is None:
        return None
    return AccessLog(AccessLogSettings(config), metrics)
