"""Log setup: human text or one JSON object per line, to stderr and optionally a file."""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from vision_server.disk_full import is_disk_full, no_space_reason
from vision_server.settings import SettingsError

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0 (line breaks, ESC), DEL and C1 controls


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda match: ascii(match.group())[1:-1], text)


class TextFormatter(logging.Formatter):
    """One line per record: control characters in the message are escaped.

    Messages carry what clients sent (the request path in the access log, a refused page's
    origin): a path with ``%0A`` in it would otherwise start a forged log line, and an ``ESC``
    sequence would recolour or rewrite the terminal of whoever tails the log. A traceback
    (appended after the message) keeps its lines.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields of a record become keys."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class MalformedRequestFilter(logging.Filter):
    """Log a request aiohttp cannot parse as one INFO line, not an ERROR with a traceback.

    Bytes that are not valid HTTP (a control character in a header, a bad chunk size) are the
    client's mistake and get a 400; a client must not be able to fill the log with tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
            reason = (error.message or type(error).__name__).strip().splitlines()[0]
            record.msg, record.args = "%s: %d %s", (record.getMessage(), error.code, reason)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


class _SaysWhenFull(logging.FileHandler):
    """A log file whose disk fills up: said once on stderr, not with a traceback per line.

    The logging module's answer to a write that fails is a "--- Logging error ---" traceback on
    stderr for every record; a server whose ``--log-file`` disk is full would flood its service
    journal with thousands of them while it goes on serving. Instead one line says what happened
    (the records still go to stderr), and one more when lines reach the file again (what did not
    fit waits in the file's buffer and is written first).
    """

    _full = False
    _refused = False

    def emit(self, record: logging.LogRecord) -> None:
        self._refused = False
        super().emit(record)
        if self._full and not self._refused:
            self._full = False
            sys.stderr.write(f"vision-server: writing the log file {self.baseFilename} again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        failure = sys.exc_info()[1]
        if not isinstance(failure, OSError) or not is_disk_full(failure):
            super().handleError(record)
            return
        self._refused = True
        if not self._full:
            self._full = True
            sys.stderr.write(
                f"vision-server: cannot write the log file {self.baseFilename}: {no_space_reason(failure)}; "
                "log lines go to stderr alone until there is room again\n"
            )


class _WatchedLogFile(_SaysWhenFull, logging.handlers.WatchedFileHandler):
    pass


def file_handler(path: Path) -> logging.Handler:
    """On POSIX reopen the file when logrotate moves it away; Windows cannot rename an open file.

    ``backslashreplace``: a line may quote what a client sent, and bytes that are not UTF-8 in a
    header reach Python as lone surrogates (``\\udcff``), which strict UTF-8 cannot write. The
    whole line was then lost from the file (a client could keep its refused requests out of the
    log) and a traceback went to stderr; now the odd bytes are written as escapes, as on stderr."""
    if sys.platform == "win32":
        return _SaysWhenFull(path, encoding="utf-8", errors="backslashreplace")
    return _WatchedLogFile(path, encoding="utf-8", errors="backslashreplace")


def configure_logging(level: str = "info", fmt: str = "text", file: Path | None = None) -> None:
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(file_handler(file))
        except OSError as exc:  # a directory, a read-only place (systemd's ProtectSystem=strict)
            raise SettingsError(
                f"log_file {file}: cannot write there ({exc.strerror or exc})", setting="log_file"
            ) from None
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(existing, MalformedRequestFilter) for existing in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
