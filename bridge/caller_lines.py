"""The sentences the bridge itself has a call say: re-prompts, goodbyes, voicemail, apologies.

The agent's LLM writes everything else a caller hears; these few lines are the bridge's own, said
when the LLM can't be asked (the agent is down) or shouldn't be (a silent caller, a voicemail
machine), and, in a warm transfer, what the pharmacist hears. They belong to an agent, so that a
Spanish agent says them in Spanish: each agent file may set its own in its ``bridge.lines``
section (docs/agents.md), and ``CallerLines()`` holds the English defaults. ``line_problem``
checks one line as a file sets it. Twilio reads the fallback and pharmacist lines with its own
text-to-speech, in the language and voice of the agent's ``bridge.twilio_say``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field, fields

from .twilio import SayVoice

IDLE_REPROMPT = "Are you still there? I'm here if you need anything."
IDLE_GOODBYE = "I haven't heard anything for a while, so I'll end the call now. Please call again any time. Goodbye."
VOICEMAIL = (
    "Hello, this is your pharmacy calling with a message about your prescription. "
    "Please call us back when it suits you. Thank you, and goodbye."
)
TRANSFER_FAILED = (
    "I'm sorry, I couldn't connect you to a pharmacist just now. Is there anything else I can help you with?"
)
FALLBACK_TRANSFER = (
    "I'm sorry, our automated assistant isn't available right now. "
    "Please hold while I connect you to a member of our team."
)
FALLBACK_GOODBYE = (
    "I'm sorry, our automated assistant isn't available right now. Please call us again in a few minutes. Goodbye."
)
RECORDING_NOTICE = "This call is recorded."
TRANSFER_CONNECTING = "The pharmacist can take your call now. I'm connecting you."
TRANSFER_DECLINED = (
    "I'm sorry, the pharmacist can't come to the phone right now. I can take a message, "
    "or have them call you back. What would you prefer?"
)
PHARMACIST_BRIEFING = (
    "Hello, this is the pharmacy's phone assistant with a caller for a pharmacist: {summary}. "
    "Press 1 to take the call, or 2 if you can't."
)
PHARMACIST_NO_ANSWER = "No key was pressed, so the caller stays with the assistant. Goodbye."
PHARMACIST_CONNECTING = "Thank you. Connecting you to the caller now."
PHARMACIST_DECLINED = "Thank you. The caller stays with the assistant. Goodbye."
PHARMACIST_CALLER_LEFT = "Sorry, the caller has hung up in the meantime. Goodbye."
# A line is said aloud in one breath; longer is a mistake in the file. The pharmacist's lines go
# into TwiML sent inline, whose 4,000 characters the summary and the callback URL share.
MAX_LINE_CHARS = 1000
MAX_PHARMACIST_LINE_CHARS = 500


@dataclass(frozen=True, slots=True)
class CallerLines:
    """One agent's lines, each one sentence or two, said as written."""

    idle_reprompt: str = IDLE_REPROMPT  # to a caller silent for IDLE_REPROMPT_SECONDS
    idle_goodbye: str = IDLE_GOODBYE  # before hanging up on a caller still silent
    voicemail: str = VOICEMAIL  # to an answering machine on an outbound call
    transfer_failed: str = TRANSFER_FAILED  # the agent's line when a transfer could not be made
    fallback_transfer: str = FALLBACK_TRANSFER  # Twilio says it when the agent fails, before FALLBACK_NUMBER
    fallback_goodbye: str = FALLBACK_GOODBYE  # Twilio says it when the agent fails and there is no FALLBACK_NUMBER
    recording_notice: str = RECORDING_NOTICE  # before the call is recorded (CALL_RECORDING)
    transfer_connecting: str = TRANSFER_CONNECTING  # a warm transfer: the pharmacist accepted
    transfer_declined: str = TRANSFER_DECLINED  # a warm transfer: the pharmacist declined or didn't answer
    # A warm transfer, to the pharmacist: the briefing ({summary} is the model's), then one of the rest.
    pharmacist_briefing: str = PHARMACIST_BRIEFING
    pharmacist_no_answer: str = PHARMACIST_NO_ANSWER  # no key pressed after the briefing
    pharmacist_connecting: str = PHARMACIST_CONNECTING  # pressed 1: they wait in the conference
    pharmacist_declined: str = PHARMACIST_DECLINED  # pressed another key
    pharmacist_caller_left: str = PHARMACIST_CALLER_LEFT  # pressed 1, but the caller had gone
    # How Twilio reads the lines it says (fallback_*, pharmacist_*); the agent's voice says the rest.
    twilio_say: SayVoice = field(default_factory=SayVoice)


LINE_NAMES = tuple(line.name for line in fields(CallerLines) if line.type == "str")


def line_problem(name: str, text: str) -> str | None:
    """Why ``text`` can't be the line ``name``, in a few words; None if it can. ``text`` is one line
    with its whitespace collapsed."""
    limit = MAX_PHARMACIST_LINE_CHARS if name.startswith("pharmacist_") else MAX_LINE_CHARS
    if len(text) > limit:
        return f"must be at most {limit} characters, got {len(text)}"
    if name == "pharmacist_briefing":
        try:
            fields_named = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        except ValueError:
            fields_named = set()
        if fields_named != {"summary"}:
            return "must hold {summary}, where the model's summary goes, and no other {field} (write a brace as {{ or }})"
    return None
