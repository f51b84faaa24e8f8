"""Generated token ids -> text, piece by piece, decoded in the context of what precedes them.

A tokenizer decodes a token according to its neighbours: a byte-level BPE token may hold part of a
character whose other bytes come with the next tokens; a SentencePiece decoder drops the leading
space of the first token it is given; some tokenizers clean up the space before punctuation. Decoding
the generated tokens on their own (as mlx-lm's streaming detokenizers do: they also trim the first
token's leading space) loses or adds text at the prompt's end. `Detokenizer` keeps, for every prefix
of the generated tokens once flushed,

    decode(context + generated) == decode(context) + "".join(pieces)

the way vLLM and TGI detokenize incrementally: each new token is decoded with the tokens since the
last settled point and the group of tokens before it (their text is already out, and subtracted), a
window of a few tokens, so the cost per token does not grow with the text. Text that may still change
is held back: an incomplete UTF-8 character at the end (the decoding ends in U+FFFD), and with a
tokenizer that cleans up spaces, a space that the next token may remove. `flush` gives it out as the
tokenizer decodes it when the generation ends there.

One exception to the rule: a context that itself ends inside a character (a prompt given as token
ids) keeps its replacement character; the completed character is not repeated in the pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded before the first generated one (vLLM's choice too)
CLEANUP_REACH = 3  # a cleaned-up pattern (" n't", " .", ...) is a space and at most 3 more characters


class Detokenizer:
    """Feed the generated ids one at a time; each call returns the text they add (often the token's
    own text, "" while a character is incomplete, more when a held-back character completes).

        detok = Detokenizer(tokenizer, context=prompt_ids)
        pieces = [detok.add(t) for t in generated] + [detok.flush()]
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self._decode = tokenizer.decode
        self._cleans_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._tokens = list(context[len(context) - CONTEXT_TOKENS:] if len(context) > CONTEXT_TOKENS else context)
        # The window: the last group of tokens whose text is out (context for the decoder), then the
        # tokens whose text is not all out yet, from index `_settled`.
        self._settled = len(self._tokens)
        self._out = len(self._decode(self._tokens)) if self._tokens else 0  # characters of the window's text given out

    @property
    def pending(self) -> bool:
        """Whether text is held back (an incomplete character, a space the next token may remove)."""
        return self._settled < len(self._tokens)

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = self._decode(self._tokens)
        final = len(text) - self._unsettled(text)
        piece = text[self._out:final]
        if final == len(text):
            self._advance()
        else:
            self._out = max(self._out, final)
        return piece

    def flush(self) -> str:
        """The text held back, as the tokenizer decodes it at the end (an incomplete character gives
        replacement characters there); the stream may go on after it."""
        if not self.pending:
            return ""
        piece = self._decode(self._tokens)[self._out:]
        self._advance()
        return piece

    def _advance(self) -> None:
        """Everything so far is out: the window restarts at the tokens that were not settled yet."""
        del self._tokens[: self._settled]
        self._settled = len(self._tokens)
        self._out = len(self._decode(self._tokens))

    def _unsettled(self, text: str) -> int:
        """How many characters at the end of the decoding the next tokens may still change."""
        n = len(text) - len(text.rstrip(REPLACEMENT))
        if not n and self._cleans_spaces:
            space = text.rfind(" ", max(0, len(text) - CLEANUP_REACH))
            n = len(text) - space if space >= 0 else 0
        return n
