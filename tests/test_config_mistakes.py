"""Every mistake named: the registry of variables, unknown ones and CGB_TEMPLATE_* look-alikes warned about,
durations with units, CGB_TIMEOUT in milliseconds warned about."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cgb_worker.errors import ConfigError
from cgb_worker.settings import (
    PREFIXES,
    VARIABLES,
    load_receiver_settings,
    load_settings,
    parse_duration,
    unknown_variables,
)

from .conftest import Harness
from .test_cli import cli

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {"CGB_API_KEY": "k", "PHONE_HASH_KEY": "k" * 16, "WABA_APP_SECRET": "s"}


class Recording(Mapping[str, str]):
    """A mapping that notes every name looked up in it (``get``, ``[]``, ``in``): what a loader reads."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self.asked.add(name)
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _read_by_the_loaders() -> set[str]:
    asked: set[str] = set()
    for load in (load_settings, load_receiver_settings):
        source = Recording(dict(SECRETS))
        load(source)
        asked |= source.asked
    return asked


def test_every_variable_the_loaders_read_is_in_the_registry() -> None:
    """A variable added to a loader and not to settings.VARIABLES would be warned about as unknown."""
    asked = _read_by_the_loaders()
    assert {"CGB_API_KEY", "WABA_APP_SECRET", "METRICS_PORT", "WEBHOOK_ADMIN_PORT", "WORKER_KEEP_RESULT"} <= asked
    assert asked - set(VARIABLES) == set()


def test_every_variable_read_elsewhere_is_in_the_registry() -> None:
    """The CLI and the worker's error path read a few from the environment directly, and the tests their own."""
    names: set[str] = set()
    paths = [*(ROOT / "cgb_worker").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "container").glob("*.py")]
    for path in paths:
        text = path.read_text()
        names |= set(re.findall(r"environ(?:\.get\(|\[)\"([A-Z][A-Z0-9_]+)\"", text))
        names |= set(re.findall(r"env\.\w+\(\s*\"([A-Z][A-Z0-9_]+)\"", text))
        names |= set(re.findall(r"source\.get\(\"([A-Z][A-Z0-9_]+)\"", text))
    assert {"REDIS_URL", "WA_TEMPLATES_FILE", "LOG_JSON", "CGB_TEST_REDIS_URL", "CGB_IMAGE"} <= names
    ours = {name for name in names if name.startswith(PREFIXES)}  # not PATH, not pytest-xdist's
    assert ours - set(VARIABLES) == set()


def test_env_sample_documents_every_variable_the_loaders_read() -> None:
    sample = (ROOT / ".env.sample").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", sample, re.MULTILINE))
    assert _read_by_the_loaders() - documented == set()


def test_every_known_variable_is_under_a_watched_prefix() -> None:
    assert all(name.startswith(PREFIXES) for name in VARIABLES)
    assert {"CGB_", "REDIS_", "WORKER_", "WEBHOOK_", "WABA_", "STATUS_", "WA_", "LOG_", "METRICS_"} <= set(PREFIXES)


@pytest.mark.parametrize(
    ("name", "warning"),
    [
        ("CGB_RATE_LIMT", "CGB_RATE_LIMT is not a setting; did you mean CGB_RATE_LIMIT?"),
        ("WORKER_MAX_JOB", "WORKER_MAX_JOB is not a setting; did you mean WORKER_MAX_JOBS?"),
        ("WEBHOOK_PROT", "WEBHOOK_PROT is not a setting; did you mean WEBHOOK_PORT?"),
        ("LOG_LEVLE", "LOG_LEVLE is not a setting; did you mean LOG_LEVEL?"),
        ("METRIC_PORT", None),  # no watched prefix (METRICS_): a stranger's variable, let be
        ("REDIS_PASSWORD", "REDIS_PASSWORD is not a setting; Redis's host, port, database, user, password and TLS"),
        ("WABA_TOKEN", "WABA_TOKEN is not a setting (.env.sample lists every variable); it is ignored."),
    ],
)
def test_an_unknown_variable_is_warned_about_naming_the_closest_known_one(name: str, warning: str | None) -> None:
    secret = "1000001.SecretLookingValue0123456789"
    for load in (load_settings, load_receiver_settings):
        settings = load({**SECRETS, name: secret})
        if warning is None:
            assert settings.warnings == ()
        else:
            [line] = settings.warnings
            assert line.startswith(warning)
            assert secret not in line  # the value may be a secret: only the name is shown


