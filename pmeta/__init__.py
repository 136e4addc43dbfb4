"""pmeta: cold-start personalization from a bank of meta-learned anchors (soft prompt + LoRA).

    import pmeta
    bank = pmeta.Bank.open("bank/")
    p = bank.personalize({"user_id": "u1", "items": [{"item_id": "2571", "rating": 5}]})
    p.rank(top=10)
"""

from .bank.bank import Bank, Personalization, Recommendation
from .bank.build import build_bank
from .config import BankConfig, load_config
from .data.history import UserHistory, load_history, parse_history
from .errors import BankBusy, BankIntegrityError, BankNotFound, BankUnavailable, InvalidConfig, InvalidData, InvalidHistory, InvalidRequest, PmetaError, TrainingDiverged

from .text.bank import TextBank

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
