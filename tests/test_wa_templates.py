"""Native WhatsApp templates (``whatsappTemplate``) through CGB's ``send_content``, without a catalog: the exact
request for each shape, the result, the send log, and every shape refused before a request leaves."""

from __future__ import annotations

from typing import Any

import pytest

from cgb_worker import errors as E
from cgb_worker.sends import key as sends_key
from cgb_worker.simulator import FaultRule

from .conftest import Harness

A = "+972500000001"
DOC = "https://files.example.test/v.pdf"


def expected(template: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [
            {
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": "972500000001",
                "type": "template",
                "template": template,
            }
        ]
    }


SHAPES = [
    (
        "document header, positional body, url button (the issue's example)",
        {
            "name": "visa_approval_file_phone",
            "language": "he",
            "body": ["Dana", "Israel"],
            "header": {"document": {"url": DOC, "filename": "visa.pdf"}},
            "buttons": [{"index": 0, "url": "A1B2C3"}],
        },
        {
            "name": "visa_approval_file_phone",
            "language": {"code": "he"},
            "components": [
                {
                    "type": "header",
                    "parameters": [{"type": "document", "document": {"link": DOC, "filename": "visa.pdf"}}],
                },
                {"type": "body", "parameters": [{"type": "text", "text": "Dana"}, {"type": "text", "text": "Israel"}]},
                {"type": "button", "sub_type": "url", "index": "0", "parameters": [{"type": "text", "text": "A1B2C3"}]},
            ],
        },
    ),
    (
        "text header, named body",
        {"name": "documents_needed", "language": "en_US", "header": {"text": "Visa"}, "body": {"first_name": "Ana"}},
        {
            "name": "documents_needed",
            "language": {"code": "en_US"},
            "components": [
                {"type": "header", "parameters": [{"type": "text", "text": "Visa"}]},
                {"type": "body", "parameters": [{"type": "text", "parameter_name": "first_name", "text": "Ana"}]},
            ],
        },
    ),
    (
        "image header, quick replies out of order",
        {
            "name": "appointment",
            "language": "he",
            "header": {"image": {"url": "https://files.example.test/a.png"}},
            "buttons": [{"index": 1, "payload": "no"}, {"index": 0, "payload": "yes"}],
        },
        {
            "name": "appointment",
            "language": {"code": "he"},
            "components": [
                {
                    "type": "header",
                    "parameters": [{"type": "image", "image": {"link": "https://files.example.test/a.png"}}],
                },
                {
                    "type": "button",
                    "sub_type": "quick_reply",
                    "index": "0",
                    "parameters": [{"type": "payload", "payload": "yes"}],
                },
                {
                    "type": "button",
                    "sub_type": "quick_reply",
                    "index": "1",
                    "parameters": [{"type": "payload", "payload": "no"}],
                },
            ],
        },
    ),
    (
        "video header only",
        {"name": "welcome", "language": "en", "header": {"video": {"url": "https://files.example.test/w.mp4"}}},
        {
            "name": "welcome",
            "language": {"code": "en"},
            "components": [
                {
                    "type": "header",
                    "parameters": [{"type": "video", "video": {"link": "https://files.example.test/w.mp4"}}],
                }
            ],
        },
    ),
    (
        "no parameters: empty components left out",
        {"name": "hello_world", "language": "en_US", "body": []},
        {"name": "hello_world", "language": {"code": "en_US"}},
    ),
]


