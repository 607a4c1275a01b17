"""What the console shows of free text and of ids: every number masked, in any spelling, stricter than the logs.

The logs' masker (:func:`cgb_worker.logs.mask_text`) looks for phone-shaped text; the console shows what
clients and their users wrote (job ids, error messages, payloads, the filters typed in), so :func:`mask` does
not guess at shapes:

* **A run of digits** is digits separated only by characters that are not cased letters, of any kind and any
  number: spaces of every kind (NBSP, thin and ideographic spaces), dots, dashes of every kind, slashes,
  underscores, parentheses, asterisks, control and zero-width characters, and letters without case (the Hangul
  filler U+3164 and others that display as a blank or a dot, CJK, Hebrew, Arabic). A cased letter (Latin,
  Greek, Cyrillic…) ends a run but does not protect it: ``12025550100x``, ``+1 202 555 0101ext`` and
  ``tel12025550100`` are all masked.
* **A digit** is any character Python calls one (``str.isdigit``): ASCII, Arabic-Indic, Devanagari,
  fullwidth, superscript and circled digits alike. An escape sequence counts as the character it stands for
  (``\\u0661``, ``\\xa0``, ``\\n``, ``\\"``), as Jinja's ``tojson`` and Python's ``repr`` write them: a payload
  shown as JSON, or an error quoting a value, spells a number with escapes where the text had a NBSP or an
  Arabic-Indic digit, and a newline between digit groups is ``\\n`` there.
* **A run of five digits or more** keeps its last two digits; every other digit becomes ``*`` (an escape
  standing for a digit becomes one ``*``), and the separators stay, so the text keeps its layout. Counts
  such as a queue position of 10,000 or more are masked too: the console masks a number it cannot tell from
  a phone's.

Kept whole:

* **arq's own job ids**: what ``uuid4().hex`` makes, exactly 32 lowercase hex digits with at least one letter
  (a-f), the version digit ``4`` at index 12 and a variant digit of ``8``, ``9``, ``a`` or ``b`` at index 16,
  not touching another letter or digit. Such an id is kept even when it holds a long run of digits: its
  digits are drawn at random, so a run in one is no one's number, and 37 % of real ids hold a run of seven
  digits or more (9 % one of ten or more), which masking would leave unreadable and unsearchable. An id
  chosen to look like one with a number placed inside it (``_job_id`` is the enqueuing client's choice)
  is kept too: it is indistinguishable from chance, and whoever enqueues already holds the number. Any other
  id, a 32-digit one or ``12025550100`` included, is masked like any text.
* **The console's own timestamps**, ``YYYY-MM-DD HH:MM:SS UTC`` with a valid date and time and that suffix
  (as :mod:`cgb_worker.jobstate` writes them in a job's line): a number is not written so.

What is not masked: a number spelled in words or in CJK numerals, or encoded. WhatsApp's message ids are
encoded so (``wamid.`` and base64 whose first bytes are the recipient's number): :func:`short_wamid` shows one
by its tail only, which is the message's own id.

Links: a page's visible text is masked, and its links and forms carry an id the masker would change sealed
(:mod:`cgb_worker.console.app`, ``?s=``), so that no address holds it either; any other id is quoted whole.
"""

from __future__ import annotations

import re
import sys
import unicodedata

KEEP_DIGITS = 2
"""The last digits a masked run shows."""
RUN_MIN = 5
"""Digits a run has at least to be masked."""

_OTHER_DIGITS = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isdigit() and not chr(c).isdecimal())
_DIGIT = f"[\\d{re.escape(_OTHER_DIGITS)}]"
_ANY_DIGIT = re.compile(_DIGIT)


def _cased_letters() -> str:
    """Every upper-, lower- and titlecase letter, as a regex class body of ranges."""
    ranges: list[tuple[int, int]] = []
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)) in ("Lu", "Ll", "Lt"):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


