"""The ledger served as a C2SP tiled transparency log (c2sp.org/tlog-tiles), read-only.

Resources, all relative to the log's URL prefix (see ``docs/tlog-tiles.md``):

* ``checkpoint`` -- the latest signed checkpoint note (c2sp.org/tlog-checkpoint), as `Ledger.checkpoint` stored it.
* ``tile/<L>/<N>[.p/<W>]`` -- hash tiles: the ``W`` (full: 256) consecutive Merkle tree hashes
  ``MTH(D[(N*256 + i) * 256**L : (N*256 + i + 1) * 256**L])``, 32 bytes each, concatenated. Level ``L`` holds
  the hashes of perfect subtrees of ``2**(8L)`` leaves: ``ledger_leaves`` for L = 0, ``ledger_nodes`` at level
  ``8L`` above (stored for every perfect subtree, so no hashing is needed to serve a tile).
* ``tile/entries/<N>[.p/<W>]`` -- entry bundles: each entry as a big-endian uint16 length and its bytes. An
  *entry* is the leaf input the ledger hashes, i.e. the event's stored ``state`` (the sealed, signed envelope),
  so ``SHA-256(0x00 || entry)`` is the hash at the same place in the level-0 tile.

``<N>`` is written in 3-digit groups, all but the last prefixed with ``x`` (1234067 -> ``x001/x234/067``); only
the shortest form is accepted, so one resource has one path. A tile is served only when every hash in it is
covered by the latest checkpoint's tree size; a partial tile of any width whose hashes are all covered is
served (its bytes never change in an append-only log, so a client holding an older checkpoint still gets the
partial tiles of its size). Everything else is :class:`TileNotFoundError`; a malformed path is
:class:`TilePathError`; ledger tables that cannot produce a covered tile (rows missing, an event altered or
gone) raise :class:`~sle_events.ledger.base.LedgerError`: the log never serves bytes it knows to be wrong.

HTTP mapping for the API: ``TilePathError`` and ``TileNotFoundError`` -> 404 (tlog-tiles clients treat any
missing resource alike), ``LedgerError`` -> 500. Headers: :class:`ServedResource`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .base import LedgerError, StoredCheckpoint
from .checkpoint import MAX_TREE_SIZE
from .merkle import HASH_SIZE, leaf_hash, pair_level, root_at
from .tables import ledger_leaves, ledger_nodes

if TYPE_CHECKING:
    from .base import LedgerBase

__all__ = [
    "TILE_WIDTH",
    "TILE_HEIGHT",
    "MAX_ENTRY_BYTES",
    "CHECKPOINT_MEDIA_TYPE",
    "TILE_MEDIA_TYPE",
    "TileError",
    "TilePathError",
    "TileNotFoundError",
    "EntryTooLargeError",
    "TileRef",
    "ServedResource",
    "WrittenTiles",
    "tile_path",
    "parse_tile_path",
    "tiles_for_size",
    "latest_checkpoint_note",
    "hash_tile",
    "entry_bundle",
    "read_tile",
    "format_entry_bundle",
    "serve_checkpoint",
    "serve_tile",
    "write_tiles",
]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
"""Hashes (or entries) in a full tile."""
MAX_LEVEL = 63
MAX_ENTRY_BYTES = 0xFFFF
"""Longest entry a bundle can carry (uint16 length prefix)."""

CHECKPOINT_MEDIA_TYPE = "text/plain; charset=utf-8"
TILE_MEDIA_TYPE = "application/octet-stream"
CHECKPOINT_CACHE = "no-cache, max-age=0"
"""The checkpoint changes with every signing: caches must revalidate (tlog-tiles: no caching beyond seconds)."""
TILE_CACHE = "max-age=31536000, immutable"
"""A tile's bytes are fixed by its path in an append-only log (partial ones too: width W names W fixed hashes)."""
ENTRIES_CACHE = "private, max-age=31536000, immutable"
"""Entries are the signed events (study data): immutable, but never kept by a shared cache."""

_MAX_PATH = 128  # the longest valid path (level 63, 7 index groups, .p/255) is ~40 characters
_LEVEL_RE = re.compile(r"0|[1-9][0-9]?")
_WIDTH_RE = re.compile(r"[1-9][0-9]{0,2}")
_GROUP_RE = re.compile(r"x[0-9]{3}")
_LAST_RE = re.compile(r"[0-9]{3}")


class TileError(ValueError):
    """A tile request that cannot be answered (base of the two below)."""


