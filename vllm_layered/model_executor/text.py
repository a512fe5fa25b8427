"""Checks on prompt text, shared by the text encoder and the HTTP API (no torch here: the API imports it)."""

from __future__ import annotations


def check_text(text: str, name: str = "prompt") -> str:
    """``text`` if the tokenizer can take it; ValueError naming ``name`` otherwise.

    Python strings can hold lone surrogates (U+D800-U+DFFF: "\\ud800" in JSON, or a form decoded with
    a lenient charset), which are not Unicode text: the tokenizer refuses them with a TypeError.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} is not valid Unicode text: it holds a lone surrogate U+{ord(text[e.start]):04X} "
            f"at character {e.start}"
        ) from None
    return text
