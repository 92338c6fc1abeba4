"""Stop strings and streaming text: turn a growing list of token ids into safe-to-show text deltas.

Tokens do not map to characters one to one: a multi-byte character can span two byte-level BPE tokens
(the partial decode ends in U+FFFD), and a stop string can span several tokens. `TextStream` re-decodes the
generated ids at every step, finds the first stop string, and only releases text that can no longer change or
turn out to be the start of a stop string, so a streamed answer never shows half a character or a stop string.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


def find_stop(text: str, stop_strings: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (it may still become one)."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class TextStream:
    """Incremental detokenisation of one generated sequence, with stop-string detection.

    ``push(token_id)`` returns the text that became final with this token ("" if none); ``stopped`` turns True when
    the generated text contains a stop string, and ``text`` is then the text before it. ``flush()`` returns whatever
    was held back once generation ends.
    """

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = 0

    def push(self, token_id: int) -> str:
        if self.stopped:
            raise RuntimeError("TextStream already hit a stop string")
        self.token_ids.append(int(token_id))
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        cut = find_stop(text, self.stop_strings)
        if cut >= 0:
            self.stopped, self.text = True, text[:cut]
            return self._release(cut)
        self.text = text
        safe = len(text) - held_back(text, self.stop_strings)
        while safe > 0 and text[safe - 1] == REPLACEMENT_CHAR:  # an incomplete multi-byte character
            safe -= 1
        return self._release(safe)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        # Text already released is never taken back, even if a later decode rewrites it (rare tokenizer clean-up).
        delta = self.text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return delta
