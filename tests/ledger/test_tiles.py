"""The ledger as a C2SP tiled transparency log (c2sp.org/tlog-tiles), checked by an independent client.

`TilesClient` below is written from the specs alone (tlog-tiles, tlog-checkpoint, signed-note, RFC 9162 2.1):
it verifies the checkpoint's Ed25519 signature with the vkey, rebuilds the root and inclusion proofs from tiles
and checks that entries hash to the level-0 tiles. It uses hashlib and `cryptography` only, never the ledger's
own Merkle or note code, so a shared bug cannot hide. The log runs on a real database (SQLite and PostgreSQL);
tampering is done by SQL, as a DBA could, or to the bytes in transit.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from sle_events.ledger import Signer
from sle_events.ledger.log import Ledger, LedgerError, events_table
from sle_events.ledger.tiles import (
    ENTRIES_CACHE,
    TILE_CACHE,
    EntryTooLargeError,
    TileNotFoundError,
    TilePathError,
    TileRef,
    entry_bundle,
    format_entry_bundle,
    hash_tile,
    latest_checkpoint_note,
    parse_tile_path,
    serve_checkpoint,
    serve_tile,
    tile_path,
    tiles_for_size,
    write_tiles,
)
from sle_events.signing.envelope import open_sealed

from conftest import execute_sql
from ledger_vectors import load

ORIGIN = "sle.local/ALLOMSC-SLE"


# --------------------------------------------------------------------------- the independent client


class TileCheckFailed(AssertionError):
    """What the client found wrong, and where."""

    def __init__(self, what: str, where: str) -> None:
        super().__init__(f"{where}: {what}")
        self.what, self.where = what, where


def _h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def client_path(level: int | str, n: int, width: int | None = None) -> str:
    """tlog-tiles: N in zero-padded 3-digit elements, all but the last prefixed with 'x'."""
    digits = str(n)
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    encoded = "/".join([*("x" + g for g in groups[:-1]), groups[-1]])
    return f"tile/{level}/{encoded}" + ("" if width is None else f".p/{width}")


def client_verify_note(note: bytes, vkey: str) -> str:
    """signed-note: the text, if the note carries a good Ed25519 signature by the vkey's key."""
    name, key_id_hex, key_b64 = vkey.split("+", 2)
    key = base64.b64decode(key_b64)
    assert key[0] == 0x01 and len(key) == 33, "an Ed25519 vkey"
    key_id = _h(name.encode() + b"\n" + key)[:4]
    assert key_id.hex() == key_id_hex
    text_s = note.decode("utf-8")
    split = text_s.rindex("\n\n")
    text, sig_lines = text_s[: split + 1], text_s[split + 2 :].splitlines()
    good = False
    for line in sig_lines:
        dash, sig_name, sig_b64 = line.split(" ")
        assert dash == "\u2014"
        sig = base64.b64decode(sig_b64)
        if sig_name == name and sig[:4] == key_id:
            try:
                Ed25519PublicKey.from_public_bytes(key[1:]).verify(sig[4:], text.encode())
                good = True
            except InvalidSignature:
                raise TileCheckFailed("bad signature by the log key", "checkpoint") from None
    if not good:
        raise TileCheckFailed("no signature by the log key", "checkpoint")
    return text


def client_open_checkpoint(note: bytes, vkey: str, origin: str) -> tuple[int, bytes]:
    """tlog-checkpoint: origin, size and root from the signed text only."""
    lines = client_verify_note(note, vkey).split("\n")
    if lines[0] != origin:
        raise TileCheckFailed(f"origin {lines[0]!r}", "checkpoint")
    return int(lines[1]), base64.b64decode(lines[2])


