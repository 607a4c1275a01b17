"""The approved-template catalog (WA_TEMPLATES_FILE): reading it, and every mismatch refused before CGB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cgb_worker import errors as E
from cgb_worker.catalog import load_catalog
from cgb_worker.settings import load_settings

from .conftest import PHONE_KEY, Harness
from .test_cli import cli

A = "+972500000001"
DOC = "https://files.example.test/v.pdf"
SAMPLE = """
[[template]]
name = "visa_approval_file_phone"
languages = ["he"]
body = 2
header = "document"
buttons = ["url"]

[[template]]
name = "documents_needed"
languages = ["he", "en_US"]
body = ["first_name", "country"]

[[template]]
name = "spring_sale"
languages = ["en"]
category = "marketing"
"""


@pytest.fixture
def catalog_file(tmp_path: Path) -> str:
    path = tmp_path / "templates.toml"
    path.write_text(SAMPLE)
    return str(path)


def test_the_sample_file_is_read(catalog_file: str) -> None:
    catalog = load_catalog(catalog_file)
    visa = catalog.templates["visa_approval_file_phone"]
    assert (visa.languages, visa.body, visa.header, visa.buttons) == (("he",), 2, "document", ("url",))
    docs = catalog.templates["documents_needed"]
    assert (docs.body, docs.header, docs.buttons, docs.category) == (("first_name", "country"), None, (), None)
    assert catalog.templates["spring_sale"].category == "marketing"


@pytest.mark.parametrize(
    ("payload", "given", "expected"),
    [
        ({"whatsappTemplate": {"name": "spring_sale", "language": "en"}}, None, "marketing"),
        ({"whatsappTemplate": {"name": "documents_needed", "language": "he"}}, None, "utility"),  # no category key
        ({"whatsappTemplate": {"name": "not_listed", "language": "he"}}, None, "utility"),
        ({"whatsappTemplate": {"name": "spring_sale", "language": "en"}}, "utility", "utility"),  # the job's wins
        ({"template": "visa_approved"}, None, "utility"),
        ({"message": "hello"}, None, "service"),
        ({"fileUrl": DOC, "fileType": "document"}, None, "service"),
        ({"message": "hello"}, "authentication", "authentication"),
    ],
)
def test_a_jobs_category_is_given_or_defaulted(
    catalog_file: str, payload: dict[str, Any], given: str | None, expected: str
) -> None:
    from cgb_worker.jobs import category_of, validate

    job = {"to": A, **payload, **({"category": given} if given else {})}
    assert category_of(validate(job), load_catalog(catalog_file)) == expected


@pytest.mark.parametrize("bad", ["promotional", "", "MARKETING", 3])
def test_an_unknown_category_is_refused(bad: Any) -> None:
    from cgb_worker.jobs import validate

    with pytest.raises(E.InvalidJobError, match="category"):
        validate({"to": A, "message": "hello", "category": bad})


async def test_the_category_is_in_the_result_and_the_timeline(harness: Harness, redis_client: Any) -> None:
    from cgb_worker import keys
    from cgb_worker.receipts import delivery

    await harness.known(A)
    await redis_client.set(keys.TRACKING, "1")  # a receiver is deployed: the send is tracked
    [job] = await harness.enqueue({"to": A, "message": "Sale!", "category": "marketing"})
    await harness.run()
    assert (await harness.outcome(job))["category"] == "marketing"
    found = await delivery(redis_client, job.job_id)
    assert found is not None
    assert (found.category, [s.category for s in found.steps]) == ("marketing", ["marketing"])


def test_every_problem_in_the_file_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
extra = 1
[[template]]
languages = ["he"]
[[template]]
name = "a"
languages = []
body = -1
header = "audio"
buttons = ["call"]
colour = "red"
category = "service"
[[template]]
name = "b"
languages = ["he"]
[[template]]
name = "b"
languages = ["en"]
"""
    )
    with pytest.raises(E.ConfigError) as info:
        load_settings(
            {"CGB_API_KEY": "k", "PHONE_HASH_KEY": PHONE_KEY, "WA_TEMPLATES_FILE": str(path), "CGB_TIMEOUT": "x"}
        )
    problems = info.value.problems
    for expected in (
        "CGB_TIMEOUT",
        "unknown top-level key(s) extra",
        "template 1: 'name' must be a non-empty string",
        "template 2 (a): unknown key 'colour'",
        "template 2 (a): 'languages'",
        "template 2 (a): 'body'",
        "template 2 (a): 'header'",
        "template 2 (a): 'buttons'",
        "template 2 (a): 'category' must be one of marketing, utility, authentication",
        "template 4: 'b' is listed twice",
    ):
        assert any(expected in p for p in problems), (expected, problems)


