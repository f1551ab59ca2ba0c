"""The error both protocol modules raise for a frame the bridge cannot use."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A frame we cannot use. ``kind`` groups errors so each is logged once per call."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
