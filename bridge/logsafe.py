"""Text from untrusted peers made safe to put in one log line.

This module owns ``clean``: whatever a caller, Twilio or Deepgram sent us (a callSid, an error
description, a transcript) goes through it before it reaches a log format argument. Without it
a peer could end our log line and start a forged one (``\\n``, ``\\r``, U+2028), hide text
(format characters such as U+202E, the right-to-left override), drive a terminal (``\\x1b``
escape sequences) or fill the log with one huge value.

It also owns ``counted``, a number with its noun for a log line or an error ("1 live call",
"2 live calls"), so no message says "1 live calls".
"""

from __future__ import annotations

# The escapes repr writes by name; any other character that needs one gets a numeric escape.
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    """``char`` as ``repr`` would write it inside a string literal."""
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clean(value: object, limit: int = 120) -> str:
    """``value`` as text that stays on one log line and says plainly what it held.

    Every character ``str.isprintable`` rejects is written as the escape ``repr`` would use
    (``\\n``, ``\\x1b``, ``\\u2028``, ``\\U000e0001``): that is all of Unicode's categories C*
    (controls, format characters, surrogates, private use, unassigned), the line and paragraph
    separators (Zl, Zp) and the spaces other than U+0020 (Zs: a no-break space could pass for
    an ordinary one). A backslash becomes ``\\\\``, so a peer cannot send text that reads as one
    of our escapes: the output decodes back to exactly the input.

    At most ``limit`` characters of escaped text are kept, never half an escape; when some of
    the value is left out the suffix ``…(+N chars)`` says how many characters of the original
    value (before escaping) are missing. The suffix is *not* counted against ``limit``.
    Only about ``limit`` characters are examined, however long the value.
    """
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except Exception:  # a peer-shaped object whose __str__ fails must not lose the log line
            return f"<unprintable {type(value).__name__}>"
    limit = max(limit, 0)
    # The fast path: short printable text with nothing to escape is returned as it is.
    if len(text) <= limit and "\\" not in text and text.isprintable():
        return text
    head = text[:limit]
    if "\\" not in head and head.isprintable():
        # Long but clean: each character is one character of output, so cut at limit.
        # (A short text never gets here: it failed the fast path, so its head has work to do.)
        return f"{head}…(+{len(text) - limit} chars)"
    pieces: list[str] = []
    used = 0
    taken = 0
    # An escape is at least as long as its character, so no more than ``limit`` characters of
    # the input can fit: ``head`` is all there is to look at.
    for char in head:
        piece = char if char != "\\" and char.isprintable() else _escape(char)
        if used + len(piece) > limit:
            break
        pieces.append(piece)
        used += len(piece)
        taken += 1
    out = "".join(pieces)
    if taken < len(text):
        return f"{out}…(+{len(text) - taken} chars)"
    return out


def counted(count: float, noun: str, plural: str | None = None) -> str:
    """``count`` followed by ``noun``, singular for exactly one: ``counted(1, "live call")`` is
    "1 live call", ``counted(2, "live call")`` "2 live calls", ``counted(0.5, "day")`` "0.5 days".

    ``plural`` is for a noun that does not just add an "s" (``"delivery", "deliveries"``), or for
    a phrase whose verb agrees too (``"call is live", "calls are live"``). A float is written as
    ``%g`` writes it (1.0 as "1").
    """
    number = f"{count:g}" if isinstance(count, float) else str(count)
    return f"{number} {noun if count == 1 else plural or noun + 's'}"
