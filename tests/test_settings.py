"""Settings: defaults, parsing, every problem reported at once, the key never shown."""

from __future__ import annotations

import pickle

import pytest

from cgb_worker.errors import ConfigError
from cgb_worker.settings import DEFAULT_API_URL, Secret, Settings, load_settings, redact_url

KEY = "1000001.FakeKeyForSettingsTestsOnly0123456789"
PHONE = "fake-phone-hash-key-for-settings-tests"
P = {"PHONE_HASH_KEY": PHONE}


def test_defaults_with_only_the_key() -> None:
    s = load_settings({**P, "CGB_API_KEY": KEY})
    assert s.api_key.get_secret_value() == KEY
    assert s.api_url == DEFAULT_API_URL == "https://app.chatgptbuilder.io/api"
    assert s.timeout == 5.0
    assert s.rate_limit == 10.0
    assert (s.worker.max_jobs, s.worker.poll_delay, s.worker.job_timeout, s.worker.job_completion_wait) == (
        20,
        0.02,
        15,
        20,
    )
    assert (s.retry_attempts, s.retry_base_delay, s.retry_max_delay) == (10, 2.0, 300.0)
    assert (s.cache_timeout, s.template_cache_timeout) == (3600, 86400)
    assert dict(s.templates) == {}
    assert s.default_region is None
    assert s.redis_url == "redis://localhost:6379/0"


def test_every_variable_is_read() -> None:
    s = load_settings(
        {
            "CGB_API_KEY": f"  {KEY} ",
            "PHONE_HASH_KEY": f" {PHONE} ",
            "CGB_API_URL": "http://127.0.0.1:8089/api/",
            "CGB_TIMEOUT": "2500",
            "CGB_RETRY_ATTEMPTS": "3",
            "CGB_RETRY_BASE_DELAY": "0.5",
            "CGB_RETRY_MAX_DELAY": "10",
            "CGB_CACHE_TIMEOUT": "60",
            "CGB_TEMPLATE_CACHE_TIMEOUT": "120",
            "CGB_TEMPLATE_VISA_APPROVED": "1752250957765",
            "CGB_TEMPLATE_Documents_Needed": " 1752250957766 ",
            "CGB_DEFAULT_REGION": "il",
            "REDIS_URL": "redis://:pw@redis.internal:6380/2",
        }
    )
    assert s.api_key.get_secret_value() == KEY
    assert s.phone_hash_key.get_secret_value() == PHONE
    assert s.api_url == "http://127.0.0.1:8089/api"
    assert s.timeout == 2.5
    assert (s.retry_attempts, s.retry_base_delay, s.retry_max_delay) == (3, 0.5, 10.0)
    assert (s.cache_timeout, s.template_cache_timeout) == (60, 120)
    assert dict(s.templates) == {"visa_approved": "1752250957765", "documents_needed": "1752250957766"}
    assert s.default_region == "IL"
    assert s.redis_url == "redis://:pw@redis.internal:6380/2"


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            {
                "CGB_TIMEOUT": "soon",
                "CGB_RETRY_ATTEMPTS": "-1",
                "CGB_RETRY_BASE_DELAY": "0",
                "CGB_CACHE_TIMEOUT": "1.5",
                "CGB_DEFAULT_REGION": "XX",
                "CGB_TEMPLATE_VISA_APPROVED": "visa-flow",
                "CGB_API_URL": "ftp://example.test",
                "REDIS_URL": "localhost:6379",
            }
        )
    problems = "\n".join(info.value.problems)
    for variable in (
        "CGB_API_KEY",
        "CGB_TIMEOUT",
        "CGB_RETRY_ATTEMPTS",
        "CGB_RETRY_BASE_DELAY",
        "CGB_CACHE_TIMEOUT",
        "CGB_DEFAULT_REGION",
        "CGB_TEMPLATE_VISA_APPROVED",
        "CGB_API_URL",
        "REDIS_URL",
        "PHONE_HASH_KEY",
    ):
        assert variable in problems, variable
    assert len(info.value.problems) == 10
    assert str(info.value).startswith("invalid configuration:\n  - ")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({**P, "CGB_API_KEY": "   "}, "CGB_API_KEY: must not be empty."),
        ({**P, "CGB_API_KEY": KEY, "CGB_RETRY_BASE_DELAY": "5", "CGB_RETRY_MAX_DELAY": "1"}, "CGB_RETRY_MAX_DELAY"),
        ({**P, "CGB_API_KEY": KEY, "CGB_TEMPLATE_": "1"}, "CGB_TEMPLATE_: names no template."),
        ({**P, "CGB_API_KEY": KEY, "CGB_TIMEOUT": "0"}, "CGB_TIMEOUT"),
    ],
)
def test_single_problem(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(expected)


def test_template_cache_timeout_is_not_a_template() -> None:
    s = load_settings({**P, "CGB_API_KEY": KEY, "CGB_TEMPLATE_CACHE_TIMEOUT": "5"})
    assert dict(s.templates) == {}
    assert s.template_cache_timeout == 5


def test_key_and_redis_password_never_shown() -> None:
    s = load_settings({**P, "CGB_API_KEY": KEY, "REDIS_URL": "rediss://user:hunter2@redis.test:6380/0"})
    for text in (repr(s), str(s), repr(s.api_key), str(s.api_key), f"{s.api_key}"):
        assert KEY not in text
        assert "hunter2" not in text
    assert "rediss://user:********@redis.test:6380/0" in repr(s)
    with pytest.raises(TypeError):
        pickle.dumps(s.api_key)


def test_settings_are_frozen() -> None:
    s = load_settings({**P, "CGB_API_KEY": KEY, "CGB_TEMPLATE_X": "1"})
    with pytest.raises(AttributeError):
        s.timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.templates["y"] = "2"  # type: ignore[index]


def test_bad_key_value_is_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**P, "CGB_API_KEY": KEY, "CGB_TIMEOUT": "x"})
    assert KEY not in str(info.value)