@pytest.mark.parametrize(("content", "why"), [(None, "cannot read"), ("[[template]\nname=", "is not TOML")])
def test_an_unreadable_file_is_a_configuration_error(tmp_path: Path, content: str | None, why: str) -> None:
    path = tmp_path / "t.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(E.ConfigError, match=why):
        load_catalog(str(path))


GOOD = {
    "name": "visa_approval_file_phone",
    "language": "he",
    "body": ["Dana", "Israel"],
    "header": {"document": {"url": DOC, "filename": "visa.pdf"}},
    "buttons": [{"index": 0, "url": "A1B2C3"}],
}
NAMED = {"name": "documents_needed", "language": "en_US", "body": {"first_name": "Ana", "country": "Israel"}}
MISMATCHES = [
    ("a template the file does not list", {**GOOD, "name": "visa_denied"}, E.TemplateNotFoundError, "not in"),
    ("a language the file does not list", {**GOOD, "language": "ar"}, E.TemplateNotFoundError, "no 'ar' version"),
    ("too few body parameters", {**GOOD, "body": ["Dana"]}, E.TemplateMismatchError, "2 positional"),
    (
        "named parameters for a positional body",
        {**GOOD, "body": {"a": "b", "c": "d"}},
        E.TemplateMismatchError,
        "2 named",
    ),
    (
        "wrong parameter names",
        {**NAMED, "body": {"first_name": "Ana", "city": "x"}},
        E.TemplateMismatchError,
        "first_name, country",
    ),
    ("positional parameters for a named body", {**NAMED, "body": ["Ana", "Israel"]}, E.TemplateMismatchError, "named"),
    (
        "a missing header",
        {k: v for k, v in GOOD.items() if k != "header"},
        E.TemplateMismatchError,
        "header is missing",
    ),
    ("an extra header", {**NAMED, "header": {"text": "Hi"}}, E.TemplateMismatchError, "no header"),
    (
        "a header of the wrong kind",
        {**GOOD, "header": {"image": {"url": DOC}}},
        E.TemplateMismatchError,
        "a document, the job gives a image",
    ),
    (
        "a button index the template lacks",
        {**GOOD, "buttons": [{"index": 1, "url": "x"}]},
        E.TemplateMismatchError,
        "no button 1",
    ),
    (
        "a quick reply for a url button",
        {**GOOD, "buttons": [{"index": 0, "payload": "x"}]},
        E.TemplateMismatchError,
        "url button",
    ),
    ("an empty parameter", {**GOOD, "body": ["Dana", " "]}, E.TemplateMismatchError, "empty"),
    (
        "a parameter over 1,024 characters",
        {**GOOD, "body": ["Dana", "x" * 1025]},
        E.TemplateMismatchError,
        "1025 characters",
    ),
    ("a newline in a parameter", {**GOOD, "body": ["Dana", "Isr\nael"]}, E.TemplateMismatchError, "132018"),
    ("a tab in a parameter", {**GOOD, "body": ["Dana", "Isr\tael"]}, E.TemplateMismatchError, "132018"),
    ("five spaces in a row", {**GOOD, "body": ["Dana", "Is     rael"]}, E.TemplateMismatchError, "132018"),
]


