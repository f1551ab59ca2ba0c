"""The conversation so far, kept for a resumed agent session's ``agent.context.messages``."""

from __future__ import annotations

from collections import deque

# The resume history keeps the newest this many items (turns and function calls): about two
# hours of conversation, and a Settings message Deepgram still takes.
MAX_HISTORY_ITEMS = 400
# Ours and Deepgram's copy of the same turn arrive close together: matched within this many items.
HISTORY_MATCH_WINDOW = 16


class _HistoryEntry:
    __slots__ = ("key", "item", "from_deepgram", "unmatched")

    def __init__(self, key: str, item: str, from_deepgram: bool, unmatched: tuple[str, ...]) -> None:
        self.key = key  # a turn's item is its own key: no second copy of the text
        self.item = item
        self.from_deepgram = from_deepgram
        self.unmatched = unmatched  # what the other side's copy has yet to match


def _history_parts(key: str) -> tuple[str, ...]:
    """A function-calls key names each call; Deepgram may put several calls in one item."""
    if key.startswith("f:"):
        return tuple(f"f:{call_id}" for call_id in key[2:].split(","))
    return (key,)


class ResumeHistory:
    """The conversation so far, for a resumed session's ``agent.context.messages``.

    Deepgram sends ``History`` messages as the conversation goes, server-side function calls
    included: those are the faithful record and are preferred. The bridge keeps its own copy of
    each turn (``ConversationText``) and each client-side function call, used only where
    Deepgram's is missing (``flags.history`` off, a message lost in a drop). Each item has a key
    (``agent_protocol.history_item``); the two copies of one thing are matched within a short
    window, whichever comes first, and Deepgram's text wins. Items are JSON text: a call holds
    one per turn for as long as it lasts, and text is half the memory of dicts.
    """

    __slots__ = ("_entries", "_replay")

    def __init__(self) -> None:
        self._entries: list[_HistoryEntry] = []
        # Keys of what a new session was given as context, which Deepgram may echo as History.
        self._replay: deque[str] = deque()

    def ours(self, key: str, item: str) -> None:
        parts = _history_parts(key)
        for entry in self._recent():
            if entry.from_deepgram and set(parts) <= set(entry.unmatched):
                entry.unmatched = tuple(part for part in entry.unmatched if part not in parts)
                return
        self._append(_HistoryEntry(key, item, False, parts))

    def theirs(self, key: str, item: str) -> None:
        """Deepgram's item; skipped if it only echoes context the session was given."""
        if self._replay:
            if self._replay[0] == key:
                self._replay.popleft()
                return
            self._replay.clear()
        unmatched = set(_history_parts(key))
        replaced: _HistoryEntry | None = None
        for entry in self._recent():
            if not entry.from_deepgram and entry.unmatched and set(entry.unmatched) <= unmatched:
                unmatched -= set(entry.unmatched)
                if replaced is None:
                    replaced = entry
                else:  # Deepgram put several of our calls in one item: it replaces them all
                    self._entries.remove(entry)
        left = tuple(part for part in _history_parts(key) if part in unmatched)
        if replaced is None:
            self._append(_HistoryEntry(key, item, True, left))
        else:
            replaced.key, replaced.item, replaced.from_deepgram, replaced.unmatched = key, item, True, left

    def given_as_context(self, keys: list[str]) -> None:
        """A new session starts from these items; echoes of them are not new history."""
        self._replay = deque(keys)

    def conversation_moved_on(self) -> None:
        self._replay.clear()

    def keys(self) -> list[str]:
        return [entry.key for entry in self._entries]

    def items(self) -> list[str]:
        return [entry.item for entry in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> str:
        return self._entries[index].item

    def _recent(self) -> list[_HistoryEntry]:
        return self._entries[:-HISTORY_MATCH_WINDOW - 1:-1]

    def _append(self, entry: _HistoryEntry) -> None:
        self._entries.append(entry)
        if len(self._entries) > MAX_HISTORY_ITEMS:
            del self._entries[0]