def test_what_a_cluster_puts_in_the_environment_and_other_programs_variables_are_not_warned_about() -> None:
    env = {
        "REDIS_SERVICE_HOST": "10.0.0.7",
        "REDIS_SERVICE_PORT": "6379",
        "REDIS_SERVICE_PORT_REDIS": "6379",
        "REDIS_PORT": "tcp://10.0.0.7:6379",
        "REDIS_PORT_6379_TCP_ADDR": "10.0.0.7",
        "WORKER_PORT_9100_TCP": "tcp://10.0.0.8:9100",
        "HOME": "/root",
        "PATH": "/usr/bin",
        "LOGNAME": "root",
    }
    assert unknown_variables({**SECRETS, **env}) == []
    assert load_settings({**SECRETS, **env}).warnings == ()


def test_a_known_variable_and_a_template_are_not_warned_about() -> None:
    settings = load_settings({**SECRETS, "CGB_RATE_LIMIT": "5", "CGB_TEMPLATE_VISA_APPROVED": "1752250957765"})
    assert settings.warnings == ()
    assert dict(settings.templates) == {"visa_approved": "1752250957765"}


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("CGB_TEMPLATE_CACHE_TIMOUT", "CGB_TEMPLATE_CACHE_TIMEOUT"),
        ("CGB_TEMPLATE_RATE_LIMIT", "CGB_RATE_LIMIT"),
        ("CGB_TEMPLATE_TIMEOUT", "CGB_TIMEOUT"),
    ],
)
def test_a_template_variable_that_looks_like_a_setting_is_flagged(name: str, meant: str) -> None:
    """With digits it still maps a template (that may be meant), with a warning; with anything else it was
    already a problem, which now names the setting."""
    settings = load_settings({**SECRETS, name: "600"})
    template = name.removeprefix("CGB_TEMPLATE_").lower()
    assert settings.warnings == (f"{name} maps a template named {template!r} to a CGB flow; did you mean {meant}?",)
    assert dict(settings.templates) == {template: "600"}
    with pytest.raises(ConfigError) as info:
        load_settings({**SECRETS, name: "10m"})
    assert info.value.problems == [
        f"{name}: flow id must be digits (CGB_TEMPLATE_<NAME> maps a template to a flow); that looks like a "
        f"duration, not a flow id; did you mean {meant}?"
    ]


def test_a_template_with_a_bad_flow_id_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**SECRETS, "CGB_TEMPLATE_VISA_APPROVED": "visa-flow"})
    assert info.value.problems == [
        "CGB_TEMPLATE_VISA_APPROVED: flow id must be digits (CGB_TEMPLATE_<NAME> maps a template to a flow)."
    ]


@pytest.mark.parametrize(
    ("text", "unit", "value"),
    [
        ("30", "s", 30.0),
        ("30s", "s", 30.0),
        ("1.5s", "s", 1.5),
        ("500ms", "s", 0.5),
        ("5m", "s", 300.0),
        ("1h", "s", 3600.0),
        ("2d", "s", 172800.0),
        (" 10 S ", "s", 10.0),
        (".5s", "s", 0.5),
        ("5000", "ms", 5000.0),
        ("5s", "ms", 5000.0),
        ("1.5s", "ms", 1500.0),
        ("12h", "d", 0.5),
        ("7", "d", 7.0),
    ],
)
def test_parse_duration(text: str, unit: str, value: float) -> None:
    assert parse_duration(text, unit) == value