def test_os_environ_is_read_and_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CGB_API_KEY", KEY)
    monkeypatch.setenv("PHONE_HASH_KEY", PHONE)
    monkeypatch.setenv("CGB_TIMEOUT", "1000")
    assert load_settings().timeout == 1.0
    import os

    before = dict(os.environ)
    load_settings({**P, "CGB_API_KEY": "other"})
    assert dict(os.environ) == before


def test_secret_equality_and_redact_url() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert redact_url("redis://:pw@h:1/0") == "redis://:********@h:1/0"
    assert dict(Settings(api_key=Secret("k"), phone_hash_key=Secret(PHONE)).templates) == {}


def test_worker_variables_are_checked_with_the_rest() -> None:
    env = {**P, "CGB_API_KEY": KEY, "WORKER_MAX_JOBS": "250", "WORKER_POLL_DELAY": "0.05", "WORKER_JOB_TIMEOUT": "60"}
    s = load_settings(env)
    assert (s.worker.max_jobs, s.worker.poll_delay, s.worker.job_timeout) == (250, 0.05, 60)
    bad = {"WORKER_MAX_JOBS": "lots", "WORKER_HEALTH_CHECK_INTERVAL": "300", "WORKER_KEEP_RESULT": "-1"}
    with pytest.raises(ConfigError) as info:
        load_settings({**P, "CGB_API_KEY": KEY, **bad})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "WORKER_MAX_JOBS",
        "WORKER_HEALTH_CHECK_INTERVAL",
        "WORKER_KEEP_RESULT",
    ]


@pytest.mark.parametrize(("rate", "max_jobs"), [("0", 100), ("2", 10), ("10", 20), ("20", 40), ("80", 100)])
def test_max_jobs_follows_the_rate_limit_unless_set(rate: str, max_jobs: int) -> None:
    assert load_settings({**P, "CGB_API_KEY": KEY, "CGB_RATE_LIMIT": rate}).worker.max_jobs == max_jobs
    assert load_settings({**P, "CGB_API_KEY": KEY, "CGB_RATE_LIMIT": rate, "WORKER_MAX_JOBS": "7"}).worker.max_jobs == 7


BAD_REDIS_URLS = [
    ("port not a number", "redis://cache.internal:63790x/0", "port"),
    ("port out of range", "redis://cache.internal:99999/0", "port"),
    ("no host", "redis:///0", "names no host"),
    ("database not a number", "redis://cache.internal:6379/zero", "database"),
    ("wrong scheme", "http://cache.internal:6379/0", "redis://"),
    ("unix without a path", "unix://", "path"),
]


@pytest.mark.parametrize(("url", "why"), [b[1:] for b in BAD_REDIS_URLS], ids=[b[0] for b in BAD_REDIS_URLS])
def test_a_malformed_redis_url_is_a_configuration_error(url: str, why: str) -> None:
    """Symptom 6: ``redis://cache.internal:63790x/0`` started a worker on localhost:6379/0, silently."""
    with pytest.raises(ConfigError) as info:
        load_settings({**P, "CGB_API_KEY": KEY, "REDIS_URL": url})
    [problem] = info.value.problems
    assert problem.startswith("REDIS_URL: ")
    assert why in problem


