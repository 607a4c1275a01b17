"""Who may see the console, and proof that an action came from its own pages.

- With ``CONSOLE_TOKEN``: no page and no action without it, on any address. A browser signs in once through a
  form and gets a session cookie (signed, HttpOnly, SameSite=Strict, 12 hours); a script sends
  ``Authorization: Bearer <token>`` on every request.
- Without it the console listens on loopback only (:func:`cgb_worker.settings.console_bind_problem`), and a
  request must name a loopback host in ``Host``: a page elsewhere that rebinds its own name to 127.0.0.1 cannot
  read it.
- Every action is a POST carrying the CSRF token of the browser's session (a form field, or ``X-CSRF-Token``).
  A bearer request needs none: a browser never adds that header by itself, so a foreign page cannot forge one.

Every secret is derived from the token (the cookie's signing key), or made at start when there is none;
sessions end when the token changes. Signing out ends the session for good, not only in that browser: the
cookie is stateless, so a copy of it would otherwise open the console until it expires, and the session is
recorded in Redis as signed out (:func:`cgb_worker.keys.console_signed_out`, one small key that lives as long
as the cookie would have), which every console process checks on each request a signed-in cookie makes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import secrets
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote

from aiohttp import web
from redis.asyncio import Redis

from .. import keys
from ..settings import Secret, is_loopback

COOKIE = "cgb_console"
SESSION_TTL = 12 * 3600.0
"""Seconds a signed-in browser stays signed in."""
LOGOUT_PATH = "/logout"
"""Where a browser signs out (a POST with its CSRF token): its session is recorded as signed out first."""
PUBLIC_PATHS = frozenset({"/login", "/static/console.css"})
"""Served to anyone who may reach the console: the sign-in form and its style."""
FAILED_SIGN_IN_DELAY = 1.0
"""Seconds a wrong token waits for its answer: guessing is slow, and a right one is not held up."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Session:
    """A browser's session: ``nonce`` ties its CSRF token to it; ``signed_in`` once the token was given."""

    nonce: str
    issued: int
    signed_in: bool


SESSION = web.RequestKey("session", Session)
CSRF = web.RequestKey("csrf", str)