class TilePathError(TileError):
    """The path is not a tlog-tiles resource path (malformed level, index or width)."""


class TileNotFoundError(TileError):
    """A well-formed tile that the latest checkpoint does not cover (or no checkpoint was issued yet)."""


class EntryTooLargeError(LedgerError):
    """An entry longer than 65535 bytes cannot be put in a bundle (its length prefix is a uint16)."""


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True, slots=True)
class TileRef:
    """One tlog-tiles resource: a hash tile at ``level`` or, with ``level`` None, an entry bundle.
    ``width`` None is a full tile (256 hashes/entries); 1..255 a partial one."""

    level: int | None
    index: int
    width: int | None = None

    def __post_init__(self) -> None:
        if self.level is not None and (
            not isinstance(self.level, int) or isinstance(self.level, bool) or not 0 <= self.level <= MAX_LEVEL
        ):
            raise TilePathError(f"tile level must be an integer from 0 to {MAX_LEVEL}, not {self.level!r}")
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise TilePathError(f"tile index must be a non-negative integer, not {self.index!r}")
        if self.width is not None and (
            not isinstance(self.width, int) or isinstance(self.width, bool) or not 0 < self.width < TILE_WIDTH
        ):
            raise TilePathError(f"partial tile width must be from 1 to {TILE_WIDTH - 1}, not {self.width!r}")

    @property
    def is_entries(self) -> bool:
        return self.level is None

    @property
    def count(self) -> int:
        """Hashes (or entries) in this tile."""
        return TILE_WIDTH if self.width is None else self.width

    @property
    def start(self) -> int:
        """Index of the first hash at the tile's level (for entries and level 0: the first leaf index)."""
        return self.index * TILE_WIDTH

    @property
    def leaves_per_hash(self) -> int:
        return 1 << (TILE_HEIGHT * (self.level or 0))

    def covered_by(self, size: int) -> bool:
        """Whether a tree of ``size`` leaves contains every subtree this tile lists."""
        return (self.start + self.count) * self.leaves_per_hash <= size

    @property
    def path(self) -> str:
        return tile_path("entries" if self.level is None else self.level, self.index, self.width)

    def __str__(self) -> str:
        return self.path


def _encode_index(index: int) -> str:
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    return "/".join(reversed(groups))


def tile_path(level: int | Literal["entries"], index: int, width: int | None = None) -> str:
    """``tile/<L>/<N>[.p/<W>]`` (``level="entries"``: ``tile/entries/<N>[.p/<W>]``), e.g.
    ``tile_path(0, 1234067, 5) == "tile/0/x001/x234/067.p/5"``. Bad arguments raise :class:`TilePathError`."""
    ref = TileRef(None if level == "entries" else level, index, width)
    name = "entries" if ref.level is None else str(ref.level)
    suffix = "" if ref.width is None else f".p/{ref.width}"
    return f"tile/{name}/{_encode_index(ref.index)}{suffix}"


def parse_tile_path(path: str) -> TileRef:
    """The :class:`TileRef` named by ``tile/<L>/<N>[.p/<W>]`` or ``tile/entries/<N>[.p/<W>]`` (relative to the
    log's prefix, no leading slash). Anything but the canonical encoding raises :class:`TilePathError`."""
    if not isinstance(path, str):
        raise TilePathError("a tile path must be a string")
    if len(path) > _MAX_PATH:
        raise TilePathError(f"tile path too long ({len(path)} characters)")
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise TilePathError(f"{path!r} is not a tile path (tile/<level>/<index>[.p/<width>])")
    level_s, groups = parts[1], parts[2:]
    if level_s == "entries":
        level = None
    elif _LEVEL_RE.fullmatch(level_s) and int(level_s) <= MAX_LEVEL:
        level = int(level_s)
    else:
        raise TilePathError(f"{path!r}: tile level {level_s!r} is not a decimal from 0 to {MAX_LEVEL}")
    width = None
    if len(groups) >= 2 and groups[-2].endswith(".p"):
        width_s = groups[-1]
        if not _WIDTH_RE.fullmatch(width_s) or int(width_s) >= TILE_WIDTH:
            raise TilePathError(f"{path!r}: partial tile width {width_s!r} is not a decimal from 1 to 255")
        width = int(width_s)
        groups = [*groups[:-2], groups[-2][:-2]]
    *upper, last = groups
    if not _LAST_RE.fullmatch(last) or not all(_GROUP_RE.fullmatch(g) for g in upper):
        raise TilePathError(
            f"{path!r}: the tile index must be 3-digit groups, all but the last starting with 'x' (x001/x234/067)"
        )
    if upper and upper[0] == "x000":
        raise TilePathError(f"{path!r}: the tile index has a leading x000 group (not the shortest form)")
    index = int("".join(g[1:] for g in upper) + last)
    return TileRef(level, index, width)