def test_settings_come_from_the_mapping_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Symptom 9: load_settings swapped os.environ for the whole process. The mapping is read as it is, and
    a variable set only in the process environment is not seen."""
    import os

    monkeypatch.setenv("CGB_TIMEOUT", "1234")
    monkeypatch.setenv("CGB_TEMPLATE_FROM_PROCESS", "1")
    before = dict(os.environ)
    environ_id = id(os.environ)
    s = load_settings({**P, "CGB_API_KEY": KEY})
    assert s.timeout == 5.0
    assert dict(s.templates) == {}
    assert dict(os.environ) == before
    assert id(os.environ) == environ_id


def test_cgb_timeout_must_fit_inside_the_job_deadline() -> None:
    with pytest.raises(ConfigError, match="CGB_TIMEOUT: must be below 45 s"):
        load_settings({**P, "CGB_API_KEY": KEY, "WORKER_JOB_TIMEOUT": "60", "CGB_TIMEOUT": "45000"})
    assert load_settings({**P, "CGB_API_KEY": KEY, "WORKER_JOB_TIMEOUT": "60", "CGB_TIMEOUT": "44000"}).timeout == 44


def test_receiver_settings_report_every_problem_at_once() -> None:
    from cgb_worker.settings import load_receiver_settings

    with pytest.raises(ConfigError) as caught:
        load_receiver_settings(
            {
                "WEBHOOK_PORT": "0",
                "STATUS_MATCH_WINDOW": "-1",
                "STATUS_UNCONFIRMED_AFTER": "soon",
                "DELIVERY_STREAM_MAX": "5",
                "REDIS_URL": "redis://cache.internal:63790x/0",
                "WA_RESEND_DELAY": "-1",
                "WA_RESEND_FACTOR": "0.5",
                "WA_RESEND_MAX": "eleven",
                "MARKETING_CAP_RETRY_AFTER": "a day",
                "UNDELIVERABLE_TTL": "0",
                "OPT_OUT_KEYWORDS": "STOP,,END",
                "OPT_IN_KEYWORDS": "x" * 65,
            }
        )
    problems = "\n".join(caught.value.problems)
    for name in ("WABA_APP_SECRET", "PHONE_HASH_KEY", "WEBHOOK_PORT", "STATUS_MATCH_WINDOW", "STATUS_UNCONFIRMED_AFTER",
                 "DELIVERY_STREAM_MAX", "REDIS_URL", "WA_RESEND_DELAY", "WA_RESEND_FACTOR", "WA_RESEND_MAX",
                 "MARKETING_CAP_RETRY_AFTER", "UNDELIVERABLE_TTL", "OPT_OUT_KEYWORDS", "OPT_IN_KEYWORDS"):  # fmt: skip
        assert name in problems, name


def test_receiver_reaction_settings() -> None:
    from cgb_worker.settings import ReactionSettings, load_receiver_settings

    base = {"WABA_APP_SECRET": "s", "PHONE_HASH_KEY": "k" * 16}
    assert load_receiver_settings(base).reactions == ReactionSettings(6.0, 4.0, 3, 0.0, 86400.0)
    given = {"WA_RESEND_DELAY": "0", "WA_RESEND_MAX": "0", "MARKETING_CAP_RETRY_AFTER": "90000",
             "UNDELIVERABLE_TTL": "3600"}  # fmt: skip
    assert load_receiver_settings({**base, **given}).reactions == ReactionSettings(0.0, 4.0, 0, 90000.0, 3600.0)


def test_receiver_settings_defaults_and_secrets() -> None:
    from cgb_worker.settings import load_receiver_settings

    s = load_receiver_settings({**P, "WABA_APP_SECRET": "  app-secret-xyz  ", "WABA_VERIFY_TOKEN": "tok-abc"})
    assert (s.port, s.match_window, s.unconfirmed_after, s.stream_max) == (8090, 600.0, 86400.0, 100000)
    assert s.app_secret.get_secret_value() == "app-secret-xyz"
    assert "app-secret-xyz" not in repr(s)
    assert "tok-abc" not in repr(s)


def test_receiver_keywords_default_normalise_and_may_be_turned_off() -> None:
    from cgb_worker.settings import load_receiver_settings

    base = {**P, "WABA_APP_SECRET": "app-secret-xyz"}
    s = load_receiver_settings(base)
    assert (s.opt_out_keywords, s.opt_in_keywords) == (
        frozenset({"stop", "unsubscribe"}),
        frozenset({"start", "subscribe"}),
    )
    s = load_receiver_settings({**base, "OPT_OUT_KEYWORDS": " Stop All , HALT", "OPT_IN_KEYWORDS": ""})
    assert (s.opt_out_keywords, s.opt_in_keywords) == (frozenset({"stop all", "halt"}), frozenset[str]())
    with pytest.raises(ConfigError) as caught:
        load_receiver_settings({**base, "OPT_OUT_KEYWORDS": "STOP,END", "OPT_IN_KEYWORDS": "start,end"})
    assert caught.value.problems == ["OPT_IN_KEYWORDS: end is an opt-out keyword too; a keyword is one or the other."]


def test_outside_window_is_send_or_fail() -> None:
    assert load_settings({**P, "CGB_API_KEY": "k"}).outside_window == "send"
    assert load_settings({**P, "CGB_API_KEY": "k", "CGB_OUTSIDE_WINDOW": "fail"}).outside_window == "fail"
    with pytest.raises(ConfigError) as caught:
        load_settings({**P, "CGB_API_KEY": "k", "CGB_OUTSIDE_WINDOW": "drop"})
    assert "CGB_OUTSIDE_WINDOW" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "PHONE_HASH_KEY: required (a random secret shared by workers and receivers: openssl rand -hex 32)."),
        ("   ", "PHONE_HASH_KEY: required (a random secret shared by workers and receivers: openssl rand -hex 32)."),
        ("fifteen-chars-1", "PHONE_HASH_KEY: must have at least 16 characters."),
    ],
)
def test_the_phone_hash_key_is_required_by_worker_and_receiver_alike(value: str | None, expected: str) -> None:
    """One line each, in both loaders; a key of 16 characters is enough."""
    from cgb_worker.settings import load_receiver_settings

    extra = {} if value is None else {"PHONE_HASH_KEY": value}
    for load, env in ((load_settings, {"CGB_API_KEY": KEY}), (load_receiver_settings, {"WABA_APP_SECRET": "s"})):
        with pytest.raises(ConfigError) as info:
            load({**env, **extra})
        assert info.value.problems == [expected]
        assert load({**env, "PHONE_HASH_KEY": "sixteen-chars-12"}).phone_hash_key == Secret("sixteen-chars-12")


def test_the_phone_hash_key_is_never_shown() -> None:
    s = load_settings({**P, "CGB_API_KEY": KEY})
    assert PHONE not in repr(s)
    with pytest.raises(ConfigError) as info:
        load_settings({"CGB_API_KEY": KEY, "PHONE_HASH_KEY": "short-secret"})
    assert "short-secret" not in str(info.value)


def test_the_sample_environment_ships_no_secret() -> None:
    """.env.sample's values, taken as they are, configure everything but the secrets, which it leaves out."""
    from pathlib import Path

    from cgb_worker.settings import load_receiver_settings

    lines = (Path(__file__).resolve().parent.parent / ".env.sample").read_text().splitlines()
    sample = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    sample = {k: v for k, v in sample.items() if v}  # an empty value stands for unset
    for secret in ("CGB_API_KEY", "PHONE_HASH_KEY", "WABA_APP_SECRET", "WABA_VERIFY_TOKEN"):
        assert secret not in sample
        assert f"# {secret}=\n" in "\n".join(lines) + "\n"  # documented, commented out
    for load, missing in ((load_settings, ["CGB_API_KEY", "PHONE_HASH_KEY"]),
                          (load_receiver_settings, ["WABA_APP_SECRET", "PHONE_HASH_KEY"])):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            load(sample)
        assert [p.split(":")[0] for p in info.value.problems] == missing


