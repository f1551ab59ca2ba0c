"""JSON text from a peer, turned into strings that are always valid Unicode.

JSON may spell any UTF-16 code unit as ``\\uXXXX``, so ``"\\ud800"`` is a JSON string that
``json.loads`` turns into a lone surrogate: a Python ``str`` that no UTF-8 encoder will take.
Handed on, one such character from Twilio or Deepgram would make the webhook body, the call
record or the Settings sent to Deepgram fail to encode, or come out as JSON that strict parsers
refuse. This module owns the repair: ``loads`` parses a peer's frame and replaces each lone
surrogate in its strings (keys too) with U+FFFD, the replacement character; ``valid_text`` does
the same for one string. Only a frame that holds a surrogate's escape pays for the repair.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

REPLACEMENT: Final = "\ufffd"
LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# The only way a lone surrogate gets into what json.loads returns: text frames are decoded as
# strict UTF-8, which holds none. A valid pair's escapes match too; the walk then changes nothing.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")


def valid_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD."""
    return LONE_SURROGATE.sub(REPLACEMENT, text)


_PLAIN: Final = json.JSONDecoder()


def loads(text: str, decoder: json.JSONDecoder = _PLAIN) -> Any:
    """``decoder.decode(text)`` (by default plain ``json.loads``), every string of the result valid Unicode.

    A decoder with options is made once by its module, not per frame as ``json.loads(text, **options)`` would.
    """
    value = decoder.decode(text)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None:
        value = _repaired(value)
    return value


def _repaired(value: Any) -> Any:
    """``value`` (fresh from ``json.loads``) with its strings made valid; containers change in place.

    A loop over a stack rather than recursion: json.loads nests as deep as the recursion limit
    allows, and a recursive walk starting further down the stack could overflow where it did not.
    """
    if isinstance(value, str):
        return valid_text(value)
    pending = [value]
    while pending:
        container = pending.pop()
        if isinstance(container, list):
            for index, item in enumerate(container):
                if isinstance(item, str):
                    container[index] = valid_text(item)
                elif isinstance(item, list | dict):
                    pending.append(item)
        elif isinstance(container, dict):
            entries = list(container.items())
            container.clear()  # rebuilt in the same order, since a key may change too
            for key, item in entries:
                if isinstance(item, str):
                    item = valid_text(item)
                elif isinstance(item, list | dict):
                    pending.append(item)
                container[valid_text(key)] = item
    return value
