"""The catalog of the account's approved WhatsApp templates (``WA_TEMPLATES_FILE``), and the check of a native
template against it before anything is sent.

WhatsApp rejects a template whose parameters do not match the approved one (error 132000, or 132018 for a
parameter with a newline, a tab or more than four spaces in a row), and it does so after CGB has answered
``{"success": true}``: checking here is the only way to catch it in the worker. The file is TOML::

    [[template]]
    name = "visa_approval_file_phone"
    languages = ["he"]
    body = 2                 # or the parameter names: ["first_name", "country"]
    header = "document"      # "text", "image", "video" or "document"; left out: none
    buttons = ["url"]        # by index, "url" or "quick_reply"; left out: none
    category = "utility"     # "marketing", "utility" or "authentication": a job's default category

:func:`load_catalog` reports every problem in the file at once (:class:`ConfigError`); :func:`check_template`
raises :class:`TemplateNotFoundError` for a name or language the file does not list, and
:class:`TemplateMismatchError` naming the template and what differs.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, TemplateMismatchError, TemplateNotFoundError
from .models import HEADER_KINDS, WhatsAppTemplate

BUTTON_KINDS = ("url", "quick_reply")
MAX_PARAMETER = 1024
BAD_SPACING = re.compile(r"[\n\t]| {5,}")
"""What WhatsApp refuses in a parameter (its error 132018): a newline, a tab, more than four spaces in a row."""
_KEYS = {"name", "languages", "body", "header", "buttons", "category"}
TEMPLATE_CATEGORIES = ("marketing", "utility", "authentication")


@dataclass(frozen=True, slots=True)
class CatalogTemplate:
    name: str
    languages: tuple[str, ...]
    body: int | tuple[str, ...]
    """How many positional parameters, or the names of the named ones."""
    header: str | None
    buttons: tuple[str, ...]
    category: str | None = None
    """Meta's category of the approved template: a job's default category."""


@dataclass(frozen=True, slots=True)
class TemplateCatalog:
    path: str
    templates: Mapping[str, CatalogTemplate]


def load_catalog(path: str) -> TemplateCatalog:
    """Read and check the file; one :class:`ConfigError` lists every problem in it."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"WA_TEMPLATES_FILE: cannot read {path!r}: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"WA_TEMPLATES_FILE: {path!r} is not TOML: {exc}"]) from None
    problems: list[str] = []
    unknown = set(data) - {"template"}
    if unknown:
        problems.append(f"WA_TEMPLATES_FILE: unknown top-level key(s) {', '.join(sorted(unknown))}")
    entries = data.get("template", [])
    if not isinstance(entries, list):
        raise ConfigError(["WA_TEMPLATES_FILE: 'template' must be an array of tables ([[template]])"])
    templates: dict[str, CatalogTemplate] = {}
    for i, entry in enumerate(entries, 1):
        parsed = _entry(entry, f"WA_TEMPLATES_FILE: template {i}", problems)
        if parsed is None:
            continue
        if parsed.name in templates:
            problems.append(f"WA_TEMPLATES_FILE: template {i}: {parsed.name!r} is listed twice")
        templates[parsed.name] = parsed
    if problems:
        raise ConfigError(problems)
    return TemplateCatalog(path, templates)


def _entry(entry: Any, where: str, problems: list[str]) -> CatalogTemplate | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a table")
        return None
    before = len(problems)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: 'name' must be a non-empty string")
        name = "?"
    else:
        where = f"{where} ({name})"
    for key in sorted(set(entry) - _KEYS):
        problems.append(f"{where}: unknown key {key!r}")
    languages = entry.get("languages")
    if not isinstance(languages, list) or not languages or not all(isinstance(x, str) and x for x in languages):
        problems.append(f"{where}: 'languages' must be a non-empty list of language codes")
        languages = []
    body = entry.get("body", 0)
    if isinstance(body, bool) or not (
        (isinstance(body, int) and body >= 0)
        or (isinstance(body, list) and all(isinstance(x, str) and x for x in body) and len(set(body)) == len(body))
    ):
        problems.append(f"{where}: 'body' must be a count of parameters or a list of distinct parameter names")
        body = 0
    header = entry.get("header")
    if header is not None and header not in HEADER_KINDS:
        problems.append(f"{where}: 'header' must be one of {', '.join(HEADER_KINDS)}")
    buttons = entry.get("buttons", [])
    if not isinstance(buttons, list) or not all(b in BUTTON_KINDS for b in buttons) or len(buttons) > 10:
        problems.append(f"{where}: 'buttons' must list up to 10 of {', '.join(BUTTON_KINDS)}, by index")
        buttons = []
    category = entry.get("category")
    if category is not None and category not in TEMPLATE_CATEGORIES:
        problems.append(f"{where}: 'category' must be one of {', '.join(TEMPLATE_CATEGORIES)}")
    if len(problems) > before:
        return None
    return CatalogTemplate(
        name=name,
        languages=tuple(languages),
        body=tuple(body) if isinstance(body, list) else body,
        header=header,
        buttons=tuple(buttons),
        category=category,
    )


def check_template(t: WhatsAppTemplate, catalog: TemplateCatalog) -> None:
    """Raise before sending when ``t`` does not match the approved template the catalog lists."""
    approved = catalog.templates.get(t.name)
    if approved is None:
        raise TemplateNotFoundError(f"WhatsApp template {t.name!r} is not in WA_TEMPLATES_FILE")
    if t.language not in approved.languages:
        raise TemplateNotFoundError(
            f"WhatsApp template {t.name!r} has no {t.language!r} version in WA_TEMPLATES_FILE "
            f"(it lists {', '.join(approved.languages)})"
        )

    def bad(why: str) -> TemplateMismatchError:
        return TemplateMismatchError(f"WhatsApp template {t.name!r} ({t.language}): {why}")

    body = t.body or []
    if isinstance(approved.body, int):
        if not isinstance(body, list) or len(body) != approved.body:
            given = f"{len(body)} named" if isinstance(body, dict) else str(len(body))
            raise bad(f"the body takes {approved.body} positional parameter(s), the job gives {given}")
    else:
        names = list(body) if isinstance(body, dict) else None
        if names is None or set(names) != set(approved.body):
            raise bad(f"the body takes the named parameters {', '.join(approved.body) or 'none'}")
    given_header = t.header.kinds[0] if t.header is not None else None
    if given_header != approved.header:
        if approved.header is None:
            raise bad(f"the template has no header, the job gives a {given_header} one")
        if given_header is None:
            raise bad(f"the template's {approved.header} header is missing")
        raise bad(f"the header is a {approved.header}, the job gives a {given_header}")
    for button in t.buttons or []:
        if button.index >= len(approved.buttons):
            raise bad(f"the template has no button {button.index} ({len(approved.buttons)} button(s))")
        kind = approved.buttons[button.index]
        if (kind == "url") != (button.url is not None):
            raise bad(f"button {button.index} is a {kind} button")
    parameters = list(body.values() if isinstance(body, dict) else body)
    if t.header is not None and t.header.text is not None:
        parameters.append(t.header.text)
    parameters += [b.url or b.payload or "" for b in t.buttons or []]
    for value in parameters:
        if not value.strip():
            raise bad("a parameter is empty")
        if len(value) > MAX_PARAMETER:
            raise bad(f"a parameter is {len(value)} characters; WhatsApp takes {MAX_PARAMETER}")
        if BAD_SPACING.search(value):
            raise bad("a parameter has a newline, a tab or more than four spaces in a row (WhatsApp's 132018)")