def test_quiet_hours_are_off_by_default_and_read_once() -> None:
    s = load_settings({**P, "CGB_API_KEY": KEY})
    assert s.quiet_hours is None
    assert s.quiet_categories == frozenset({"marketing"})
    assert load_settings({**P, "CGB_API_KEY": KEY, "QUIET_HOURS": "  "}).quiet_hours is None  # empty: off
    s = load_settings(
        {**P, "CGB_API_KEY": KEY, "QUIET_HOURS": "21:00-08:00", "QUIET_HOURS_CATEGORIES": " Marketing ,utility,"}
    )
    assert (s.quiet_hours.start, s.quiet_hours.end) == (21 * 60, 8 * 60)  # type: ignore[union-attr]
    assert s.quiet_categories == frozenset({"marketing", "utility"})
    assert "quiet_hours=QuietHours(start=1260, end=480)" in repr(s)
    same_day = load_settings({**P, "CGB_API_KEY": KEY, "QUIET_HOURS": "13:00-14:00"}).quiet_hours
    assert str(same_day) == "13:00-14:00"
    every = load_settings(
        {**P, "CGB_API_KEY": KEY, "QUIET_HOURS_CATEGORIES": "marketing,utility,authentication,service"}
    )
    assert every.quiet_categories == frozenset({"marketing", "utility", "authentication", "service"})


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("QUIET_HOURS", "25:00-08:00", "QUIET_HOURS: '25:00-08:00': hours go from 00 to 23 and minutes from 00 to 59."),
        ("QUIET_HOURS", "21:00", "QUIET_HOURS: '21:00' is not a range of local times such as 21:00-08:00."),
        ("QUIET_HOURS", "21:00-21:00", "QUIET_HOURS: '21:00-21:00': the start and the end are the same minute."),
        ("QUIET_HOURS", "nights", "QUIET_HOURS: 'nights' is not a range of local times such as 21:00-08:00."),
        (
            "QUIET_HOURS_CATEGORIES",
            "marketing,promotional",
            "QUIET_HOURS_CATEGORIES: 'promotional': the categories are marketing, utility, authentication, service.",
        ),
        ("QUIET_HOURS_CATEGORIES", " , ", "QUIET_HOURS_CATEGORIES: names no category"),
    ],
)
def test_each_bad_quiet_hours_value_is_one_named_line(variable: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**P, "CGB_API_KEY": KEY, variable: value})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(expected)