class ConsoleAuth:
    """Sessions, CSRF tokens and the token check; :meth:`middleware` applies them to every request."""

    def __init__(self, token: Secret | None, redis: Redis) -> None:
        self.token = token
        self.redis = redis
        seed = token.get_secret_value().encode() if token is not None else secrets.token_bytes(32)
        self._key = hmac.new(seed, b"cgb-worker console session v1", hashlib.sha256).digest()

    # -- sessions and CSRF ------------------------------------------------------------------------------------

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def new_session(self, *, signed_in: bool) -> Session:
        return Session(nonce=secrets.token_hex(16), issued=int(time.time()), signed_in=signed_in)

    def seal(self, session: Session) -> str:
        body = f"{session.issued}.{session.nonce}.{int(session.signed_in)}"
        return body + "." + self._mac("session\0" + body)

    def open(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None when it is missing, forged, malformed or too old."""
        if not cookie or len(cookie) > 256:
            return None
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        issued, nonce, signed_in, mac = parts
        body = f"{issued}.{nonce}.{signed_in}"
        if not hmac.compare_digest(mac, self._mac("session\0" + body)):
            return None
        if not issued.isdigit() or signed_in not in ("0", "1"):
            return None
        if (time.time() if now is None else now) - int(issued) > SESSION_TTL:
            return None
        return Session(nonce=nonce, issued=int(issued), signed_in=signed_in == "1")

    def _signed_out_key(self, session: Session) -> str:
        return keys.console_signed_out(self._mac("signed out\0" + session.nonce)[:32])

    async def sign_out(self, session: Session) -> None:
        """Refuse ``session`` from now on, in every console process, for as long as its cookie would last."""
        left = math.ceil(session.issued + SESSION_TTL - time.time())
        if left > 0:
            await self.redis.set(self._signed_out_key(session), b"1", ex=min(left, int(SESSION_TTL)))

    async def signed_out(self, session: Session) -> bool:
        return bool(await self.redis.exists(self._signed_out_key(session)))

    def csrf(self, session: Session) -> str:
        return self._mac("csrf\0" + session.nonce)[:40]

    def token_is(self, given: str) -> bool:
        if self.token is None:
            return False
        return hmac.compare_digest(given.encode(), self.token.get_secret_value().encode())

    def bearer(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_is(value.strip())

    def set_cookie(self, request: web.Request, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.seal(session),
            max_age=int(SESSION_TTL),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )

    # -- the gate -----------------------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token is None and not is_loopback(_host_name(request.host)):
            # DNS rebinding: an open console answers only to its own loopback names
            raise web.HTTPMisdirectedRequest(text="this console answers to 127.0.0.1 and localhost only\n")
        by_bearer = self.bearer(request)
        session = self.open(request.cookies.get(COOKIE))
        if session is not None and session.signed_in and self.token is not None and await self.signed_out(session):
            session = None  # signed out: a copy of its cookie is no session
        fresh = session is None
        if session is None:
            session = self.new_session(signed_in=self.token is None)
        request[SESSION] = session
        request[CSRF] = self.csrf(session)
        allowed = by_bearer or self.token is None or session.signed_in
        if not allowed and request.path not in PUBLIC_PATHS:
            if request.method in ("GET", "HEAD"):
                raise web.HTTPSeeOther(f"/login?next={_safe_next(request.path_qs)}")
            raise web.HTTPUnauthorized(text="sign in first, or send Authorization: Bearer <CONSOLE_TOKEN>\n")
        if request.method == "POST" and not by_bearer:
            given = request.headers.get("X-CSRF-Token")
            if given is None:
                form = await request.post()
                value = form.get("csrf")
                given = value if isinstance(value, str) else ""
            if fresh or not hmac.compare_digest(given, request[CSRF]):
                raise web.HTTPForbidden(text="this form has expired or did not come from the console: reload it\n")
            if request.path == LOGOUT_PATH and self.token is not None:
                await self.sign_out(session)
        response = await handler(request)
        if fresh and COOKIE not in response.cookies:
            self.set_cookie(request, response, session)
        return response


_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::[0-9]{1,5})?")


def _host_name(host: str | None) -> str:
    """``Host`` without its port (``[::1]:8070`` is ``::1``), or ``""`` when it is not a well-formed host
    (``[localhost]evil``, a bare ``::1``, ``localhost:http``): a name or an IPv4 address, or an IPv6 address
    in brackets, then an optional port of digits, nothing else."""
    found = _HOST.fullmatch(host or "")
    if found is None:
        return ""
    if found["ipv6"] is None:
        return found["name"]
    try:
        return str(ipaddress.IPv6Address(found["ipv6"]))
    except ValueError:
        return ""


NEXT_MAX = 2048
"""Characters a ``next`` has at most."""
_DECODINGS = 4
"""Times a ``next`` is percent-decoded to check it: a value still changing after that is refused."""


def local_path(value: str) -> bool:
    """Whether ``value`` is a path of this console, and nothing a browser, a proxy or a later decoding could
    read as another site's address: printable ASCII only (no control character, whitespace or backslash,
    which browsers drop or read as ``/``), one leading ``/`` (not ``//``: scheme-relative), no ``.`` or
    ``..`` segment (resolved before sending, ``/.//x`` becomes ``//x``); and each percent-decoding of it,
    to the fourth, and its NFKC form keep to the same (``/%2F/x``, ``/%09/x``, ``/%5Cx``, ``/%252F/x``,
    ``/%EF%BC%8F/x``, a fullwidth solidus, are refused)."""
    if not value or len(value) > NEXT_MAX or not all("!" <= c <= "~" and c != "\\" for c in value):
        return False
    for _ in range(_DECODINGS):
        for form in (value, unicodedata.normalize("NFKC", value)):  # a fullwidth solidus is a slash in NFKC
            if not form.startswith("/") or form.startswith("//"):
                return False
            if any(c.isspace() or c == "\\" or not c.isprintable() for c in form):
                return False
            if any(segment in (".", "..") for segment in form.partition("?")[0].split("/")):
                return False
        decoded = unquote(value, errors="replace")
        if decoded == value:
            return True
        value = decoded
    return False


def _safe_next(path: str) -> str:
    """Where to go after signing in, as the sign-in URL's ``next`` parameter: a path of this console only
    (:func:`local_path`), quoted whole (``?``, ``&`` and ``=`` included) so that it comes back as it was."""
    return quote(path, safe="/") if local_path(path) else "/"


def safe_next(value: str | None) -> str:
    """The ``next`` a sign-in form carries, checked again when it comes back: a path of this console
    (:func:`local_path`), else ``/``."""
    return value if value is not None and local_path(value) else "/"