@pytest.mark.parametrize(("template", "error", "why"), [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES])
async def test_a_mismatch_fails_before_any_cgb_call(
    harness: Harness, catalog_file: str, template: dict[str, Any], error: type[Exception], why: str
) -> None:
    harness.set_env(WA_TEMPLATES_FILE=catalog_file)
    [job] = await harness.enqueue({"to": A, "whatsappTemplate": template})
    await harness.run()
    outcome = await harness.outcome(job)
    assert type(outcome) is error, outcome
    assert template["name"] in str(outcome)
    assert why in str(outcome)
    assert harness.sim.state.requests == []


@pytest.mark.parametrize(
    "template", [GOOD, NAMED, {**GOOD, "body": ["Dana", "four    spaces"]}], ids=["positional", "named", "four spaces"]
)
async def test_a_matching_template_is_sent(harness: Harness, catalog_file: str, template: dict[str, Any]) -> None:
    await harness.known(A)
    harness.set_env(WA_TEMPLATES_FILE=catalog_file)
    [job] = await harness.enqueue({"to": A, "whatsappTemplate": template})
    await harness.run()
    assert (await harness.outcome(job))["kind"] == "whatsapp_template"
    assert [r["endpoint"] for r in harness.sim.state.requests] == ["send_content"]


async def test_without_the_file_start_up_warns_and_sends_as_given(harness: Harness, capfd: Any) -> None:
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "whatsappTemplate": {**GOOD, "name": "not_approved_anywhere"}})
    await harness.run()
    assert (await harness.outcome(job))["templateName"] == "not_approved_anywhere"
    assert capfd.readouterr().err.count("WA_TEMPLATES_FILE is not set") == 1


async def test_the_cli_checks_and_lists_the_file(harness: Harness, catalog_file: str, tmp_path: Path) -> None:
    code, out, err = await cli(harness, "templates", env={"WA_TEMPLATES_FILE": catalog_file})
    assert code == 0, err
    assert "visa_approval_file_phone" in out
    assert "first_name, country" in out
    [sale] = [line for line in out.splitlines() if line.startswith("spring_sale")]
    assert sale.split()[-1] == "marketing"
    # a local file: read without a CGB key or a phone key (a producer's machine, a CI job)
    bare = {"WA_TEMPLATES_FILE": catalog_file, "CGB_API_KEY": None, "PHONE_HASH_KEY": None}
    code, out2, err = await cli(harness, "templates", env=bare)
    assert (code, out2, err) == (0, out, "")
    code, _, err = await cli(harness, "templates", env={**bare, "WA_TEMPLATES_FILE": None})
    assert (code, err) == (2, "cgb-worker: WA_TEMPLATES_FILE is not set\n")
    code, out, _ = await cli(harness, "check", env={"WA_TEMPLATES_FILE": catalog_file})
    assert code == 0
    assert "wa templates   ok (3 approved template(s)" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[[template]]\nname = "x"\nlanguages = []\nheader = "gif"\n')
    code, _, err = await cli(harness, "check", env={"WA_TEMPLATES_FILE": str(bad)})
    assert code == 2
    assert "'languages'" in err
    assert "'header'" in err


SIM_CASES = [
    ("matching", GOOD, "delivered", None),
    ("wrong body count", {**GOOD, "body": ["Dana"]}, "failed", 132000),
    ("badly spaced parameter", {**GOOD, "body": ["Dana", "Isr\tael"]}, "failed", 132018),
    ("unknown language", {**GOOD, "language": "ar"}, "failed", 132001),
]


@pytest.mark.parametrize(("template", "status", "code"), [c[1:] for c in SIM_CASES], ids=[c[0] for c in SIM_CASES])
async def test_the_simulator_fails_a_mismatch_after_answering_success(
    harness: Harness, catalog_file: str, template: dict[str, Any], status: str, code: int | None
) -> None:
    """What the worker's own check saves: without it (no WA_TEMPLATES_FILE for the worker), CGB says success
    and WhatsApp fails the template afterwards."""
    await harness.known(A)
    harness.sim.configure(wa_templates_file=catalog_file)
    [job] = await harness.enqueue({"to": A, "whatsappTemplate": template})
    await harness.run()
    assert (await harness.outcome(job))["success"] is True  # CGB answered success
    [entry] = harness.sim.state.outbox
    assert (entry["status"], entry.get("error_code")) == (status, code)