@pytest.mark.parametrize("text", ["soon", "", "5 minutes", "-5s", "1e3", "5s5", "ms", "1,5s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="Not a valid duration"):
        parse_duration(text)


WORKER_DURATIONS: list[tuple[str, str, Any]] = [
    ("CGB_TIMEOUT", "2s", lambda s: s.timeout == 2.0),
    ("CGB_RETRY_BASE_DELAY", "500ms", lambda s: s.retry_base_delay == 0.5),
    ("CGB_RETRY_MAX_DELAY", "5m", lambda s: s.retry_max_delay == 300.0),
    ("CGB_CACHE_TIMEOUT", "1h", lambda s: s.cache_timeout == 3600),
    ("CGB_TEMPLATE_CACHE_TIMEOUT", "1d", lambda s: s.template_cache_timeout == 86400),
    ("STATUS_TURN_WAIT", "1m", lambda s: s.turn_wait == 60.0),
    ("STATUS_CLOCK_SKEW", "1500ms", lambda s: s.clock_skew == 1.5),
    ("WORKER_POLL_DELAY", "50ms", lambda s: s.worker.poll_delay == 0.05),
    ("WORKER_JOB_TIMEOUT", "1m", lambda s: s.worker.job_timeout == 60),
    ("WORKER_HEALTH_CHECK_INTERVAL", "5s", lambda s: s.worker.health_check_interval == 5),
    ("WORKER_JOB_COMPLETION_WAIT", "1m", lambda s: s.worker.job_completion_wait == 60),
    ("WORKER_KEEP_RESULT", "2h", lambda s: s.worker.keep_result == 7200),
]
RECEIVER_DURATIONS: list[tuple[str, str, Any]] = [
    ("STATUS_MATCH_WINDOW", "15m", lambda s: s.match_window == 900.0),
    ("STATUS_UNCONFIRMED_AFTER", "2d", lambda s: s.unconfirmed_after == 172800.0),
    ("STATUS_CLOCK_SKEW", "3s", lambda s: s.clock_skew == 3.0),
    ("STATUS_HOLD", "10m", lambda s: s.hold == 600.0),
    ("WEBHOOK_REDIS_TIMEOUT", "500ms", lambda s: s.redis_timeout == 0.5),
    ("WEBHOOK_READ_TIMEOUT", "30s", lambda s: s.read_timeout == 30.0),
    ("WEBHOOK_MAX_LAG", "2m", lambda s: s.max_lag == 120.0),
    ("WEBHOOK_DIAGNOSTICS_TTL", "36h", lambda s: s.diagnostics_ttl == 1.5),  # a bare number is days
    ("WA_RESEND_DELAY", "1m", lambda s: s.reactions.resend_delay == 60.0),
    ("MARKETING_CAP_RETRY_AFTER", "1d", lambda s: s.reactions.marketing_cap_retry_after == 86400.0),
    ("UNDELIVERABLE_TTL", "12h", lambda s: s.reactions.undeliverable_ttl == 43200.0),
]


@pytest.mark.parametrize(
    ("load", "name", "text", "holds"),
    [(load_settings, *d) for d in WORKER_DURATIONS] + [(load_receiver_settings, *d) for d in RECEIVER_DURATIONS],
    ids=[d[0] for d in WORKER_DURATIONS + RECEIVER_DURATIONS],
)
def test_every_duration_variable_takes_a_unit(load: Any, name: str, text: str, holds: Any) -> None:
    settings = load({**SECRETS, name: text})
    assert holds(settings), name
    assert settings.warnings == ()
    with pytest.raises(ConfigError) as info:
        load({**SECRETS, name: "a while"})
    [problem] = info.value.problems
    assert problem.startswith(f"{name}: Not a valid duration: a number of ")
    assert "(500ms, 30s, 5m, 1h, 1d)" in problem


def test_a_bare_number_keeps_its_documented_unit() -> None:
    worker = load_settings({**SECRETS, "CGB_TIMEOUT": "2500", "WORKER_JOB_TIMEOUT": "60", "CGB_RETRY_BASE_DELAY": "3"})
    assert (worker.timeout, worker.worker.job_timeout, worker.retry_base_delay) == (2.5, 60, 3.0)
    receiver = load_receiver_settings({**SECRETS, "WEBHOOK_DIAGNOSTICS_TTL": "3", "STATUS_HOLD": "90"})
    assert (receiver.diagnostics_ttl, receiver.hold) == (3.0, 90.0)


@pytest.mark.parametrize("name", ["WORKER_JOB_TIMEOUT", "CGB_CACHE_TIMEOUT", "WORKER_KEEP_RESULT"])
def test_a_whole_seconds_variable_refuses_a_fraction_in_any_spelling(name: str) -> None:
    for text in ("1.5", "1500ms", "0.01m"):
        with pytest.raises(ConfigError) as info:
            load_settings({**SECRETS, name: text})
        assert info.value.problems == [f"{name}: Not a whole number of seconds."]


def test_a_unit_goes_through_the_same_range_check() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**SECRETS, "WORKER_HEALTH_CHECK_INTERVAL": "1m", "WORKER_POLL_DELAY": "1h"})
    assert [p.split(":")[0] for p in info.value.problems] == ["WORKER_POLL_DELAY", "WORKER_HEALTH_CHECK_INTERVAL"]
    with pytest.raises(ConfigError, match=r"CGB_TIMEOUT: must be below 11\.25 s"):
        load_settings({**SECRETS, "CGB_TIMEOUT": "1m"})


