"""Keypad digits: gathered, handed to the agent as words, and kept out of every record and log.

Digits go to the agent together, on ``#`` or after ``dtmf_timeout_seconds`` without a new one
(``#`` alone is an answer too: "press pound to confirm"), as an ``InjectUserMessage`` such as
"The caller pressed 4 2 star". They may be a PIN, so the log and the record say how many keys,
never which. Deepgram echoes such a message as a ``ConversationText`` from the user; an echo is
recognised by its form while echoes are still expected (one per entry sent), rather than by
remembering each text sent, so no echo of any keypad entry of the call shows its digits however
many entries there were, in constant memory. Once every echo has come, words of the same form
are the caller's own speech, and are shown.
"""

from __future__ import annotations

import re

from .actions import Action, ArmTimer, CancelTimer, Timer

# Keypad digits gathered before they go to the agent without waiting for # or the timeout.
MAX_DTMF_DIGITS = 32
KEYPAD_REDACTED = "(keypad digits)"
KEY_WORDS = {"*": "star", "#": "pound"}
KEYPAD_PREFIX = "The caller pressed "
# An echo of our injection: the prefix, then keys as we write them (digits, star, pound),
# however Deepgram punctuates or spaces them.
_KEYPAD_ECHO = re.compile(r"the caller pressed[\s,]*(?:(?:[0-9]|star|pound)[\s,.]*)+", re.IGNORECASE)


class Keypad:
    __slots__ = ("_digits", "_timeout", "_echoes_expected")

    def __init__(self, timeout_seconds: float) -> None:
        self._digits: list[str] = []
        self._timeout = timeout_seconds
        self._echoes_expected = 0

    @property
    def entering(self) -> bool:
        """Keys of an entry are being gathered (the entry is not complete yet)."""
        return bool(self._digits)

    def take_echo(self, text: str) -> bool:
        """``text`` (a user turn) is Deepgram's echo of a keypad entry: keep its digits hidden."""
        if self._echoes_expected and _KEYPAD_ECHO.fullmatch(text.strip()) is not None:
            self._echoes_expected -= 1
            return True
        return False

    def pressed(self, digit: str, now: float) -> tuple[list[Action], list[str]]:
        """One key; returns the timer actions and the entries now complete (in order)."""
        actions: list[Action] = [CancelTimer(Timer.DTMF)]
        entries: list[str] = []
        if digit == "#":
            if not self._digits:
                self._digits.append(digit)  # "#" alone is an answer too
            entries += self.complete()
        else:
            if len(self._digits) >= MAX_DTMF_DIGITS:
                entries += self.complete()
            self._digits.append(digit)
            actions.append(ArmTimer(Timer.DTMF, now + self._timeout))
        return actions, entries

    def complete(self) -> list[str]:
        """The keys gathered so far as one entry's words ("The caller pressed 1 2 pound")."""
        if not self._digits:
            return []
        words = " ".join(KEY_WORDS.get(digit, digit) for digit in self._digits)
        self._digits.clear()
        self._echoes_expected += 1
        return [KEYPAD_PREFIX + words]


def keys_in(entry: str) -> int:
    """How many keys an entry holds: what the log and the record may say of it."""
    return len(entry.removeprefix(KEYPAD_PREFIX).split())
