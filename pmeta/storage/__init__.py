"""Bank storage: immutable checksummed version folders and a SQLAlchemy metadata database.

See :mod:`pmeta.storage.store` for the directory layout and the publishing protocol.
"""

from pmeta.storage.manifest import sha256_file
from pmeta.storage.store import BankStore, VersionReader, VersionWriter, bank_kind

__all__ = ["BankStore", "VersionReader", "VersionWriter", "bank_kind", "sha256_file"]
