"""The cgb-worker CLI, run as a subprocess against a real Redis and the simulator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cgb_worker.deadletters import DeadLetters
from cgb_worker.simulator import FaultRule

from .conftest import TOKEN, Harness, communicate, free_port

CLI = str(Path(sys.executable).parent / "cgb-worker")


async def cli(harness: Harness, *args: str, env: dict[str, str | None] | None = None) -> tuple[int, str, str]:
    """Run the CLI without blocking the event loop (the simulator is served from it)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
    full.update(harness.env)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, env=full, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await communicate(proc, 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["check"],
        ["flows"],
        ["send"],
        ["dead-letters"],
        ["dead-letters", "list"],
        ["dead-letters", "show"],
        ["dead-letters", "replay"],
        ["dead-letters", "purge"],
        ["dead-letters", "delete"],
        ["simulator"],
        ["webhooks"],
        ["status"],
        ["forget"],
        ["suppress"],
        ["suppress", "add"],
        ["suppress", "remove"],
        ["suppress", "list"],
    ],
)
async def test_help(harness: Harness, args: list[str]) -> None:
    code, out, _ = await cli(harness, *args, "--help")
    assert code == 0
    assert "Usage: cgb-worker" in out


async def test_check_ok(harness: Harness) -> None:
    code, out, err = await cli(harness, "check")
    assert (code, err) == (0, "")
    assert "configuration  ok" in out
    assert "redis          ok (redis://127.0.0.1:" in out
    assert "cgb            ok" in out
    assert "account 'cgb-worker simulator', page 1000001" in out
    assert "template       visa_approved -> 1752250957765 ok (flow 'visa_approved')" in out
    assert TOKEN not in out


async def test_check_reports_a_missing_flow(harness: Harness) -> None:
    code, out, err = await cli(harness, "check", env={"CGB_TEMPLATE_VISA_DENIED": "999"})
    assert code == 1
    assert "template       visa_denied -> 999 MISSING: the account has no such flow" in out
    assert err == "cgb-worker: check failed: template visa_denied: no flow 999\n"


async def test_check_reports_every_configuration_problem(harness: Harness) -> None:
    code, out, err = await cli(
        harness, "check", env={"CGB_API_KEY": None, "CGB_TIMEOUT": "x", "CGB_RETRY_ATTEMPTS": "-1"}
    )
    assert code == 2
    assert out == ""
    assert "invalid configuration" in err
    for name in ("CGB_API_KEY", "CGB_TIMEOUT", "CGB_RETRY_ATTEMPTS"):
        assert f"  - {name}" in err


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"CGB_API_KEY": "1000001.WrongWrongWrongWrongWrongWrong"}, "cgb            FAILED: CGBAuthError"),
        (
            {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_CONNECT_TIMEOUT": "0"},
            "redis          FAILED: Redis at redis://127.0.0.1:",
        ),
    ],
    ids=["wrong-key", "redis-down"],
)
async def test_check_fails_on_an_unreachable_dependency(harness: Harness, env: dict[str, str], line: str) -> None:
    code, out, _ = await cli(harness, "check", env=env)  # type: ignore[arg-type]
    assert code == 1
    assert line in out
    assert "1000001.Wrong" not in out


async def test_flows(harness: Harness) -> None:
    code, out, _ = await cli(harness, "flows", env={"CGB_TEMPLATE_GONE": "42"})
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["flow", "id", "name", "templates"]
    assert any(line.startswith("1752250957765") and "visa_approved, visa_approved (by name)" in line for line in lines)
    assert any(line.startswith("1752250957766") and "documents_needed (by name)" in line for line in lines)
    assert any(line.startswith("42") and "(no such flow)" in line and "gone" in line for line in lines)


async def test_send_enqueues_and_the_worker_sends(harness: Harness) -> None:
    code, out, _ = await cli(
        harness,
        "send",
        "--to",
        "+972500000001",
        "--template",
        "visa_approved",
        "--var",
        "first_name=Dana",
        "--var",
        "visa_type=work",
    )
    assert code == 0
    assert out.startswith("enqueued ")
    await harness.run()
    assert [m["text"] for m in harness.sim.state.outbox] == ["Hello Dana, your work visa is approved."]