@pytest.mark.parametrize(("value", "warned"), [("5", True), ("99", True), ("0.5", True), ("100", False),
                                               ("5s", False), ("5000", False), ("50ms", False)])  # fmt: skip
def test_a_bare_cgb_timeout_under_100_warns_that_it_is_milliseconds(value: str, warned: bool) -> None:
    settings = load_settings({**SECRETS, "CGB_TIMEOUT": value})
    expected = (f"CGB_TIMEOUT={value} is {value} ms; write {value}s for seconds.",) if warned else ()
    assert settings.warnings == expected


def test_every_problem_and_no_warning_stops_the_worker_in_one_list() -> None:
    """Warnings never stop anything; problems are still one line each, all at once."""
    with pytest.raises(ConfigError) as info:
        load_settings({**SECRETS, "CGB_TIMEOUT": "soon", "CGB_RATE_LIMT": "5", "WORKER_JOB_TIMEOUT": "1.5s"})
    assert info.value.problems == [
        "CGB_TIMEOUT: Not a valid duration: a number of milliseconds, or one with a unit (500ms, 30s, 5m, 1h, 1d).",
        "WORKER_JOB_TIMEOUT: Not a whole number of seconds.",
    ]


async def test_check_prints_the_warnings_and_still_passes(harness: Harness) -> None:
    env = {"CGB_RATE_LIMT": "5", "CGB_TEMPLATE_CACHE_TIMOUT": "1752250957765"}
    code, out, err = await cli(harness, "check", env=env)  # type: ignore[arg-type]
    assert (code, err) == (0, ""), out
    lines = out.splitlines()
    assert lines[:3] == [
        "configuration  ok",
        "warning        CGB_RATE_LIMT is not a setting; did you mean CGB_RATE_LIMIT?",
        "warning        CGB_TEMPLATE_CACHE_TIMOUT maps a template named 'cache_timout' to a CGB flow; "
        "did you mean CGB_TEMPLATE_CACHE_TIMEOUT?",
    ]
    assert any(line.startswith("cgb            ok") for line in lines)


async def test_status_reads_status_unconfirmed_after_as_a_duration(harness: Harness) -> None:
    code, _, err = await cli(harness, "status", "no-such-job", env={"STATUS_UNCONFIRMED_AFTER": "a day"})
    assert code == 2
    assert err.strip().splitlines() == [
        "cgb-worker: STATUS_UNCONFIRMED_AFTER: Not a valid duration: a number of seconds, or one with a unit "
        "(500ms, 30s, 5m, 1h, 1d)."
    ]
    code, out, err = await cli(harness, "status", "no-such-job", env={"STATUS_UNCONFIRMED_AFTER": "2d"})
    assert code == 3  # unknown: nothing has a record of the id
    assert "no-such-job" in out + err