class TilesClient:
    """A minimal tlog-tiles client over ``fetch(path) -> bytes``, for one verified checkpoint."""

    def __init__(self, fetch: Callable[[str], bytes], vkey: str, origin: str = ORIGIN) -> None:
        self.fetch = fetch
        self.size, self.root = client_open_checkpoint(fetch("checkpoint"), vkey, origin)
        self._tiles: dict[tuple[int, int], list[bytes]] = {}

    def at(self, size: int, root: bytes) -> TilesClient:
        """The same client for an older checkpoint it verified before."""
        other = TilesClient.__new__(TilesClient)
        other.fetch, other.size, other.root, other._tiles = self.fetch, size, root, {}
        return other

    def tile(self, level: int, n: int) -> list[bytes]:
        """Tile n at level l for this tree: full if the tree covers it, else the partial one of its size."""
        if (level, n) not in self._tiles:
            per_hash = 256**level
            full = (n + 1) * 256 * per_hash <= self.size
            width = 256 if full else (self.size // per_hash) % 256
            if width == 0 or (n != self.size // (256 * per_hash) and not full):
                raise AssertionError(f"tile {level}/{n} is not part of a tree of {self.size}")
            path = client_path(level, n, None if full else width)
            data = self.fetch(path)
            if len(data) != 32 * width:
                raise TileCheckFailed(f"{len(data)} bytes, want {32 * width}", path)
            self._tiles[(level, n)] = [data[i : i + 32] for i in range(0, len(data), 32)]
        return self._tiles[(level, n)]

    def mth(self, lo: int, hi: int) -> bytes:
        """RFC 9162 MTH(D[lo:hi]) using tiles: aligned subtrees of 256**l leaves are read from level l."""
        n = hi - lo
        if n == 0:
            return _h()
        if n & (n - 1) == 0 and lo % n == 0:
            k = n.bit_length() - 1
            level, r = divmod(k, 8)
            start = lo >> (8 * level)  # index of the first level-l hash
            hashes = self.tile(level, start // 256)[start % 256 : start % 256 + (1 << r)]
            while len(hashes) > 1:
                hashes = [_h(b"\x01", hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
            return hashes[0]
        k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two smaller than n
        return _h(b"\x01", self.mth(lo, lo + k), self.mth(lo + k, hi))

    def check_root(self) -> None:
        if self.mth(0, self.size) != self.root:
            raise TileCheckFailed("the tiles do not hash to the checkpoint's root", f"tree of {self.size}")

    def inclusion_proof(self, m: int) -> list[bytes]:
        """RFC 9162 2.1.3.1 PATH(m, D[0:size]) from tiles."""

        def path(m: int, lo: int, hi: int) -> list[bytes]:
            n = hi - lo
            if n == 1:
                return []
            k = 1 << ((n - 1).bit_length() - 1)
            if m < k:
                return [*path(m, lo, lo + k), self.mth(lo + k, hi)]
            return [*path(m - k, lo + k, hi), self.mth(lo, lo + k)]

        return path(m, 0, self.size)

    def check_inclusion(self, m: int, entry: bytes) -> list[bytes]:
        """RFC 9162 2.1.3.2: the entry at m with the proof from tiles leads to the checkpoint's root."""
        proof = self.inclusion_proof(m)
        fn, sn, r = m, self.size - 1, _h(b"\x00", entry)
        for p in proof:
            if sn == 0:
                raise TileCheckFailed("proof too long", f"leaf {m}")
            if fn & 1 or fn == sn:
                r = _h(b"\x01", p, r)
                if not fn & 1:
                    while fn & 1 == 0 and fn != 0:
                        fn, sn = fn >> 1, sn >> 1
            else:
                r = _h(b"\x01", r, p)
            fn, sn = fn >> 1, sn >> 1
        if sn != 0 or r != self.root:
            raise TileCheckFailed("inclusion proof does not lead to the root", f"leaf {m}")
        return proof

    def entries(self, n: int) -> list[bytes]:
        """Entry bundle n, each entry checked against the level-0 tile's hash."""
        hashes = self.tile(0, n)
        path = client_path("entries", n, None if len(hashes) == 256 else len(hashes))
        data, out, i = self.fetch(path), [], 0
        while i < len(data):
            length = int.from_bytes(data[i : i + 2], "big")
            out.append(data[i + 2 : i + 2 + length])
            i += 2 + length
        if i != len(data) or len(out) != len(hashes):
            raise TileCheckFailed(f"{len(out)} entries for {len(hashes)} hashes", path)
        for j, (entry, h) in enumerate(zip(out, hashes, strict=True)):
            if _h(b"\x00", entry) != h:
                raise TileCheckFailed(f"entry {j} does not hash to the level-0 tile", path)
        return out

    def audit(self, entries: bool = True) -> int:
        """Every tile of the tree: each hash of a level l+1 tile is the MTH of the full level-l tile below it,
        the root follows, and (with ``entries``) every bundle matches its level-0 tile. Returns tiles read."""
        level = 0
        while self.size >= 256**level:
            tiles = -(-(self.size // 256**level) // 256)
            for n in range(tiles):
                hashes = self.tile(level, n)
                if len(hashes) == 256:  # a full tile is one hash of the level above
                    above = self.tile(level + 1, n // 256)[n % 256]
                    top = hashes
                    while len(top) > 1:
                        top = [_h(b"\x01", top[i], top[i + 1]) for i in range(0, len(top), 2)]
                    if top[0] != above:
                        raise TileCheckFailed(f"its hash in tile {level + 1}/{n // 256} differs", client_path(level, n))
                if entries and level == 0:
                    self.entries(n)
            level += 1
        self.check_root()
        return len(self._tiles)


# --------------------------------------------------------------------------- building logs


def add_events(url: str, n: int, size: int = 64) -> None:
    """n synthetic events behind the ledger: the sequencer logs the stored bytes as opaque leaves."""
    rows = [
        {
            "originator_id": uuid.uuid4(),
            "originator_version": 1,
            "topic": "synthetic",
            "state": b'{"synthetic":' + str(i).encode() + b"}" + os.urandom(size),
        }
        for i in range(n)
    ]
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for k in range(0, n, 10000):
                conn.execute(events_table().insert(), rows[k : k + 10000])
    finally:
        engine.dispose()


def served(ledger: Ledger) -> Callable[[str], bytes]:
    def fetch(path: str) -> bytes:
        return (serve_checkpoint(ledger) if path == "checkpoint" else serve_tile(ledger, path)).body

    return fetch


def grow(ledger: Ledger, signer: Signer, size: int) -> None:
    ledger.integrate(size - ledger.size)
    assert ledger.size == size
    ledger.checkpoint(signer)


def log_of_300(trial) -> tuple[Ledger, Signer]:
    """The study's 4 signed events and 296 synthetic ones, checkpointed: tiles 0/000, 0/001.p/44, 1/000.p/1."""
    add_events(trial.url, 296)
    signer = Signer.generate(ORIGIN)
    ledger = Ledger(trial.url)
    grow(ledger, signer, 300)
    return ledger, signer


# --------------------------------------------------------------------------- paths (no database)


def test_paths_follow_the_spec_examples():
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tile_path(0, 1234067, 5) == "tile/0/x001/x234/067.p/5"
    assert tile_path("entries", 0) == "tile/entries/000"
    assert tile_path(2, 1000, 255) == "tile/2/x001/000.p/255"
    assert parse_tile_path("tile/0/x001/x234/067") == TileRef(0, 1234067)
    assert parse_tile_path("tile/entries/x001/000.p/1") == TileRef(None, 1000, 1)
    assert parse_tile_path("tile/63/999") == TileRef(63, 999)
    # tlog-tiles: a tree of 70,000 = 273 full level-0 tiles, a partial one of 112, one full level-1 tile,
    # a partial one of 17 and a partial level-2 tile of 1; a tree of 256 = one full tile, 1/000.p/1.
    tiles = [t.path for t in tiles_for_size(70_000)]
    assert len(tiles) == 273 + 1 + 1 + 1 + 1
    assert tiles[-5:] == ["tile/0/272", "tile/0/273.p/112", "tile/1/000", "tile/1/001.p/17", "tile/2/000.p/1"]
    assert [t.path for t in tiles_for_size(256)] == ["tile/0/000", "tile/1/000.p/1"]
    assert list(tiles_for_size(0)) == []


@given(st.one_of(st.none(), st.integers(0, 63)), st.integers(0, 2**63 - 1), st.one_of(st.none(), st.integers(1, 255)))
def test_path_round_trip_and_the_client_agrees(level, index, width):
    path = tile_path("entries" if level is None else level, index, width)
    assert path == client_path("entries" if level is None else level, index, width)
    assert parse_tile_path(path) == TileRef(level, index, width)
    assert TileRef(level, index, width).path == path


@pytest.mark.parametrize(
    "path",
    [
        "tile/00/000",  # leading zero in the level
        "tile/64/000",  # level above 63
        "tile/-1/000",
        "tile/a/000",
        "tile/0/1",  # index not 3 digits
        "tile/0/0000",
        "tile/0/x000/001",  # not the shortest form
        "tile/0/001/002",  # upper group without x
        "tile/0/001/x002",  # last group with x
        "tile/0/x1/002",
        "tile/0/000.p/0",  # empty partial tile
        "tile/0/000.p/256",
        "tile/0/000.p/01",
        "tile/0/000.p",
        "tile/0/000.p/",
        "tile/0/000.p/5/6",
        "tile/0/000/",
        "tile/0/",
        "tile/0",
        "tile/entries",
        "tile/entries/x001",
        "/tile/0/000",
        "tiles/0/000",
        "checkpoint",
        "tile/0/" + "x999/" * 40 + "000",  # too long
        "tile/0/\uff10\uff10\uff10",  # non-ASCII (fullwidth) digits
    ],
)
def test_malformed_paths_are_refused_with_a_clear_error(path):
    with pytest.raises(TilePathError) as e:
        parse_tile_path(path)
    assert "tile" in str(e.value)


@pytest.mark.parametrize(
    ("level", "index", "width"),
    [(64, 0, None), (-1, 0, None), (0, -1, None), (0, 0, 0), (0, 0, 256), (True, 0, None), (0, 1.0, None), ("x", 0, 1)],
)
def test_bad_tile_arguments_are_refused(level, index, width):
    with pytest.raises(TilePathError):
        tile_path(level, index, width)


def test_an_entry_longer_than_a_uint16_cannot_be_bundled():
    assert format_entry_bundle([b"", b"ab"]) == b"\x00\x00\x00\x02ab"
    assert len(format_entry_bundle([b"x" * 0xFFFF])) == 0x10001
    with pytest.raises(EntryTooLargeError, match="65535"):
        format_entry_bundle([b"x" * 0x10000])


# --------------------------------------------------------------------------- served from the database


@pytest.mark.storage
def test_tiles_of_growing_trees_verify_with_the_independent_client(trial):
    """Sizes 0, 1, 4 (the study's own signed events), 255, 256, 257, 300 and 513: each checkpoint's root is
    rebuilt from tiles, entries hash to the level-0 tiles, inclusion proofs from tiles match the ledger's, and
    a client still holding an older checkpoint can verify it against the grown log."""
    add_events(trial.url, 509)
    signer = Signer.generate(ORIGIN)
    ledger = Ledger(trial.url)
    with pytest.raises(TileNotFoundError, match="no checkpoint"):
        serve_checkpoint(ledger)
    with pytest.raises(TileNotFoundError):
        serve_tile(ledger, "tile/0/000.p/1")
    older: list[tuple[int, bytes]] = []
    for size in (0, 1, 4, 255, 256, 257, 300, 513):
        grow(ledger, signer, size)
        client = TilesClient(served(ledger), signer.vkey)
        assert (client.size, client.root) == (size, ledger.root_at(size))
        tiles = client.audit()
        assert tiles == len(list(tiles_for_size(size)))
        for m in sorted({0, size // 2, size - 1}) if size else []:
            entry = client.entries(m // 256)[m % 256]
            proof = client.check_inclusion(m, entry)
            assert tuple(proof) == ledger.inclusion_proof(index=m).hashes
        for old_size, old_root in older:  # the partial tiles of every earlier checkpoint are still served
            client.at(old_size, old_root).audit()
        older.append((size, client.root))
    first = TilesClient(served(ledger), signer.vkey).entries(0)[0]
    assert open_sealed(first).envelope["type"] == "Study.Created"  # an entry is the sealed event as stored


@pytest.mark.storage
def test_serving_headers_and_the_checkpoint_body(trial):
    signer = Signer.generate(ORIGIN)
    ledger = Ledger(trial.url)
    grow(ledger, signer, 4)
    cp = serve_checkpoint(ledger)
    stored = ledger.latest_checkpoint()
    assert stored is not None
    assert cp.body.decode() == latest_checkpoint_note(ledger) == stored.note
    assert cp.body.decode().startswith(f"{ORIGIN}\n4\n")
    assert cp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "no-cache" in cp.headers["Cache-Control"]
    tile = serve_tile(ledger, "tile/0/000.p/4")
    assert tile.headers == {"Content-Type": "application/octet-stream", "Cache-Control": TILE_CACHE}
    assert tile.body == hash_tile(ledger, 0, 0, 4) and len(tile.body) == 4 * 32
    bundle = serve_tile(ledger, "tile/entries/000.p/4")
    assert bundle.cache_control == ENTRIES_CACHE and "private" in ENTRIES_CACHE and "immutable" in TILE_CACHE
    assert bundle.body == entry_bundle(ledger, 0, 4)
    assert serve_tile(ledger, "tile/0/000.p/2").body == tile.body[:64]  # a narrower partial tile is a prefix


@pytest.mark.storage
def test_only_tiles_covered_by_the_latest_checkpoint_are_served(trial):
    ledger, signer = log_of_300(trial)
    ledger.integrate()  # integrated but not checkpointed: still not served
    assert ledger.size == 300
    add_events(trial.url, 300)
    ledger.integrate()
    assert ledger.size == 600
    assert len(serve_tile(ledger, "tile/0/001.p/44").body) == 44 * 32
    assert len(serve_tile(ledger, "tile/entries/000").body) > 256 * 2
    for path in [
        "tile/0/001",  # full tile needs 512 leaves
        "tile/0/001.p/45",
        "tile/entries/001",
        "tile/entries/001.p/45",
        "tile/1/000.p/2",
        "tile/1/000",
        "tile/2/000.p/1",
        "tile/0/x001/000",
        "tile/63/000",
    ]:
        with pytest.raises(TileNotFoundError, match="not covered"):
            serve_tile(ledger, path)
    with pytest.raises(TileNotFoundError, match="not covered"):
        hash_tile(ledger, 0, 0, size=301)
    assert len(hash_tile(ledger, 0, 0, 100, size=100)) == 3200
    with pytest.raises(TileNotFoundError):
        hash_tile(ledger, 0, 0, 101, size=100)
    grow(ledger, signer, 600)
    assert len(serve_tile(ledger, "tile/0/001").body) == 8192


@pytest.mark.storage
def test_a_tampered_tile_is_detected_by_the_client(trial):
    ledger, signer = log_of_300(trial)
    fetch = served(ledger)
    TilesClient(fetch, signer.vkey).audit()

    def flipping(target: str, at: int = 0) -> Callable[[str], bytes]:
        def tampered(path: str) -> bytes:
            data = fetch(path)
            if path == target:
                data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
            return data

        return tampered

    # in transit: a hash of a level-0 tile, a level-1 tile, an entry, the checkpoint's signature
    with pytest.raises(TileCheckFailed) as e:
        TilesClient(flipping("tile/0/000", 32 * 7), signer.vkey).audit(entries=False)
    assert e.value.where == "tile/0/000"
    with pytest.raises(TileCheckFailed, match="root"):
        TilesClient(flipping("tile/1/000.p/1"), signer.vkey).check_root()
    with pytest.raises(TileCheckFailed, match="entry 0 does not hash"):
        TilesClient(flipping("tile/entries/000", 2), signer.vkey).entries(0)
    entry = TilesClient(fetch, signer.vkey).entries(1)[0]
    with pytest.raises(TileCheckFailed, match="inclusion"):
        TilesClient(flipping("tile/0/001.p/44", 32), signer.vkey).check_inclusion(256, entry)
    note = fetch("checkpoint")
    with pytest.raises(TileCheckFailed, match="signature"):
        TilesClient(lambda p: note.replace(b"\n300\n", b"\n299\n") if p == "checkpoint" else fetch(p), signer.vkey)
    with pytest.raises(TileCheckFailed, match="no signature"):
        TilesClient(fetch, Signer.generate(ORIGIN).vkey)

    # at the source: a DBA edits a stored subtree hash (level 8 = tile/1) and a leaf hash
    execute_sql(trial.url, "update ledger_nodes set hash = :h where level = 8 and idx = 0", h=b"\x07" * 32)
    with pytest.raises(TileCheckFailed, match="root"):
        TilesClient(fetch, signer.vkey).check_root()
    with pytest.raises(TileCheckFailed, match="differs") as e:
        TilesClient(fetch, signer.vkey).audit(entries=False)
    assert e.value.where == "tile/0/000"


@pytest.mark.storage
def test_altered_or_deleted_events_make_their_bundle_unservable(trial):
    """Hash tiles stay servable (and verify); the bundle holding the altered event is refused, never served."""
    ledger, signer = log_of_300(trial)
    with ledger.engine.connect() as conn:
        positions = list(conn.execute(sa.text("select position from ledger_leaves order by idx")).scalars())
    execute_sql(
        trial.url, "update study_events set state = :s where id = :p", s=b'{"synthetic":"edited"}', p=positions[10]
    )
    with pytest.raises(LedgerError, match="altered after it was logged"):
        serve_tile(ledger, "tile/entries/000")
    execute_sql(trial.url, "delete from study_events where id = :p", p=positions[270])
    with pytest.raises(LedgerError, match="is gone"):
        serve_tile(ledger, "tile/entries/001.p/44")
    client = TilesClient(served(ledger), signer.vkey)
    client.audit(entries=False)
    execute_sql(trial.url, "delete from ledger_leaves where idx = 299")
    with pytest.raises(LedgerError, match="missing"):
        serve_tile(ledger, "tile/0/001.p/44")
    with pytest.raises(LedgerError, match="missing"):
        serve_tile(ledger, "tile/entries/001.p/44")


@pytest.mark.storage
def test_an_event_too_long_for_a_bundle_is_refused_but_its_hash_is_served(trial):
    engine = sa.create_engine(trial.url)
    with engine.begin() as conn:
        conn.execute(
            events_table().insert(),
            [{"originator_id": uuid.uuid4(), "originator_version": 1, "topic": "synthetic", "state": b"x" * 70_000}],
        )
    engine.dispose()
    signer = Signer.generate(ORIGIN)
    ledger = Ledger(trial.url)
    grow(ledger, signer, 5)
    with pytest.raises(EntryTooLargeError, match="70000 bytes"):
        serve_tile(ledger, "tile/entries/000.p/5")
    assert len(serve_tile(ledger, "tile/entries/000.p/4").body) > 4 * 2
    TilesClient(served(ledger), signer.vkey).audit(entries=False)


@pytest.mark.storage
def test_static_export_is_a_tile_tree_the_client_verifies(trial, tmp_path):
    ledger, signer = log_of_300(trial)
    out = tmp_path / "log"
    progress: list[tuple[int, int]] = []
    written = write_tiles(ledger, out, entries=True, on_progress=lambda d, t: progress.append((d, t)))
    assert (written.size, written.tiles, written.bundles) == (300, 3, 2)
    assert progress[-1] == (5, 5)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "checkpoint",
        "tile/0/000",
        "tile/0/001.p/44",
        "tile/1/000.p/1",
        "tile/entries/000",
        "tile/entries/001.p/44",
    ]
    assert written.bytes == sum((out / f).stat().st_size for f in files)
    client = TilesClient(lambda p: (out / p).read_bytes(), signer.vkey)
    client.audit()
    assert client.check_inclusion(299, client.entries(1)[43])
    hashes_only = tmp_path / "public"
    write_tiles(ledger, hashes_only)
    assert not (hashes_only / "tile" / "entries").exists()  # study data only on request
    TilesClient(lambda p: (hashes_only / p).read_bytes(), signer.vkey).audit(entries=False)


@pytest.mark.storage
def test_a_tree_of_more_than_65536_leaves(db_url, tmp_path):
    """Three levels of tiles (a level-2 tile appears at 65,536 leaves); bounded to 65,536 + 300 leaves."""
    from sle_events.store.record import StudyRecord

    record = StudyRecord(db_url)  # the events table
    record.close()
    record.engine.dispose()
    n = 65_536 + 300
    add_events(db_url, n, size=16)
    signer = Signer.generate(ORIGIN)
    ledger = Ledger(db_url)
    grow(ledger, signer, 65_536)
    client = TilesClient(served(ledger), signer.vkey)
    client.check_root()
    assert client.tile(2, 0) == [ledger.get_node(16, 0)]  # tile/2/000.p/1: the root of the first 65536 leaves
    grow(ledger, signer, n)
    client = TilesClient(served(ledger), signer.vkey)
    assert client.audit(entries=False) == len(list(tiles_for_size(n))) == 258 + 2 + 1
    for m in (0, 65_535, 65_536, n - 1):
        entry = client.entries(m // 256)[m % 256]
        client.check_inclusion(m, entry)
    ledger.close()


def test_client_inclusion_check_matches_the_rfc_on_a_memory_tree():
    """The client's own RFC 9162 code against a plain in-memory tile server, every index of small trees."""
    for size in (1, 2, 3, 7, 256, 257, 600):
        leaves = [str(i).encode() for i in range(size)]
        level0 = [_h(b"\x00", x) for x in leaves]
        levels = [level0]
        while len(levels[-1]) >= 256:
            below = levels[-1]
            row = []
            for t in range(len(below) // 256):
                top = below[t * 256 : (t + 1) * 256]
                while len(top) > 1:
                    top = [_h(b"\x01", top[i], top[i + 1]) for i in range(0, len(top), 2)]
                row.append(top[0])
            levels.append(row)

        def fetch(path: str, levels: list[list[bytes]] = levels, leaves: list[bytes] = leaves) -> bytes:
            ref = parse_tile_path(path)
            if ref.level is None:
                return format_entry_bundle(leaves[ref.start : ref.start + ref.count])
            return b"".join(levels[ref.level][ref.start : ref.start + ref.count])

        def root(lo: int, hi: int, level0: list[bytes] = level0) -> bytes:
            if hi - lo == 1:
                return level0[lo]
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            return _h(b"\x01", root(lo, lo + k), root(lo + k, hi))

        client = TilesClient.__new__(TilesClient)
        client.fetch, client.size, client.root, client._tiles = fetch, size, root(0, size), {}
        client.audit()
        for m in range(size):
            client.check_inclusion(m, leaves[m])
        with pytest.raises(TileCheckFailed):
            client.check_inclusion(0, b"not the leaf")


def test_no_tile_path_is_a_folder_of_another():
    # the folder layout never has a file and a directory of the same name: 000 (full) and 000.p/ (partial)
    paths = [t.path for t in tiles_for_size(70_000)] + [tile_path("entries", 273, 112)]
    names = set(paths)
    for p in paths:
        parts = p.split("/")
        assert not any("/".join(parts[:k]) in names for k in range(1, len(parts)))


@pytest.mark.storage
def test_cli_writes_the_static_tile_tree(trial, tmp_path):
    from typer.testing import CliRunner

    from sle_events.cli.main import app

    def sle(*args: str):
        env = {"SLE_DATABASE_URL": None, "SLE_LOG_KEY": None, "SLE_LOG_ORIGIN": None, "COLUMNS": "80"}
        return CliRunner().invoke(app, ["ledger", *args], env=env)

    out = tmp_path / "log"
    add_events(trial.url, 296)
    Ledger(trial.url).close()
    r = sle("tiles", "--out", str(out), "--db", trial.url)
    assert r.exit_code == 1 and "no checkpoint" in r.output and not out.exists()
    signer = Signer.generate(ORIGIN)
    with Ledger(trial.url) as ledger:
        grow(ledger, signer, 300)
    r = sle("tiles", "--out", str(out), "--db", trial.url, "--entries")
    assert r.exit_code == 0, r.output
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert r.output == f"tree size 300: 3 hash tiles, 2 entry bundles, {size} bytes in {out}\n"
    TilesClient(lambda p: (out / p).read_bytes(), signer.vkey).audit()
    (tmp_path / "file").write_text("")
    r = sle("tiles", "--out", str(tmp_path / "file"), "--db", trial.url)
    assert r.exit_code == 2 and "not a folder" in r.output
    r = sle("tiles", "--out", str(out), "--db", trial.url, "--entires")
    assert r.exit_code == 2 and "Traceback" not in r.output


@pytest.mark.storage
@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("update ledger_nodes set hash = :h where level = 8 and idx = 0", "hash 0 of tile/1/000.p/1 is not the root"),
        ("update ledger_leaves set leaf_hash = :h where idx = 5", "hash 0 of tile/1/000.p/1 is not the root"),
        ("update ledger_leaves set leaf_hash = :h where idx = 299", "do not hash to the checkpoint's root"),
        ("update ledger_checkpoints set root = :h", "differs from its own note"),
    ],
)
def test_an_export_of_altered_ledger_tables_is_refused_and_writes_nothing(trial, tmp_path, sql, problem):
    ledger, _ = log_of_300(trial)
    out = tmp_path / "log"
    write_tiles(ledger, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    execute_sql(trial.url, sql, h=b"\x07" * 32)
    with pytest.raises(LedgerError, match=problem):
        write_tiles(ledger, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the good export is kept


def test_the_client_verifies_the_c2sp_signed_note_example():
    example = load("signed_note.json")["c2sp"]["signed_note_example"]
    assert client_verify_note(example["note"].encode(), example["vkey"]) == example["expect_text"]
    with pytest.raises(TileCheckFailed, match="bad signature"):
        client_verify_note(example["note"].replace("example", "exemple", 1).encode(), example["vkey"])


@pytest.mark.storage
def test_tiles_of_the_reference_tree_give_its_published_roots(db_url):
    """transparency-dev/merkle's reference tree (8 leaf inputs, the empty one too, and the root of every
    prefix) logged as events: tiles, bundles and the client's roots match the published values."""
    from sle_events.store.record import StudyRecord

    ref = load("merkle_reference_tree.json")["reference_tree"]
    leaves = [bytes.fromhex(x) for x in ref["leaf_inputs_hex"]]
    record = StudyRecord(db_url)
    record.close()
    record.engine.dispose()
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        for leaf in leaves:  # one by one: ids in this order
            row = {"originator_id": uuid.uuid4(), "originator_version": 1, "topic": "synthetic", "state": leaf}
            conn.execute(events_table().insert(), [row])
    engine.dispose()
    signer = Signer.generate(ORIGIN)
    with Ledger(db_url) as ledger:
        for size in range(len(leaves) + 1):
            grow(ledger, signer, size)
            client = TilesClient(served(ledger), signer.vkey)
            assert client.root.hex() == ref["root_hashes_hex"][size]
            client.audit()
            if size:
                assert serve_tile(ledger, tile_path(0, 0, size)).body.hex() == "".join(ref["node_hashes_hex"][0][:size])
                assert client.entries(0) == leaves[:size]
