"""Text personalization on LaMP-format tasks with a causal LM backbone (text banks).

    from pmeta.text import TextBank
    bank = TextBank.open("text-bank/")
    p = bank.personalize({"user_id": "u1", "profile": [{"id": "1", "text": "...", "score": "5"}]})
    p.predict("What is the score of the following review ... review: ...", retrieve=2)
"""

from ..storage import bank_kind
from .bank import TextBank, TextPersonalization
from .build import build_text_bank
from .config import TextConfig, load_text_config
from .history import TextHistory, load_text_history, parse_text_history

__all__ = ["TextBank", "TextConfig", "TextHistory", "TextPersonalization", "bank_kind", "build_text_bank", "load_text_config", "load_text_history", "parse_text_history"]