def tiles_for_size(size: int) -> Iterator[TileRef]:
    """Every hash tile of a tree of ``size`` leaves, level by level: the full ones, then the level's partial
    tile (width ``floor(size / 256**L) mod 256``) if not empty. A tree of 256 leaves: 0/000 and 1/000.p/1."""
    if not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise ValueError(f"tree size {size!r} out of range")
    level = 0
    while size >> (TILE_HEIGHT * level):
        hashes = size >> (TILE_HEIGHT * level)  # perfect subtrees of 256**level leaves
        for n in range(hashes // TILE_WIDTH):
            yield TileRef(level, n)
        if hashes % TILE_WIDTH:
            yield TileRef(level, hashes // TILE_WIDTH, hashes % TILE_WIDTH)
        level += 1


# --------------------------------------------------------------------------- reading the ledger


def _latest(ledger: LedgerBase, conn: Connection) -> StoredCheckpoint:
    latest = ledger._latest_checkpoint(conn)
    if latest is None:
        raise TileNotFoundError("no checkpoint has been issued yet: run `sle ledger checkpoint`")
    return latest


def latest_checkpoint_note(ledger: LedgerBase) -> str:
    """The body of ``<prefix>/checkpoint``: the latest signed checkpoint note, exactly as it was signed."""
    with ledger.engine.connect() as conn:
        return _latest(ledger, conn).note


def _covered_size(ledger: LedgerBase, conn: Connection, size: int | None) -> int:
    latest = _latest(ledger, conn).size
    if size is None:
        return latest
    if not isinstance(size, int) or not 0 <= size <= latest:
        raise TileNotFoundError(f"tree size {size} is not covered by the latest checkpoint (size {latest})")
    return size


def _check_covered(ref: TileRef, size: int) -> None:
    if not ref.covered_by(size):
        raise TileNotFoundError(f"{ref.path} is not covered by the checkpoint's tree of {size} leaves")


def _hashes(conn: Connection, level: int, start: int, count: int) -> list[bytes]:
    """The stored hashes of perfect subtrees ``start .. start+count-1`` of ``256**level`` leaves each."""
    if level == 0:
        idx, query = ledger_leaves.c.idx, sa.select(ledger_leaves.c.idx, ledger_leaves.c.leaf_hash)
    else:
        idx = ledger_nodes.c.idx
        query = sa.select(idx, ledger_nodes.c.hash).where(ledger_nodes.c.level == TILE_HEIGHT * level)
    rows = conn.execute(query.where(idx >= start, idx < start + count).order_by(idx)).tuples().all()
    if [i for i, _ in rows] != list(range(start, start + count)):
        raise LedgerError(
            f"ledger hashes of level {TILE_HEIGHT * level} from {start} to {start + count - 1} are missing: "
            "the ledger tables were altered; run `sle verify`"
        )
    out = [bytes(h) for _, h in rows]
    if any(len(h) != HASH_SIZE for h in out):
        raise LedgerError(
            f"a stored ledger hash of level {TILE_HEIGHT * level} is not {HASH_SIZE} bytes: run `sle verify`"
        )
    return out


def _entries(ledger: LedgerBase, conn: Connection, start: int, count: int) -> list[bytes]:
    """The leaf inputs (events' stored bytes) of leaves ``start .. start+count-1``, each checked against its
    logged leaf hash: an altered or deleted event makes the bundle unservable rather than wrong."""
    lv, ev = ledger_leaves.c, ledger.events.c
    rows = (
        conn.execute(
            sa.select(lv.idx, lv.position, lv.leaf_hash, ev.state)
            .select_from(ledger_leaves.outerjoin(ledger.events, ev.id == lv.position))
            .where(lv.idx >= start, lv.idx < start + count)
            .order_by(lv.idx)
        )
        .tuples()
        .all()
    )
    if [r[0] for r in rows] != list(range(start, start + count)):
        raise LedgerError(
            f"ledger leaves {start} to {start + count - 1} are missing: "
            "the ledger tables were altered; run `sle verify`"
        )
    out = []
    for idx, position, stored, state in rows:
        if state is None:
            raise LedgerError(f"the event of leaf {idx} (log position {position}) is gone: run `sle verify`")
        data = bytes(state)
        if leaf_hash(data) != bytes(stored):
            raise LedgerError(
                f"the event at log position {position} no longer matches leaf {idx}: it was altered after "
                "it was logged; run `sle verify`"
            )
        if len(data) > MAX_ENTRY_BYTES:
            raise EntryTooLargeError(
                f"the event of leaf {idx} (log position {position}) has {len(data)} bytes; a tlog-tiles "
                f"entry bundle carries at most {MAX_ENTRY_BYTES}"
            )
        out.append(data)
    return out


def format_entry_bundle(entries: list[bytes]) -> bytes:
    """Entries as a bundle: each one's length as a big-endian uint16, then its bytes."""
    parts = []
    for i, e in enumerate(entries):
        if len(e) > MAX_ENTRY_BYTES:
            raise EntryTooLargeError(f"entry {i} has {len(e)} bytes; a bundle entry carries at most {MAX_ENTRY_BYTES}")
        parts += [len(e).to_bytes(2, "big"), bytes(e)]
    return b"".join(parts)


def _tile_bytes(ledger: LedgerBase, conn: Connection, ref: TileRef) -> bytes:
    if ref.level is None:
        return format_entry_bundle(_entries(ledger, conn, ref.start, ref.count))
    return b"".join(_hashes(conn, ref.level, ref.start, ref.count))


def read_tile(ledger: LedgerBase, ref: TileRef, *, size: int | None = None) -> bytes:
    """The bytes of a hash tile or entry bundle, if covered by the tree of ``size`` leaves (default: the
    latest checkpoint's; a larger size than that is :class:`TileNotFoundError`)."""
    with ledger.engine.connect() as conn:
        _check_covered(ref, _covered_size(ledger, conn, size))
        return _tile_bytes(ledger, conn, ref)


def hash_tile(
    ledger: LedgerBase, level: int, index: int, width: int | None = None, *, size: int | None = None
) -> bytes:
    """``tile/<level>/<index>[.p/<width>]``: ``width`` (full: 256) hashes of 32 bytes, concatenated."""
    return read_tile(ledger, TileRef(level, index, width), size=size)


def entry_bundle(ledger: LedgerBase, index: int, width: int | None = None, *, size: int | None = None) -> bytes:
    """``tile/entries/<index>[.p/<width>]``: the entries of leaves ``index*256 ..``, uint16-length-prefixed."""
    return read_tile(ledger, TileRef(None, index, width), size=size)


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ServedResource:
    """One response: body, ``Content-Type`` and ``Cache-Control`` (``headers`` gives both)."""

    body: bytes
    media_type: str
    cache_control: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.media_type, "Cache-Control": self.cache_control}


def serve_checkpoint(ledger: LedgerBase) -> ServedResource:
    """``GET <prefix>/checkpoint``. :class:`TileNotFoundError` before the first checkpoint."""
    return ServedResource(latest_checkpoint_note(ledger).encode("utf-8"), CHECKPOINT_MEDIA_TYPE, CHECKPOINT_CACHE)


def serve_tile(ledger: LedgerBase, path: str) -> ServedResource:
    """``GET <prefix>/<path>`` for ``path`` = ``tile/...``: :class:`TilePathError` if malformed,
    :class:`TileNotFoundError` if not covered by the latest checkpoint, :class:`LedgerError` if the ledger
    cannot produce it (altered tables, an entry too long for a bundle)."""
    ref = parse_tile_path(path)
    body = read_tile(ledger, ref)
    return ServedResource(body, TILE_MEDIA_TYPE, ENTRIES_CACHE if ref.is_entries else TILE_CACHE)


# --------------------------------------------------------------------------- static export


@dataclass(frozen=True)
class WrittenTiles:
    size: int
    checkpoint: str
    tiles: int
    bundles: int
    bytes: int


_CHUNK = 64  # tiles read per query when exporting


def _read_tiles(
    ledger: LedgerBase, conn: Connection, refs: list[TileRef]
) -> Iterator[list[tuple[TileRef, list[bytes]]]]:
    """The hashes (or entries) of each tile of ``refs``, consecutive tiles of one level read with one query."""
    i = 0
    while i < len(refs):
        j = i
        while j < len(refs) and j - i < _CHUNK and refs[j].level == refs[i].level:
            j += 1
        group = refs[i:j]
        first, count = group[0].start, sum(r.count for r in group)
        level = group[0].level
        items = _entries(ledger, conn, first, count) if level is None else _hashes(conn, level, first, count)
        yield [(ref, items[ref.start - first : ref.start - first + ref.count]) for ref in group]
        i = j


def _mth(hashes: list[bytes]) -> bytes:
    """Merkle tree hash of a power-of-two run of hashes."""
    buf = b"".join(hashes)
    while len(buf) > HASH_SIZE:
        buf = pair_level(buf)
    return buf


def _check_tree(ledger: LedgerBase, conn: Connection, latest: StoredCheckpoint) -> dict[TileRef, bytes]:
    """The tiles of the checkpoint's tree agree with each other (each full tile hashes to its hash one level
    up) and hash to the checkpoint's root: an export never publishes a checkpoint its tiles do not prove.
    Returns the checked tiles' bytes (32 bytes per leaf and a little more)."""
    cp = latest.checkpoint  # what clients read: the signed text
    if (cp.size, cp.root_hash) != (latest.size, latest.root):
        raise LedgerError(f"checkpoint #{latest.id} differs from its own note: run `sle verify`")
    tops: dict[int, list[bytes]] = {}  # level -> the root of each full tile of the level below, in order
    partial: dict[int, tuple[int, list[bytes]]] = {}  # level -> (first index, hashes) of its partial tile
    checked: dict[TileRef, bytes] = {}
    for batch in _read_tiles(ledger, conn, list(tiles_for_size(cp.size))):
        for ref, hashes in batch:
            checked[ref] = b"".join(hashes)
            level = ref.level or 0
            if level:
                expected = tops.get(level, [])[ref.start : ref.start + ref.count]
                bad = next((k for k, h in enumerate(hashes) if k >= len(expected) or expected[k] != h), None)
                if bad is not None:
                    raise LedgerError(
                        f"hash {bad} of {ref.path} is not the root of the tile below it: the ledger tables were "
                        "altered; run `sle verify`"
                    )
            if ref.width is None:
                tops.setdefault(level + 1, []).append(_mth(hashes))
            else:
                partial[level] = (ref.start, hashes)

    def get_node(k: int, i: int) -> bytes:  # range nodes of the tree lie in the partial tiles (bits of the size)
        level, r = divmod(k, TILE_HEIGHT)
        first, hashes = partial[level]
        return _mth(hashes[(i << r) - first : ((i + 1) << r) - first])

    if root_at(cp.size, get_node) != cp.root_hash:
        raise LedgerError(
            f"the tiles of the tree of {cp.size} leaves do not hash to the checkpoint's root: the ledger tables "
            "were altered; run `sle verify`"
        )
    return checked


def _write_file(root: Path, rel: str, data: bytes) -> int:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a reader of the folder never sees half a tile
    return len(data)


def write_tiles(
    ledger: LedgerBase,
    out: str | os.PathLike[str],
    *,
    entries: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> WrittenTiles:
    """Write the log as static files under ``out`` (``checkpoint``, ``tile/...``), servable as is by any web
    server: every tile of the latest checkpoint's tree, full and partial, and with ``entries`` the entry bundles
    too (the signed events: study data, so only on request). The stored tiles are first checked against each
    other and the checkpoint's root (:class:`LedgerError` and nothing written if they disagree); the checkpoint
    is written last, so the folder never names a tree whose tiles are not all there. ``on_progress(done,
    total)`` counts tiles written."""
    root = Path(out)
    with ledger.engine.connect() as conn:
        latest = _latest(ledger, conn)
        hash_tiles = _check_tree(ledger, conn, latest)  # before anything is written: never overwrite good
        bundles = [TileRef(None, r.index, r.width) for r in hash_tiles if r.level == 0] if entries else []
        total, done, written = len(hash_tiles) + len(bundles), 0, 0
        for ref, data in hash_tiles.items():
            written += _write_file(root, ref.path, data)
            done += 1
            if on_progress is not None and (done % _CHUNK == 0 or done == len(hash_tiles)):
                on_progress(done, total)
        for batch in _read_tiles(ledger, conn, bundles):
            for ref, items in batch:
                written += _write_file(root, ref.path, format_entry_bundle(items))
            done += len(batch)
            if on_progress is not None:
                on_progress(done, total)
    written += _write_file(root, "checkpoint", latest.note.encode("utf-8"))
    return WrittenTiles(latest.size, latest.note, len(hash_tiles), len(bundles), written)
