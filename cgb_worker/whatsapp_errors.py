"""WhatsApp's error codes on a ``failed`` status, and what the product does about each: the one table.

A ``failed`` status reaches us after CGB said success; the receiver applies it and, in the same atomic step,
appends a reaction to the outbox (:mod:`cgb_worker.receipts.reactions`), which looks the code up here. The README
shows this table. ``retriable`` says whether sending the same message again can succeed; ``action`` is what the
receiver does, once per failed message:

* ``fallback``: the job's ``whatsappTemplate`` is sent instead of its text (131047, outside the 24-hour window);
* ``resend``: the same step is sent again after a backoff (``WA_RESEND_DELAY``, multiplied by
  ``WA_RESEND_FACTOR`` each time, at most ``WA_RESEND_MAX`` times);
* ``throttle``: every worker's CGB rate limit pauses and halves, as for CGB's own 429, then ``resend``;
* ``marketing_cap``: sent once more after ``MARKETING_CAP_RETRY_AFTER`` when it is set, never at once;
* ``suppress``: the number is suppressed for ``marketing`` (:mod:`cgb_worker.suppression`);
* ``undeliverable``: the number is marked undeliverable for ``UNDELIVERABLE_TTL``; jobs to it fail at once;
* ``fail``: nothing more; the message stays ``failed`` with the code's meaning.

Every code is counted in ``cgb_whatsapp_errors_total{code}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["fallback", "resend", "throttle", "marketing_cap", "suppress", "undeliverable", "fail"]


@dataclass(frozen=True, slots=True)
class ErrorRule:
    code: int
    meaning: str
    retriable: bool
    action: Action


_RULES = (
    ErrorRule(131047, "more than 24 hours since the person last wrote: a template is needed", False, "fallback"),
    ErrorRule(131056, "too many messages to this person too fast (pair rate limit)", True, "resend"),
    ErrorRule(130429, "the business number's throughput limit was reached", True, "throttle"),
    ErrorRule(131057, "the business account is in maintenance mode", True, "throttle"),
    ErrorRule(131049, "held back by the per-person marketing limit: do not retry at once", True, "marketing_cap"),
    ErrorRule(131050, "the person stopped marketing messages", False, "suppress"),
    ErrorRule(131026, "undeliverable: not on WhatsApp, terms not accepted, or an old app", False, "undeliverable"),
    ErrorRule(132000, "the template's parameter count does not match the approved template", False, "fail"),
    ErrorRule(132001, "the template does not exist in that language, or is not approved", False, "fail"),
    ErrorRule(132018, "a template parameter has a newline, a tab or more than four spaces in a row", False, "fail"),
    ErrorRule(131042, "a payment problem on the business account", False, "fail"),
    ErrorRule(131008, "a required parameter is missing", False, "fail"),
    ErrorRule(130472, "the person is in a Meta experiment group", False, "fail"),
    ErrorRule(131051, "an unsupported message type", False, "fail"),
    ErrorRule(131052, "the media could not be downloaded from the person's message", False, "fail"),
    ErrorRule(131053, "the media could not be uploaded", False, "fail"),
)
RULES: dict[int, ErrorRule] = {rule.code: rule for rule in _RULES}
MAX_LABELS = 64
"""Distinct ``code`` labels of ``cgb_whatsapp_errors_total`` at most; codes beyond it count as ``other``."""


def rule_for(code: int) -> ErrorRule:
    """The code's rule; a code the table does not list is a final ``failed``."""
    return RULES.get(code) or ErrorRule(code, "an error this version does not know", False, "fail")


def resend_delay(n: int, *, first: float, factor: float) -> float:
    """Seconds before the ``n``-th automatic resend (1-based): ``first``, then multiplied by ``factor`` each time."""
    return first * factor ** (n - 1)


def base_step(step: str) -> str:
    """The step a resend sends again: ``text~2`` is ``text``."""
    return step.partition("~")[0]


def chain(step: str) -> list[str]:
    """The step and every earlier send of it: ``text~2`` is ``text``, ``text~1``, ``text~2``."""
    base = base_step(step)
    return [base, *(f"{base}~{k}" for k in range(1, resends(step) + 1))]


def resends(step: str) -> int:
    """How many automatic resends came before this step: ``text`` 0, ``text~2`` 2."""
    _base, _, n = step.partition("~")
    return int(n) if n.isdigit() else 0


def next_step(step: str) -> str:
    """The name the next automatic resend of ``step`` goes by in the job's record."""
    return f"{base_step(step)}~{resends(step) + 1}"
