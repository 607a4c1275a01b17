"""Every Redis key cgb-worker writes, in one place (arq's own ``arq:*`` keys excepted).

Phones never appear in clear: a key or member that names a person carries :func:`who`, the phone's keyed hash
(the same name the contact cache uses).
"""

from __future__ import annotations

import hashlib
import hmac

from . import sealed

PREFIX = "cgb:"
"""Every key below starts with it (``cgb-worker forget`` walks them)."""

FORMAT = "cgb:format"
"""The data format the keys below are written in (:data:`cgb_worker.preflight.FORMAT_VERSION`): a process that
finds a newer one refuses to start (README, "Upgrading across a fleet")."""

# -- the worker -----------------------------------------------------------------------------------------------
RATE_NEXT = "cgb:ratelimit:next"
RATE_PENALTY = "cgb:ratelimit:penalty"
DEAD_INDEX = "cgb:dead:index"
DEAD_ENTRIES = "cgb:dead:entries"
DEAD_PAYLOADS = "cgb:dead:payloads"
DEAD_REPLAYING = "cgb:dead:replaying"
"""Dead letters whose replay is under way: the id each one's new job goes by (``dead_reserve.lua``)."""
WORKERS = "cgb:workers"
"""Every worker's heartbeat id, scored by when its heartbeat expires (ms): ``cgb-worker workers`` lists them."""


def worker(worker_id: str) -> str:
    """One worker's heartbeat (:mod:`cgb_worker.heartbeat`): refreshed every ``WORKER_HEALTH_CHECK_INTERVAL``,
    it expires three intervals after the last refresh, so a dead worker disappears on its own."""
    return f"cgb:worker:{worker_id}"


# -- delivery receipts: shared by the worker (which writes sends) and the receiver (which matches statuses) -----
AWAITING = "cgb:awaiting"
"""Sends still open to a status whose wamid is not known yet, one member each (:func:`awaiting_member`)."""
AWAITING_PLACED = "cgb:awaiting:placed"
"""For a step sent again after an unknown outcome: how many of its messages' wamids have been placed."""
TRACKING = "cgb:webhooks:tracking"
"""The receiver's lease: while it lives, workers record sends for matching and take per-recipient turns."""
SINCE = "cgb:webhooks:since"
DELIVERIES = "cgb:deliveries"
"""The stream of status changes producers read."""

# -- the receiver's own ---------------------------------------------------------------------------------------
INBOX = "cgb:webhooks:inbox"
INBOX_GROUP = "receivers"
MALFORMED = "cgb:webhooks:malformed"
"""Signed bodies and items the receiver could not use, redacted, with their reasons (capped, and a week at most)."""
ORPHANS = "cgb:webhooks:orphans"
"""Statuses held until they can be placed, scored by when each is next tried."""
ORPHANS_SINCE = "cgb:webhooks:orphans:since"
"""When each held status was first seen (ms)."""
UNMATCHED = "cgb:webhooks:unmatched"
"""Statuses placed on no message, redacted, with their reasons (capped, and a week at most)."""
REACTIONS = "cgb:reactions"
"""The outbox of what statuses call for (every failure, with its code), appended in the script that applies them."""
REACTIONS_GROUP = "reactors"


PHONE_KEY_MIN = 16
"""Characters a ``PHONE_HASH_KEY`` has at least."""

_phone_mac: hmac.HMAC | None = None


def use_phone_key(key: str) -> None:
    """Set the secret :func:`who` hashes under (``PHONE_HASH_KEY``), once at start-up. Keyed, so that the hash
    cannot be reversed by hashing every possible number; workers and receivers must share it."""
    global _phone_mac
    if len(key) < PHONE_KEY_MIN:
        raise ValueError(f"the phone hash key must have at least {PHONE_KEY_MIN} characters")
    _phone_mac = hmac.new(key.encode(), digestmod=hashlib.sha256)
    sealed.use_key(key)


def who(e164: str) -> str:
    """The name a phone goes by in Redis: HMAC-SHA256 under ``PHONE_HASH_KEY`` (128 bits in hex), never the
    number. Raises when no key was set: an unkeyed hash would be reversible, and would not match the others'."""
    if _phone_mac is None:
        raise RuntimeError("no phone hash key: PHONE_HASH_KEY was not wired (keys.use_phone_key) at start-up")
    mac = _phone_mac.copy()
    mac.update(("+" + e164.lstrip("+")).encode())
    return mac.hexdigest()[:32]


def contact(phone_hash: str) -> str:
    return f"cgb:contact:{phone_hash}"


def contact_lock(phone_hash: str) -> str:
    return f"cgb:lock:contact:{phone_hash}"


def fields_lock(phone_hash: str) -> str:
    return f"cgb:lock:fields:{phone_hash}"


def catalog(name: str) -> str:
    return f"cgb:catalog:{name}"


