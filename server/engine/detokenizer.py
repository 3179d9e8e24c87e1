"""Turn generated token ids into text incrementally, and watch for stop strings.

Text is released only when it is final: a token that ends inside a multi-byte character
decodes to U+FFFD until the next one completes it, and text that could be the start of a
stop string is held back until it is known not to be.
"""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# Prompt tokens decoded along with the output so tokenizers that drop a leading space when
# decoding from the start (SentencePiece) render the first output token as in context.
CONTEXT_TOKENS = 4


class Detokenizer:
    """Accumulates one sequence's output text."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...]
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.released = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the text that became final (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: release whatever is still held back."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            # Only a stop string that overlaps unreleased text can be new.
            window_start = max(0, self.released - max(len(s) for s in self.stop) + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, window_start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        out = self.text[self.released : end]
        self.released = max(self.released, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