@pytest.mark.parametrize(("given", "sent"), [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
async def test_the_exact_send_content_request(
    harness: Harness, redis_client: Any, given: dict[str, Any], sent: dict[str, Any]
) -> None:
    await harness.known(A)
    [job] = await harness.enqueue({"to": A, "whatsappTemplate": given})
    await harness.run()
    result = await harness.outcome(job)
    assert (result["kind"], result["templateName"], result["language"]) == (
        "whatsapp_template",
        given["name"],
        given["language"],
    )
    assert result["possibleDuplicate"] is False
    [request] = harness.sim.state.requests  # one CGB call to a cached contact
    assert (request["method"], request["path"]) == ("POST", "/api/contacts/972500000001/send_content")
    assert request["body"] == expected(sent)
    [delivered] = harness.sim.state.outbox
    assert (delivered["kind"], delivered["status"]) == ("whatsapp_template", "delivered")  # window closed: still out
    assert await redis_client.hget(sends_key(job.job_id), "whatsapp_template") == b"sent"


async def test_a_template_is_never_sent_twice(harness: Harness) -> None:
    """One send step, with the text's unknown-outcome rules: a 502 after sending is not resent under ``fail``."""
    await harness.known(A)
    harness.set_env(CGB_UNKNOWN_OUTCOME="fail")
    harness.sim.state.faults.append(FaultRule(status=502, after=True, count=1, path="/send_content$"))
    [job] = await harness.enqueue({"to": A, "whatsappTemplate": {"name": "hello_world", "language": "en_US"}})
    await harness.run()
    assert type(await harness.outcome(job)) is E.SendOutcomeUnknownError
    assert len(harness.sim.requests("send_content")) == 1


TEMPLATE = {"name": "visa_approval_file_phone", "language": "he"}
REFUSED = [
    ("with a flow template", {"template": "visa_approved", "whatsappTemplate": TEMPLATE}, "cannot be combined"),
    ("with variables", {"variables": {"a": "b"}, "whatsappTemplate": TEMPLATE}, "cannot be combined"),
    (
        "with a file",
        {"fileUrl": DOC, "fileType": "document", "whatsappTemplate": TEMPLATE},
        "cannot be combined",
    ),
    ("an empty name", {"whatsappTemplate": {"name": " ", "language": "he"}}, "name"),
    ("an empty language", {"whatsappTemplate": {"name": "x", "language": ""}}, "language"),
    ("no language", {"whatsappTemplate": {"name": "x"}}, "language"),
    ("an unknown field", {"whatsappTemplate": {**TEMPLATE, "footer": "x"}}, "footer"),
    ("a header of no kind", {"whatsappTemplate": {**TEMPLATE, "header": {}}}, "exactly one"),
    (
        "a header of two kinds",
        {"whatsappTemplate": {**TEMPLATE, "header": {"text": "a", "image": {"url": DOC}}}},
        "exactly one",
    ),
    (
        "a header media url that is not http(s)",
        {"whatsappTemplate": {**TEMPLATE, "header": {"document": {"url": "file:///etc/passwd"}}}},
        "http",
    ),
    (
        "a filename on an image",
        {"whatsappTemplate": {**TEMPLATE, "header": {"image": {"url": DOC, "filename": "a.png"}}}},
        "filename",
    ),
    ("a body of numbers", {"whatsappTemplate": {**TEMPLATE, "body": [1, 2]}}, "body"),
    (
        "two buttons at one index",
        {"whatsappTemplate": {**TEMPLATE, "buttons": [{"index": 0, "url": "a"}, {"index": 0, "url": "b"}]}},
        "distinct",
    ),
    ("a button index past 9", {"whatsappTemplate": {**TEMPLATE, "buttons": [{"index": 10, "url": "a"}]}}, "0 to 9"),
    (
        "a button with a url and a payload",
        {"whatsappTemplate": {**TEMPLATE, "buttons": [{"index": 0, "url": "a", "payload": "b"}]}},
        "not both",
    ),
    ("a button with neither", {"whatsappTemplate": {**TEMPLATE, "buttons": [{"index": 0}]}}, "not both"),
]


@pytest.mark.parametrize(("fields", "why"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
async def test_refused_before_any_cgb_call(harness: Harness, fields: dict[str, Any], why: str) -> None:
    [job] = await harness.enqueue({"to": A, **fields})
    await harness.run()
    error = await harness.outcome(job)
    assert isinstance(error, E.InvalidJobError), error
    assert why in str(error)
    assert harness.sim.state.requests == []  # nothing reached CGB
