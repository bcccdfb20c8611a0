"""upper_bound: a strict bound on a text's token count, from its length alone.

A text whose bound fits the model's per-item limit needs no counting at all; for most texts of a
usual corpus it does, so the exact tokenizer is never loaded for them.
"""

from __future__ import annotations

import unicodedata

from ._models import ModelSpec

__all__ = ["SURE_SHARE", "may_exceed", "upper_bound"]

#: A text is counted exactly only when its estimate is over this share of the limit (and its
#: strict bound over the limit): the estimator is never more than 5% under on natural text,
#: so such a text fits with room to spare, and one that does not is halved when refused.
SURE_SHARE = 0.75


def upper_bound(text: str, spec: ModelSpec) -> int:
    """A strict upper bound on the server's count of ``text`` (tokens), in O(len(text)).

    Why it is strict, per tokenizer family:

    * byte-level BPE (``qwen3``): the tokens partition the UTF-8 bytes of the NFC-normalised
      text and each holds at least one byte. NFC can lengthen text (composition exclusions
      such as U+0958 become two code points), so the bytes are counted after NFC.
    * WordPiece (``bert-*``): each token is at least one character of a word, or one [UNK] for
      a whole word; whitespace gives none. The normaliser (clean-up, NFD with accents removed,
      lower case) never yields more characters than the lower-cased NFD form has (Hangul
      syllables become 2-3 jamo, "İ" becomes two characters), so that length bounds it.
    * Unigram with a Metaspace prefix (``xlmr``): no byte fallback, so each token holds at least
      one code point of the text fully decomposed (a composed letter such as "ϊ" may come out
      as two tokens; a space becomes the "▁" of the next word), plus possibly one lone prefix
      "▁". NFKD can expand one character a lot (U+FDFA becomes 18), so the bound is the larger
      of the text's and its NFKD form's length, plus one.
    * unknown tokenizers (a user's file may be byte-level): the larger of the text's and its
      NFC and NFKC forms' UTF-8 length, plus one.

    Counting characters, not bytes, where the family allows it keeps the bound near the text's
    length for Chinese (3 UTF-8 bytes a character), so that most texts are proved short.
    """
    family = spec.tokenizer
    if text.isascii():  # NFC, NFD and NFKC leave ASCII as it is; lower case keeps its length
        prefix = 0 if family in ("qwen3", "qwen3-vl", "bert-en", "bert-zh") else 1
        return len(text) + prefix + spec.special_tokens
    if family in ("bert-en", "bert-zh"):
        return len(unicodedata.normalize("NFD", text).lower()) + spec.special_tokens
    if family == "xlmr":
        return max(len(text), len(unicodedata.normalize("NFKD", text))) + 1 + spec.special_tokens
    if family in ("qwen3", "qwen3-vl"):
        return _utf8_len(unicodedata.normalize("NFC", text)) + spec.special_tokens
    nfc, nfkc = (_utf8_len(unicodedata.normalize(form, text)) for form in ("NFC", "NFKC"))
    return max(_utf8_len(text), nfc, nfkc) + 1 + spec.special_tokens


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def may_exceed(text: str, estimate: int, spec: ModelSpec) -> bool:
    """True for a text that can really be over ``spec``'s per-item limit, so that only its exact
    count can say: its ``estimate`` (the estimator's count) is over :data:`SURE_SHARE` of the
    limit and its strict bound over the limit. A function of the text alone, so a text is cut,
    or sent whole, the same way in every run."""
    limit = spec.max_input_tokens
    return estimate > SURE_SHARE * limit and upper_bound(text, spec) > limit