def sends(job_id: str) -> str:
    """A job's send log and delivery record (a replay writes its original's)."""
    return f"cgb:sends:{job_id}"


JOBS_ON_PREFIX = "cgb:jobs:day:"


def jobs_on(day: int) -> str:
    """The jobs tried on one day (UTC, ``day`` counted from the epoch), each once as the member
    ``<who>|<enqueued, ms, 13 digits>|<job id>``, every score 0: a person's jobs are one lexicographic range,
    oldest first, which the console reads backwards to find them by the keyed hash of the number typed in
    (:class:`cgb_worker.series.Recorder` writes it in batches). A day's key lives 8 days."""
    return f"{JOBS_ON_PREFIX}{day}"


def tries(job_id: str) -> str:
    """The job's tries that ended in a retry or a deferral, newest first (:mod:`cgb_worker.jobstate`; capped,
    kept as long as its last retry): what the console lists on the job's page."""
    return f"cgb:tries:{job_id}"


def series_minutes(hour: int) -> str:
    """One hour's counters by minute (:mod:`cgb_worker.series`): fields ``<minute, 2 digits>:<counter>``;
    ``hour`` counted from the epoch."""
    return f"cgb:series:m:{hour}"


def series_hour(hour: int) -> str:
    """One hour's counters in all (:mod:`cgb_worker.series`): fields ``<counter>``."""
    return f"cgb:series:h:{hour}"


def throttled(job_id: str) -> str:
    return f"cgb:throttled:{job_id}"


RATE_WAITING = "cgb:rate:waiting"
"""Sorted set: the jobs our rate limit deferred, scored by when they first fell due (ms), for the queue's age gauge:
such a job is a backlog, but arq holds it as deferred (queue_stats.lua drops the ones that left the queue)."""


def last_retry(job_id: str) -> str:
    """The job's last retry or deferral as the job decided it (:mod:`cgb_worker.jobstate`): error class, HTTP
    status and CGB code, never a phone or a text."""
    return f"cgb:retry:last:{job_id}"


def replayed_as(job_id: str) -> str:
    """The id a dead-letter replay gave this job's payload (``cgb-worker dead-letters replay``)."""
    return f"cgb:replay:as:{job_id}"


def replay_of(job_id: str) -> str:
    """The dead-lettered job this one replays: :func:`replayed_as` the other way."""
    return f"cgb:replay:of:{job_id}"


def turn(phone_hash: str) -> str:
    """Whose turn it is to send to this person (:mod:`cgb_worker.turns`)."""
    return f"cgb:turn:{phone_hash}"


def window(phone_hash: str) -> str:
    return f"cgb:window:{phone_hash}"


def suppressed(phone_hash: str) -> str:
    """The person's opt-outs, by category (:mod:`cgb_worker.suppression`)."""
    return f"cgb:suppressed:{phone_hash}"


SUPPRESSED_INDEX = "cgb:suppressed:index"
"""Every suppressed person's hash, for ``suppress list``."""


def undeliverable(phone_hash: str) -> str:
    """Set for ``UNDELIVERABLE_TTL`` after WhatsApp failed a message to this person with 131026."""
    return f"cgb:undeliverable:{phone_hash}"


def bsuid(user_id: str) -> str:
    """The phone hash (:func:`who`) a business-scoped user id was last seen with, never the phone."""
    return f"cgb:bsuid:{user_id}"


WAMID_PREFIX = "cgb:wamid:"


def wamid(value: str) -> str:
    """Which step a placed wamid was. The key carries the wamid's keyed hash, not the wamid: Meta's wamids
    are base64 of the recipient's phone, and a key name is what ``KEYS`` or ``MONITOR`` shows anyone."""
    if _phone_mac is None:
        raise RuntimeError("no phone hash key: PHONE_HASH_KEY was not wired (keys.use_phone_key) at start-up")
    mac = _phone_mac.copy()
    mac.update(b"wamid\0" + value.encode())
    return WAMID_PREFIX + mac.hexdigest()[:32]


def wamid_sent_at(value: str) -> str:
    """When a ``sent`` or ``failed`` of this wamid that could not be placed was stamped: its later statuses are
    judged by that time."""
    return wamid(value) + ":at"


def consumer(name: str) -> str:
    """A receiver's heartbeat: while it lives, no other receiver takes the inbox entries it has in hand."""
    return f"cgb:webhooks:consumer:{name}"


# -- the operations console ----------------------------------------------------------------------------------


def console_signed_out(session_ref: str) -> str:
    """A console session signed out before it expired, named by a keyed digest of its nonce (never the
    nonce): the session's cookie is refused by every console process while the key lives, as long as the
    cookie would have (at most ``SESSION_TTL``, 12 hours)."""
    return f"cgb:console:signed-out:{session_ref}"
