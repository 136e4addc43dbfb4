"""pmeta: cold-start personalization from a bank of meta-learned anchors (soft prompt + LoRA).

    import pmeta
    bank = pmeta.Bank.open("bank/")
    p = bank.personalize({"user_id": "u1", "items": [{"item_id": "2571", "rating": 5}]})
    p.rank(top=10)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import BankBusy, BankIntegrityError, BankNotFound, BankUnavailable, InvalidConfig, InvalidData, InvalidHistory, InvalidRequest, ModesUnavailable, PmetaError, TrainingDiverged
from .lazy import lazy_names

# The public names that need torch, FAISS or transformers are imported on first use (PEP 562), so
# that `import pmeta.cli` (the `pmeta` command) starts in a fraction of a second and a bad argument
# or input file is reported before any of them loads.
_LAZY = {
    "Bank": ".bank.bank",
    "Personalization": ".bank.bank",
    "Recommendation": ".bank.bank",
    "build_bank": ".bank.build",
    "BankConfig": ".config",
    "load_config": ".config",
    "UserHistory": ".data.history",
    "load_history": ".data.history",
    "parse_history": ".data.history",
    "TextBank": ".text.bank",
}

if TYPE_CHECKING:
    from .bank.bank import Bank, Personalization, Recommendation
    from .bank.build import build_bank
    from .config import BankConfig, load_config
    from .data.history import UserHistory, load_history, parse_history
    from .text.bank import TextBank


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__version__ = "0.1.0"

__all__ = [
    "Bank",
    "BankBusy",
    "BankConfig",
    "BankIntegrityError",
    "BankNotFound",
    "BankUnavailable",
    "InvalidConfig",
    "InvalidData",
    "InvalidHistory",
    "InvalidRequest",
    "ModesUnavailable",
    "Personalization",
    "PmetaError",
    "Recommendation",
    "TextBank",
    "TrainingDiverged",
    "UserHistory",
    "build_bank",
    "load_config",
    "load_history",
    "parse_history",
]
