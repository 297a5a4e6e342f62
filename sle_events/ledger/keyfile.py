"""The log's signing key file (Go `sumdb/note` signer format, 0600): stdlib and the note core only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .note import KeyFormatError, Signer, is_valid_key_name

__all__ = ["LogKeyError", "create_log_key", "load_log_key"]


class LogKeyError(ValueError):
    """The log key file is missing, unsafe or malformed. Never carries key material."""


def create_log_key(path: str | os.PathLike[str], origin: str) -> Signer:
    """Generate the log's Ed25519 key for ``origin`` and write it to a new 0600 file (never overwrites)."""
    if not is_valid_key_name(origin):
        raise LogKeyError(f"origin {origin!r} cannot name a key: no spaces, no '+', no control characters")
    path = Path(path)
    signer = Signer.generate(origin)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LogKeyError(f"{path} exists; refusing to overwrite a key") from None
    except OSError as e:
        raise LogKeyError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(signer.export_skey() + "\n")
    return signer


def load_log_key(path: str | os.PathLike[str]) -> Signer:
    """Read the log key file; it must be a regular file readable by its owner only."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LogKeyError(
            f"log key {path} does not exist (create it with `sle ledger init --log-key {path}`)"
        ) from None
    except OSError as e:
        raise LogKeyError(f"cannot read log key {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise LogKeyError(f"log key {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise LogKeyError(f"log key {path} is accessible by group or others (mode {mode:04o}); chmod 600 {path}")
    try:
        text = path.read_text(encoding="ascii").strip()
        return Signer.from_skey(text)
    except (UnicodeDecodeError, KeyFormatError, ValueError):
        raise LogKeyError(
            f"{path} is not a log signing key (want the PRIVATE+KEY+... form `sle ledger init` writes)"
        ) from None
    except OSError as e:
        raise LogKeyError(f"cannot read log key {path}: {e.strerror}") from None