async def _run_worker_when_queued(harness: Harness, redis_client: Any) -> None:
    deadline = time.monotonic() + 20
    while not await redis_client.zcard("arq:queue"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await harness.run()


async def test_send_wait_prints_the_result(harness: Harness, redis_client: Any) -> None:
    task = asyncio.ensure_future(cli(harness, "send", "--to", "+1 202 555 0100", "--message", "hi", "--wait"))
    await _run_worker_when_queued(harness, redis_client)
    code, out, _ = await task
    assert code == 0
    result = json.loads(out.split("\n", 1)[1])
    assert (result["success"], result["to"], result["kind"]) == (True, "+12025550100", "text")


async def test_send_takes_a_category_and_an_expiry(harness: Harness, redis_client: Any) -> None:
    args = ["send", "--to", "+1 202 555 0100", "--message", "Sale!", "--category", "marketing", "--wait"]
    task = asyncio.ensure_future(cli(harness, *args, "--expires-at", "2099-01-01T00:00:00Z"))
    await _run_worker_when_queued(harness, redis_client)
    code, out, _ = await task
    assert (code, json.loads(out.split("\n", 1)[1])["category"]) == (0, "marketing")
    task = asyncio.ensure_future(cli(harness, *args, "--expires-at", "2020-01-01T00:00:00+02:00"))
    await _run_worker_when_queued(harness, redis_client)
    code, out, err = await task
    assert code == 1
    assert err.startswith("cgb-worker: ExpiredError: the job expired at 2019-12-31T22:00:00Z")
    assert [m["text"] for m in harness.sim.state.outbox] == ["Sale!"]


async def test_send_wait_reports_the_error(harness: Harness, redis_client: Any) -> None:
    task = asyncio.ensure_future(cli(harness, "send", "--to", "+972 50 000 0001", "--template", "no_such", "--wait"))
    await _run_worker_when_queued(harness, redis_client)
    code, out, err = await task
    assert code == 1
    assert out.startswith("enqueued ")
    assert err.startswith("cgb-worker: TemplateNotFoundError: ")


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--to", "+972 12", "--message", "hi"], "InvalidPhoneError: phone is too short"),
        (["--to", "+12025550100"], "InvalidJobError: no content"),
        (["--to", "+12025550100", "--file-url", "https://files.example.test/v.pdf"], "fileUrl needs a fileType"),
        (["--to", "+12025550100", "--message", "hi", "--expires-at", "tomorrow"], "expiresAt is not an ISO 8601"),
        (["--to", "050-000-0001", "--message", "hi"], "InvalidPhoneError"),
    ],
)
async def test_send_refuses_locally_what_the_worker_would(
    harness: Harness, redis_client: Any, args: list[str], why: str
) -> None:
    code, out, err = await cli(harness, "send", *args)
    assert (code, out) == (2, "")
    assert err.startswith("cgb-worker: ")
    assert why in err
    assert err.endswith(" (nothing enqueued)\n")
    assert await redis_client.zcard("arq:queue") == 0


async def test_send_reads_the_default_region_as_the_worker_does(harness: Harness, redis_client: Any) -> None:
    code, out, _ = await cli(
        harness, "send", "--to", "050-000-0001", "--message", "hi", env={"CGB_DEFAULT_REGION": "IL"}
    )
    assert (code, out.startswith("enqueued ")) == (0, True)
    assert await redis_client.zcard("arq:queue") == 1


async def test_send_usage_errors(harness: Harness) -> None:
    code, _, err = await cli(harness, "send", "--to", "+972500000001", "--var", "novalue")
    assert code == 2
    assert "'novalue' is not key=value" in err
    code, _, err = await cli(harness, "send", "--message", "hi")
    assert code == 2
    assert "Missing option '--to'" in err


async def test_send_refuses_a_duplicate_job_id(harness: Harness) -> None:
    first = await cli(harness, "send", "--to", "+972500000001", "--message", "hi", "--job-id", "visa-123")
    second = await cli(harness, "send", "--to", "+972500000001", "--message", "hi", "--job-id", "visa-123")
    assert first[0] == 0
    assert second[0] == 1
    assert second[2] == "cgb-worker: a job with id 'visa-123' already exists\n"