_CASED = _cased_letters()
_RUN = re.compile(f"{_DIGIT}(?:[^{_CASED}\\d{re.escape(_OTHER_DIGITS)}]*{_DIGIT})*")
"""Digits joined by anything but a cased letter (upper-, lower- or titlecase, as in words): spaces and
punctuation of every kind, and the letters without case that can pass for a blank or a dot between digit groups
(the Hangul filler U+3164, U+A78F, U+318D, U+01C0, CJK, Hebrew and Arabic letters alike: over-masking
such a text is the safe side)."""
_ARQ_ID = re.compile(r"(?<![^\W_])[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}(?![^\W_])")
_STAMP = re.compile(
    r"(?<![^\W_])(?:19|20)[0-9]{2}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01]) "
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9] UTC(?![^\W_])"
)
_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9A-Fa-f]{2}\\u[dD][c-fC-F][0-9A-Fa-f]{2}"  # a surrogate pair, as JSON writes U+10000 up
    r"|\\(?:u[0-9A-Fa-f]{4}|x[0-9A-Fa-f]{2}|U[0-9A-Fa-f]{8}|[abfnrtv\"'/\\])"
)
_SIMPLE = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unescape(escape: str) -> str:
    """The one character an escape sequence stands for (a letter when it stands for none: it ends a run)."""
    kind = escape[1]
    if len(escape) == 12:  # a surrogate pair: the one character beyond U+FFFF it stands for
        high, low = int(escape[2:6], 16), int(escape[8:12], 16)
        return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
    if kind in "uxU":
        code = int(escape[2:], 16)
        return chr(code) if code <= sys.maxunicode else "x"
    return _SIMPLE.get(kind, kind)


def mask(text: str) -> str:
    """``text`` with every run of :data:`RUN_MIN` digits or more masked but its last two digits, arq's job
    ids and the console's timestamps kept whole (the module's docstring says what counts)."""
    if "\\" not in text and not _ANY_DIGIT.search(text):
        return text
    # One character per piece of the text: an escape sequence is one piece, standing for the character it
    # escapes. The runs are found in those characters, with the pieces kept whole blanked out as letters.
    pieces: list[str] = []
    chars: list[str] = []
    at = 0
    for escape in _ESCAPE.finditer(text) if "\\" in text else ():
        pieces += text[at : escape.start()]
        chars += text[at : escape.start()]
        pieces.append(escape.group())
        chars.append(_unescape(escape.group()))
        at = escape.end()
    pieces += text[at:]
    chars += text[at:]
    seen = "".join(chars)
    scrubbed = _STAMP.sub(lambda m: "x" * len(m.group()), _ARQ_ID.sub(_blank_arq_id, seen))
    changed = False
    for run in _RUN.finditer(scrubbed):
        digits = [i for i in range(run.start(), run.end()) if scrubbed[i].isdigit()]
        if len(digits) < RUN_MIN:
            continue
        for i in digits[:-KEEP_DIGITS]:
            pieces[i] = "*"
        changed = True
    return "".join(pieces) if changed else text


def _blank_arq_id(match: re.Match[str]) -> str:
    found = match.group()
    return "x" * len(found) if any("a" <= c <= "f" for c in found) else found


def is_arq_id(value: str) -> bool:
    """Whether ``value`` is an id arq made (``uuid4().hex``), which :func:`mask` keeps whole."""
    return len(value) == 32 and _ARQ_ID.fullmatch(value) is not None and any("a" <= c <= "f" for c in value)


WAMID_TAIL = 16
"""Characters of a WhatsApp message id :func:`short_wamid` keeps: its last twelve bytes in base64, the message's
own id, after the recipient's number (at the start) and however long that number is."""


def short_wamid(value: str) -> str:
    """A WhatsApp message id fit to show: ``wamid.…`` and its tail, enough to tell it apart and to match it
    against Meta's, without the recipient's number its head encodes. A short id (not WhatsApp's shape, as the
    simulator's) is only masked."""
    if len(value) <= len("wamid.") + WAMID_TAIL:
        return mask(value)
    return "wamid.…" + mask(value[-WAMID_TAIL:])
