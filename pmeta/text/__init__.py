"""Text personalization on LaMP-format tasks with a causal LM backbone (text banks).

    from pmeta.text import TextBank
    bank = TextBank.open("text-bank/")
    p = bank.personalize({"user_id": "u1", "profile": [{"id": "1", "text": "...", "score": "5"}]})
    p.predict("What is the score of the following review ... review: ...", retrieve=2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

# imported on first use (PEP 562), as in `pmeta`: `pmeta.text.config` and `pmeta.text.history`
# load without torch or transformers, so text-bank commands check their input before either loads.
_LAZY = {
    "bank_kind": "..storage",
    "TextBank": ".bank",
    "TextPersonalization": ".bank",
    "build_text_bank": ".build",
    "TextConfig": ".config",
    "load_text_config": ".config",
    "TextHistory": ".history",
    "load_text_history": ".history",
    "parse_text_history": ".history",
}

if TYPE_CHECKING:
    from ..storage import bank_kind
    from .bank import TextBank, TextPersonalization
    from .build import build_text_bank
    from .config import TextConfig, load_text_config
    from .history import TextHistory, load_text_history, parse_text_history


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = ["TextBank", "TextConfig", "TextHistory", "TextPersonalization", "bank_kind", "build_text_bank", "load_text_config", "load_text_history", "parse_text_history"]