async def test_dead_letters_list_show_replay_purge(harness: Harness, redis_client: Any) -> None:
    harness.sim.state.faults.append(FaultRule(status=401, path="/send/text$", count=2))
    jobs = await harness.enqueue({"to": "+972500000001", "message": "one"}, {"to": "+12025550100", "message": "two"})
    await harness.run()
    code, out, _ = await cli(harness, "dead-letters", "list")
    assert code == 0
    assert out.splitlines()[0] == "2 dead letter(s)"
    assert "+972*******01" in out
    assert "CGBAuthError: HTTP 401 on send_text: Injected 401" in out
    assert "972500000001" not in out

    code, out, _ = await cli(harness, "dead-letters", "show", jobs[0].job_id)
    shown = json.loads(out)
    assert (shown["job_id"], shown["payload"]["to"], shown["attempts"]) == (jobs[0].job_id, "+972*******01", 1)

    code, _, err = await cli(harness, "dead-letters", "show", "nope")
    assert (code, err) == (1, "cgb-worker: no dead letter 'nope'\n")

    code, out, _ = await cli(harness, "dead-letters", "replay", jobs[0].job_id)
    assert code == 0
    assert f"replayed {jobs[0].job_id} as " in out
    code, _, err = await cli(harness, "dead-letters", "replay")
    assert (code, err) == (2, "cgb-worker: give one JOB_ID or --all\n")
    code, out, _ = await cli(harness, "dead-letters", "replay", "--all")
    assert code == 0
    assert "0 job(s) enqueued again\n1 skipped: their error is permanent" in out  # a 401
    code, out, _ = await cli(harness, "dead-letters", "replay", "--all", "--include-permanent")
    assert code == 0
    assert "1 job(s) enqueued again" in out
    await harness.run()
    assert sorted(m["text"] for m in harness.sim.state.outbox) == ["one", "two"]

    await DeadLetters(redis_client).add(
        job_id="x",
        function="whatsapp_send",
        payload={"to": "+972500000009"},
        error=ValueError("v"),
        attempts=1,
        enqueued_at=None,
    )
    code, _, err = await cli(harness, "dead-letters", "purge")
    assert code == 1  # no --yes and no terminal to say yes
    assert err.endswith("cgb-worker: aborted: no answer (stdin closed); nothing done\n")
    code, out, _ = await cli(harness, "dead-letters", "purge", "--yes")
    assert (code, out) == (0, "purged 1 dead letter(s)\n")


async def test_redis_unreachable_is_one_line(harness: Harness) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = await cli(harness, "dead-letters", "list", env={"REDIS_URL": url, "REDIS_CONNECT_TIMEOUT": "0"})
    assert code == 1
    assert err.startswith(f"cgb-worker: Redis at {url} unreachable: connection refused")
    assert len(err.strip().splitlines()) == 1


async def test_simulator_command(harness: Harness) -> None:
    import aiohttp

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "simulator",
        "--port",
        str(port),
        "--token",
        "t0k",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(
                        f"http://127.0.0.1:{port}/api/accounts/me", headers={"X-ACCESS-TOKEN": "t0k"}
                    ) as r:
                        assert r.status == 200
                        assert (await r.json())["page_id"] == 1000001
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
    finally:
        proc.terminate()
        await proc.wait()


async def test_check_takes_the_account_created_as_a_date_string(harness: Harness) -> None:
    """Symptom 10: ``created`` as a date string ended ``cgb-worker check`` in a msgspec traceback."""
    harness.sim.configure(account_created="string")
    code, out, err = await cli(harness, "check")
    assert code == 0, out + err
    assert "cgb            ok" in out
    assert "Traceback" not in err


async def test_a_damaged_dead_letter_is_listed_as_such(harness: Harness, redis_client: Any) -> None:
    from cgb_worker.deadletters import ENTRIES, INDEX

    await redis_client.zadd(INDEX, {"broken": 1})
    await redis_client.hset(ENTRIES, "broken", b"\xc1 not msgpack")  # another version's, or a corrupted entry
    code, out, err = await cli(harness, "dead-letters", "list")
    assert code == 0, err
    assert "broken" in out
    assert "UnreadableEntry" in out


