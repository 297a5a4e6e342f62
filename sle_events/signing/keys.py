"""Ed25519 keys of the people and services who record facts.

A `Signer` holds a private key in the caller's process; the store only ever sees public keys and signatures.
Keys are files with 0600 permissions; an HSM/KMS signer can replace `Signer` behind the same `sign()` method.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MIN_PASSPHRASE = 8


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def key_id(public_key: bytes) -> str:
    """Short, stable id of a public key: the first 8 bytes of its SHA-256, hex."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    raw = unb64(text)
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
        return True
    except InvalidSignature:
        return False


class KeyFileExposed(PermissionError):
    """A private key file readable by others than its owner."""


class WrongPassphrase(ValueError):
    """The passphrase does not open the encrypted key file (or one was given for a key file that has none)."""


class PassphraseRequired(ValueError):
    """The key file is encrypted and no passphrase was given."""


@dataclass(frozen=True)
class Signer:
    """The acting user's or service's signing key, with who they are and the role they act in."""

    actor: str
    role: str
    _private_key: Ed25519PrivateKey = field(repr=False)
    #: loaded from a passphrase-encrypted key file: the holder gave the passphrase (the second component of
    #: an electronic signature, 21 CFR 11.200; a sign-off needs it)
    passphrase_protected: bool = field(default=False, compare=False)
    public_key: bytes = field(init=False, repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        raw = self._private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        object.__setattr__(self, "public_key", raw)
        object.__setattr__(self, "key_id", key_id(raw))

    @classmethod
    def generate(cls, actor: str, role: str) -> Signer:
        return cls(actor, role, Ed25519PrivateKey.generate())

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], actor: str, role: str, *, passphrase: str | bytes | None = None
    ) -> Signer:
        """Load a private key file, which must be readable by its owner only (as `save` writes it): a key others
        could read can no longer prove who signed. An encrypted key file (``save(passphrase=...)``) needs its
        passphrase (`PassphraseRequired`, `WrongPassphrase`)."""
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise KeyFileExposed(
                f"private key {path} is accessible by group or others (mode {mode:04o}); "
                f"chmod 600 {path}, or better, generate a new key: this one may have been read"
            )
        data = Path(path).read_bytes()
        encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
        if encrypted and passphrase is None:
            raise PassphraseRequired(f"{path} is encrypted: give its passphrase")
        if passphrase is not None and not encrypted:
            raise WrongPassphrase(f"{path} is not encrypted with a passphrase (sle keys generate --passphrase)")
        secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
        try:
            key = serialization.load_pem_private_key(data, password=secret)
        except ValueError as e:
            if encrypted:
                raise WrongPassphrase(f"the passphrase does not open {path}") from None
            raise ValueError(f"{path} does not hold a readable private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return cls(actor, role, key, passphrase_protected=encrypted)

    def save(self, path: str | os.PathLike[str], *, passphrase: str | bytes | None = None) -> None:
        """Write the private key as PEM to a new file readable by the owner only; with a passphrase, encrypted
        by it (PKCS#8, the best encryption `cryptography` offers), as a person's signing key for sign-offs is.

        Refuses (FileExistsError) an existing file or link: a key is never written over something else."""
        if passphrase is not None and len(passphrase) < MIN_PASSPHRASE:
            raise ValueError(f"a passphrase has at least {MIN_PASSPHRASE} characters")
        secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
        encryption = (
            serialization.BestAvailableEncryption(secret) if secret is not None else serialization.NoEncryption()
        )
        pem = self._private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    @property
    def public_key_b64(self) -> str:
        return b64(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)