def test_bad_quiet_hours_are_reported_with_the_other_problems() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**P, "QUIET_HOURS": "8-21", "QUIET_HOURS_CATEGORIES": "sales", "CGB_TIMEOUT": "soon"})
    assert sorted(p.split(":")[0] for p in info.value.problems) == [
        "CGB_API_KEY",
        "CGB_TIMEOUT",
        "QUIET_HOURS",
        "QUIET_HOURS_CATEGORIES",
    ]


@pytest.mark.parametrize(("given", "kept"), [("info", "INFO"), (" Debug ", "DEBUG"), ("WARNING", "WARNING")])
def test_log_level_is_read_in_any_case(given: str, kept: str) -> None:
    from cgb_worker.settings import load_receiver_settings, load_settings

    worker = load_settings({"CGB_API_KEY": "k", "PHONE_HASH_KEY": "k" * 16, "LOG_LEVEL": given})
    receiver = load_receiver_settings({"WABA_APP_SECRET": "s", "PHONE_HASH_KEY": "k" * 16, "LOG_LEVEL": given})
    assert (worker.log_level, receiver.log_level) == (kept, kept)


@pytest.mark.parametrize("bad", ["loud", "inf0", "INFO!"])
def test_a_bad_log_level_is_one_line_naming_the_choices(bad: str) -> None:
    from cgb_worker.settings import load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings({"CGB_API_KEY": "k", "PHONE_HASH_KEY": "k" * 16, "LOG_LEVEL": bad})
    assert caught.value.problems == ["LOG_LEVEL: Must be one of: TRACE, DEBUG, INFO, WARNING, ERROR."]


def _sample() -> dict[str, str]:
    """.env.sample as shipped: its NAME=value lines (commented ones left out), as `set -a; . .env.sample` reads."""
    from pathlib import Path

    values: dict[str, str] = {}
    for line in (Path(__file__).parent.parent / ".env.sample").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            values[name] = value
    return values


def test_the_shipped_env_sample_with_only_the_secrets_filled_in_starts_worker_and_receiver() -> None:
    from cgb_worker.settings import load_receiver_settings, load_settings

    sample = _sample()
    assert "" in sample.values()  # it ships empty assignments (METRICS_PORT=, CGB_DEFAULT_REGION=, ...)
    secrets = {"CGB_API_KEY": "k", "PHONE_HASH_KEY": "k" * 16, "WABA_APP_SECRET": "s"}
    worker = load_settings({**sample, **secrets})
    assert (worker.metrics_port, worker.default_region, worker.quiet_hours) == (None, None, None)
    load_receiver_settings({**sample, **secrets})


@pytest.mark.parametrize("name", ["METRICS_PORT", "CGB_DEFAULT_REGION", "CGB_RATE_LIMIT", "QUIET_HOURS", "LOG_LEVEL"])
def test_an_empty_variable_is_unset(name: str) -> None:
    """Tried: an integer, a region, a number with a default, a range, a choice; each empty, or blank."""
    from cgb_worker.settings import load_settings

    base = {"CGB_API_KEY": "k", "PHONE_HASH_KEY": "k" * 16}
    assert load_settings({**base, name: ""}) == load_settings(base) == load_settings({**base, name: "  "})