async def test_an_unexpected_error_is_one_line_not_a_traceback(harness: Harness, redis_client: Any) -> None:
    from cgb_worker.deadletters import ENTRIES, INDEX

    await redis_client.zadd(INDEX, {"broken": 1})
    await redis_client.set(ENTRIES, b"not a hash")  # the store itself damaged (a bad entry is only listed as such)
    code, _out, err = await cli(harness, "dead-letters", "list")
    assert code == 1
    assert err.startswith("cgb-worker: ")
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


async def test_send_a_native_template_with_a_document_header(harness: Harness) -> None:
    await harness.known("+972500000001")
    code, out, err = await cli(
        harness,
        "send",
        "--to",
        "+972500000001",
        "--wa-template",
        "visa_approval_file_phone",
        "--lang",
        "he",
        "--param",
        "Dana",
        "--param",
        "Israel",
        "--header-document",
        "https://files.example.test/v.pdf",
        "--header-filename",
        "visa.pdf",
        "--button-url",
        "0=A1B2C3",
    )
    assert code == 0, err
    assert out.startswith("enqueued ")
    await harness.run()
    [request] = harness.sim.requests("send_content")
    template = request["body"]["messages"][0]["template"]
    assert template["name"] == "visa_approval_file_phone"
    assert template["language"] == {"code": "he"}
    assert [c["type"] for c in template["components"]] == ["header", "body", "button"]
    assert template["components"][0]["parameters"][0]["document"] == {
        "link": "https://files.example.test/v.pdf",
        "filename": "visa.pdf",
    }
    assert [p["text"] for p in template["components"][1]["parameters"]] == ["Dana", "Israel"]


async def test_send_a_native_template_needs_its_language(harness: Harness) -> None:
    code, _, err = await cli(harness, "send", "--to", "+972500000001", "--wa-template", "x")
    assert code == 2
    assert "--lang" in err


async def test_webhooks_refuses_to_start_without_the_app_secret(harness: Harness) -> None:
    code, _, err = await cli(
        harness, "webhooks", env={"WABA_APP_SECRET": None, "WEBHOOK_PORT": "99999", "CGB_API_KEY": None}
    )
    assert code == 2
    assert "WABA_APP_SECRET: Environment variable not set." in err
    assert "WEBHOOK_PORT:" in err  # every problem at once


async def test_webhooks_serves_and_stores_a_signed_post(harness: Harness, redis_client: Any) -> None:
    """The receiver as operators run it: a subprocess, configured by the environment alone (no CGB key)."""
    import hashlib
    import hmac

    import aiohttp

    from cgb_worker.keys import INBOX

    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CGB_", "WORKER_", "LOG_", "REDIS_"))}
    env.update(
        REDIS_URL=harness.redis_url,
        WABA_APP_SECRET="s3cret-for-tests",
        PHONE_HASH_KEY=harness.env["PHONE_HASH_KEY"],
        WEBHOOK_PORT=str(port),
        WEBHOOK_ADMIN_PORT=str(admin),
    )
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "webhooks",
        "--host",
        "127.0.0.1",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    body = b'{"object": "whatsapp_business_account", "entry": []}'
    sig = "sha256=" + hmac.new(b"s3cret-for-tests", body, hashlib.sha256).hexdigest()
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{admin}/healthz") as r:
                        assert (r.status, (await r.json())["status"]) == (200, "ok")
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            url = f"http://127.0.0.1:{port}/webhooks/whatsapp"
            async with http.post(url, data=body, headers={"X-Hub-Signature-256": sig}) as r:
                assert r.status == 200
            async with http.post(url, data=body) as r:
                assert r.status == 401
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
            for path in ("/metrics", "/healthz"):  # never on the public port
                async with http.get(f"http://127.0.0.1:{port}{path}") as r:
                    assert r.status == 404
            assert 'cgb_webhook_requests_total{outcome="bad_signature"} 1.0' in text
        assert await redis_client.exists(INBOX)
    finally:
        proc.terminate()
        _, err = await proc.communicate()
    assert proc.returncode == 0
    assert b"webhook receiver stopped" in err


