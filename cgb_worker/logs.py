"""Logging: loguru everywhere, arq's stdlib loggers routed into it, phone numbers masked in every line.

* Every record passes :func:`mask_text`, which hides any run of eight or more digits (a phone number in
  any spelling, ``+972 50-000-0001`` included), keeping the country code and the last two digits.
* arq logs each job's arguments when it starts; those hold the phone, the text and names, so the argument
  list is dropped from that line (the job id stays). Its per-job INFO lines are shown only at DEBUG: the
  job event line we write says the same.
* ``diagnose`` (loguru's variable values in tracebacks) is off unless ``LOG_DIAGNOSE=true`` in development:
  values in frames can be tokens or phones.
* ``LOG_JSON=true`` writes one JSON object per line for log pipelines, from the first line: arq's loggers get a
  filter that hands every record to loguru and stops it there. Filters sit on the loggers themselves, which
  the ``logging.config.dictConfig`` that ``arq``'s command runs after importing the settings leaves alone,
  so the plain-text handler it adds never sees a record.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from loguru import logger

from .errors import CGBWorkerError
from .phones import mask_phone

_PHONEISH = re.compile(r"(?<![\w+])\+?\d[\d \-().]{6,}\d(?!\w)")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_ARQ_JOB_START = "%6.2fs → %s(%s)%s"


def mask_text(text: str) -> str:
    """``text`` with anything that could be a phone number masked."""

    def mask(match: re.Match[str]) -> str:
        if _DATE.match(match.group(0)):
            return match.group(0)
        digits = re.sub(r"\D", "", match.group(0))
        return mask_phone(digits) if len(digits) >= 8 else match.group(0)

    return _PHONEISH.sub(mask, text)


def _patch(record: Any) -> None:
    record["message"] = mask_text(record["message"])
    for key, value in record["extra"].items():
        if isinstance(value, str):
            record["extra"][key] = mask_text(value)


ARQ_LOGGERS = ("arq.worker", "arq.connections", "arq.jobs", "arq.utils")


class _InterceptHandler(logging.Handler):
    """Sends stdlib records (aiohttp's, and any other library's) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        _to_loguru(record)


class _ArqToLoguru(logging.Filter):
    """On each of arq's loggers: the record goes to loguru, and no stdlib handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        _to_loguru(record)
        return False


def _to_loguru(record: logging.LogRecord) -> None:
    if record.msg == _ARQ_JOB_START and isinstance(record.args, tuple) and len(record.args) == 4:
        record.args = (record.args[0], record.args[1], "…", record.args[3])
    exc_info = record.exc_info
    message = record.getMessage()
    if exc_info and isinstance(exc_info[1], CGBWorkerError):
        exc_info = None  # an expected failure, fully told by its message: no traceback
    elif exc_info and isinstance(exc_info[1], Exception) and isinstance(exc_info[1].__cause__, CGBWorkerError):
        # arq's wrapper of one of ours (a job it cannot deserialize): ours says what to do, in the same line
        message, exc_info = f"{message}: {exc_info[1].__cause__}", None
    try:
        level: str | int = logger.level(record.levelname).name
    except ValueError:
        level = record.levelno
    logger.opt(exception=exc_info).bind(logger_name=record.name).log(level, message)


def _stderr(message: str) -> None:
    # Looked up on each write, so a replaced sys.stderr (tests, daemons) is followed.
    sys.stderr.write(message)


def _json_line(message: Any) -> None:
    """One compact JSON object per line: time, level, message, logger, and every bound field."""
    record = message.record
    extra = dict(record["extra"])
    line: dict[str, Any] = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
        "logger": extra.pop("logger_name", record["name"]),
        **extra,
    }
    if record["exception"] is not None:
        exc = record["exception"]
        line["exception"] = mask_text(f"{getattr(exc.type, '__name__', exc.type)}: {exc.value}")
    sys.stderr.write(json.dumps(line, default=str, ensure_ascii=False) + "\n")


def _text_format(record: Any) -> str:
    """A text line: time, level, the job's id when the line is about a job (as the JSON lines carry it), message."""
    job = " [{extra[job_id]}]" if "job_id" in record["extra"] else ""
    return "{time:HH:mm:ss.SSS} {level: <7}" + job + " {message}\n{exception}"


def setup_logging(level: str = "INFO", *, json_lines: bool = False, diagnose: bool = False) -> None:
    """Configure loguru once for the process and route stdlib logging (arq, aiohttp) into it."""
    logger.remove()
    logger.configure(patcher=_patch)
    if json_lines:
        logger.add(_json_line, level=level, backtrace=False, diagnose=diagnose)
    else:
        logger.add(_stderr, level=level, format=_text_format, backtrace=False, diagnose=diagnose)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.getLevelName(level), force=True)
    for name in ARQ_LOGGERS:
        arq_logger = logging.getLogger(name)
        for old in [f for f in arq_logger.filters if isinstance(f, _ArqToLoguru)]:
            arq_logger.removeFilter(old)
        arq_logger.addFilter(_ArqToLoguru())
    logging.getLogger("arq").handlers = []
    # arq's worker logs two INFO lines per job that repeat our own job event (and cost a tenth of a cached
    # send's CPU); below DEBUG only its warnings and errors come through.
    verbose = logging.getLevelName(level) <= logging.DEBUG
    logging.getLogger("arq.worker").setLevel(logging.DEBUG if verbose else logging.WARNING)
