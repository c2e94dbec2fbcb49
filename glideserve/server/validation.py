"""Strict grammars for the text the HTTP layer parses by hand.

Python's text predicates are Unicode-aware: ``str.isdigit`` is true for
superscripts and circled digits that ``int`` then rejects, ``int`` itself accepts
Arabic-Indic or mathematical digits, surrounding whitespace and underscores, and
``str.strip`` leaves zero-width characters in place. Every number or token a
client sends as text is therefore matched against an explicit ASCII regular
expression here, and free text is checked for characters nobody can see.
"""

from __future__ import annotations

import re
import unicodedata

# A decimal Content-Length: ASCII digits only, bounded so the int stays small.
CONTENT_LENGTH_PATTERN = re.compile(rb"[0-9]{1,18}")
# Request ids chosen by clients (X-Request-Id, DELETE /v1/requests/{id}).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# Image ids minted by the server's ImageStore: "img_" and 32 lowercase hex digits.
IMAGE_ID_PATTERN = re.compile(r"img_[0-9a-f]{32}")

# Control characters a prompt may contain: tab and line feed (multi-line prompts).
ALLOWED_CONTROLS = frozenset("\t\n")
# Categories that draw nothing on their own: controls, format characters (zero-width
# space, joiners, BOM, bidi marks), separators, combining marks, unassigned, private use.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})
# Letters and symbols that render as blank space although their category says otherwise.
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e\u2028\u2029")


def is_visible(char: str) -> bool:
    return char not in BLANK_CHARACTERS and unicodedata.category(char) not in INVISIBLE_CATEGORIES


def check_text(value: str, field: str, allow_empty: bool) -> str:
    """Refuse control characters other than tab and newline (a carriage return only as part
    of a Windows line ending, CRLF), and (unless ``allow_empty``) text without a single
    visible character. Raises ValueError naming ``field``."""
    for position, char in enumerate(value):
        if char == "\r" and value[position + 1:position + 2] == "\n":
            continue  # a bare CR could rewrite a log line; CRLF is just a line break
        if unicodedata.category(char) == "Cc" and char not in ALLOWED_CONTROLS:
            raise ValueError(f"{field} contains the control character U+{ord(char):04X} at position {position}; "
                             "remove it (only tab and newline are allowed)")
    if not allow_empty and not any(is_visible(char) for char in value):
        raise ValueError(f"{field} has no visible characters (only spaces, zero-width or control characters); "
                         "describe the image in words")
    return value


def parse_content_length(value: bytes) -> int | None:
    """The Content-Length header as an int, or None when it is not plain ASCII digits."""
    return int(value) if CONTENT_LENGTH_PATTERN.fullmatch(value) else None