async def test_status_prints_a_delivery_and_fails_without_one(harness: Harness, redis_client: Any) -> None:
    await harness.known("+972500000001")
    [job] = await harness.enqueue({"to": "+972500000001", "message": "hello"})
    await harness.run()
    code, out, _ = await cli(harness, "status", job.job_id)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{job.job_id}: succeeded (try 1, finished ")
    assert out.splitlines()[1] == "delivery: accepted (service)"
    assert out.splitlines()[2] == "  text: accepted"
    code, out, _ = await cli(harness, "status", job.job_id, "--json")
    data = json.loads(out)
    assert (data["jobId"], data["state"]) == (job.job_id, "succeeded")
    d = data["delivery"]
    assert (d["jobId"], d["status"], [s["step"] for s in d["steps"]]) == (job.job_id, "accepted", ["text"])
    code, out, err = await cli(harness, "status", "no-such-job")
    assert (code, err) == (3, "")
    assert out.startswith("no-such-job: unknown: ")


async def test_status_says_how_many_messages_a_step_had_and_what_stayed_unresolved(
    harness: Harness, redis_client: Any
) -> None:
    record = {"status": "read", "at": 1764650000000, "wamid": "wamid.A", "more": ["wamid.B"], "match": "recipient"}
    await redis_client.hset("cgb:sends:visa-7", mapping={"d:flow": json.dumps(record), "flow": "sent", "u:flow": "2"})
    code, out, _ = await cli(harness, "status", "visa-7")
    assert code == 0
    assert out.splitlines()[2] == (
        "  flow: read, matched by recipient, 2 WhatsApp messages, 2 status(es) that could not be told from another"
        " send's"
    )
    code, out, _ = await cli(harness, "status", "visa-7", "--json")
    [step] = json.loads(out)["delivery"]["steps"]
    assert (step["wamids"], step["unresolved"]) == (["wamid.A", "wamid.B"], 2)


async def test_status_shows_an_automatic_resend(harness: Harness, redis_client: Any) -> None:
    failed = {"status": "failed", "at": 1764650000000, "error": {"code": 131056, "title": "pair rate limit"},
              "category": "utility"}  # fmt: skip
    again = {
        "status": "delivered",
        "at": 1764650006000,
        "resendOf": "text",
        "resendCode": 131056,
        "category": "utility",
    }
    await redis_client.hset(
        "cgb:sends:visa-8",
        mapping={"d:text": json.dumps(failed), "d:text~1": json.dumps(again), "text": "sent", "a:text~1": "1"},
    )
    code, out, _ = await cli(harness, "status", "visa-8")
    assert code == 0
    assert out.splitlines()[1] == "delivery: delivered (utility)"
    assert [line for line in out.splitlines() if not line.startswith("    ")][2:] == [
        "  text: failed",
        "  text~1: delivered, sent again after the text failed with 131056",
    ]
    await redis_client.hset("cgb:sends:visa-8", "r:text~1", "text~2")  # text~1 failed too, its resend is queued
    await redis_client.hset("cgb:sends:visa-8", "d:text~1", json.dumps({**again, "status": "failed"}))
    code, out, _ = await cli(harness, "status", "visa-8")
    assert code == 0  # not final yet: it is being sent again
    assert out.splitlines()[1] == "delivery: failed (utility), sent again soon"
    assert "  text~1: failed, sent again after the text failed with 131056, to be sent again as text~2" in out


# -- suppress ---------------------------------------------------------------------------------------------------


async def test_suppress_add_list_and_remove(harness: Harness, redis_client: Any) -> None:
    from cgb_worker import keys

    who = keys.who("+972500000001")
    code, out, err = await cli(harness, "suppress", "add", "+972 50-000-0001", "--category", "marketing")
    assert (code, err) == (0, "")
    assert out.startswith("+972*******01 suppressed: marketing since ")
    assert out.endswith(" (operator)\n")
    stored = json.loads(await redis_client.get(keys.suppressed(who)))
    assert list(stored) == ["marketing"]
    assert stored["marketing"]["reason"] == "operator"
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {who.encode()}

    code, out, _ = await cli(harness, "suppress", "add", "050-000-0001", "--region", "il")
    assert code == 0
    assert "+972*******01 suppressed: all since " in out
    code, out, _ = await cli(harness, "suppress", "add", "+972500000001")
    assert (code, out.split(":")[0]) == (0, "+972*******01 already suppressed")
    await cli(harness, "suppress", "add", "+12025550100")

    code, out, err = await cli(harness, "suppress", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "2 suppressed number(s)"
    assert sorted(line.split()[:2] for line in lines[1:]) == sorted(
        [[who[:12], "all"], [who[:12], "marketing"], [keys.who("+12025550100")[:12], "all"]]
    )
    assert "972500000001" not in out  # hashes only
    assert "2025550100" not in out
    code, out, _ = await cli(harness, "suppress", "list", "+972500000001")
    assert code == 0
    assert out.startswith(f"+972*******01 (hash {who[:12]}): all since ")
    assert "(operator); marketing since " in out

    code, out, err = await cli(harness, "suppress", "remove", "+972500000001")
    assert (code, out, err) == (0, "+972*******01 no longer suppressed (2 scope(s) lifted)\n", "")
    assert await redis_client.smembers(keys.SUPPRESSED_INDEX) == {keys.who("+12025550100").encode()}
    assert "all" not in json.loads(await redis_client.get(keys.suppressed(who)))
    code, out, err = await cli(harness, "suppress", "remove", "+972500000001")
    assert (code, err) == (1, "cgb-worker: +972*******01 was not suppressed: nothing removed\n")
    code, out, _ = await cli(harness, "suppress", "list", "+972500000001")
    assert (code, out) == (0, f"+972*******01 (hash {who[:12]}): not suppressed\n")


@pytest.mark.parametrize(
    "args",
    [["suppress", "add", "12345"], ["suppress", "remove", "050-000-0001"], ["suppress", "list", "not a phone"]],
)
async def test_suppress_refuses_what_is_no_phone(harness: Harness, redis_client: Any, args: list[str]) -> None:
    code, out, err = await cli(harness, *args)
    assert (code, out) == (2, "")
    assert err.startswith("cgb-worker: ")
    assert await redis_client.keys("cgb:suppressed*") == []


async def test_suppress_add_refuses_an_unknown_category(harness: Harness, redis_client: Any) -> None:
    code, _out, err = await cli(harness, "suppress", "add", "+972500000001", "--category", "utility")
    assert code == 2
    assert "'utility' is not one of 'all', 'marketing'" in err
    assert await redis_client.keys("cgb:suppressed*") == []


async def test_suppress_needs_the_phone_hash_key(harness: Harness) -> None:
    code, _out, err = await cli(harness, "suppress", "add", "+972500000001", env={"PHONE_HASH_KEY": None})
    assert code == 2
    assert "PHONE_HASH_KEY: required" in err


@pytest.mark.parametrize("flag", ["--version", "-V"])
async def test_version(harness: Harness, flag: str) -> None:
    import cgb_worker

    code, out, err = await cli(harness, flag, env={"CGB_API_KEY": None, "PHONE_HASH_KEY": None})
    assert (code, out, err) == (0, f"cgb-worker {cgb_worker.__version__}\n", "")


def test_the_simulator_command_takes_every_option_of_the_module() -> None:
    import argparse
    from unittest import mock

    from cgb_worker.cli import simulator
    from cgb_worker.simulator import main as module_main

    seen: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        seen.append(self)  # the module's parser, as built: stop before it serves
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        module_main([])
    module = {opt for action in seen[0]._actions for opt in action.option_strings if opt.startswith("--")}
    command = {opt for p in simulator.params for opt in p.opts if opt.startswith("--")}
    assert module - {"--help"} == command


async def test_the_simulator_command_passes_its_options_on(harness: Harness, tmp_path: Any) -> None:
    from .conftest import free_port

    catalog = tmp_path / "templates.toml"
    catalog.write_text('[[template]]\nname = "x"\nlanguages = ["en"]\n')
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        CLI, "simulator", "--port", str(port), "--seed", "7", "--no-request-log", "--wa-templates", str(catalog),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/_sim/config") as resp:
                        config = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        assert (config["wa_templates_file"], config["record_requests"]) == (str(catalog), False)
    finally:
        proc.terminate()
        await proc.wait()
