"""`sle ledger ...`: the verifiable ledger (Merkle log, signed checkpoints, proofs) from the command line.

Built on `sle_events.cli.common` like every command group: its `--db`, consoles, quiet closed pipes, error→exit
code map, and `existing_database` (a ledger is kept beside an existing study record, so no command here creates
a database). Exit codes: 0 done / verified, 1 the operation failed or a proof does not verify (with the
reason), 2 bad usage or unusable input (nothing is written then). The log key is read from ``--log-key`` or
$SLE_LOG_KEY and never printed. `verify-proof` needs no database and loads no database code.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape
from rich.progress import Progress

from sle_events.cli.common import (
    DbOption,
    database_url,
    err,
    existing_database,
    fail,
    handled,
    new_app,
    progress,
    safe_url,
    write_stdout,
)

ledger_app = new_app(
    no_args_is_help=True,
    help="Verifiable ledger: one Merkle log over every event, signed checkpoints, offline-checkable proofs.",
)

LogKeyOption = typer.Option(
    None,
    "--log-key",
    metavar="FILE",
    envvar="SLE_LOG_KEY",
    show_envvar=True,
    help="the log's Ed25519 signing key file (0600)",
)
OriginOption = typer.Option(
    None,
    "--origin",
    metavar="ORIGIN",
    envvar="SLE_LOG_ORIGIN",
    show_envvar=True,
    help="checkpoint origin line (default sle.local/<study code or database name>)",
)
BatchOption = typer.Option(5000, "--batch", min=1, metavar="N", help="events integrated per transaction")


def _refuse(message: str) -> NoReturn:
    """The operation failed, or a proof does not verify: exit 1 (bad usage and unusable input are `fail`'s 2)."""
    fail(message, 1)


def _progress(label: str) -> Progress:
    return progress(label)


def _ledger(db: str | None, *, create: bool) -> Any:
    """Open the ledger of an existing study record (a missing database, or none there, is exit 2 and creates
    nothing); no ledger yet is a failure (1)."""
    from sle_events.ledger.log import Ledger, LedgerError

    url = existing_database(db)
    with handled():
        try:
            return Ledger(url, create=create)
        except LedgerError as e:
            if "no ledger yet" in str(e):
                _refuse(str(e))
            fail(f"{e} ({safe_url(url)})")


def _signer(log_key: Path | None, origin: str | None) -> Any:
    from sle_events.ledger.log import LogKeyError, load_log_key

    if log_key is None:
        fail("the log key is needed: --log-key FILE or $SLE_LOG_KEY (create one with `sle ledger init`)")
    try:
        signer = load_log_key(log_key)
    except LogKeyError as e:
        fail(str(e))
    if origin is not None and origin != signer.name:
        fail(f"origin {origin!r} differs from the log key's origin {signer.name!r} (the key is made for one origin)")
    return signer


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fail(f"{what} {path} does not exist")
    except UnicodeDecodeError:
        fail(f"{what} {path} is not UTF-8 text")
    except OSError as e:
        fail(f"cannot read {what} {path}: {e.strerror}")


def _write(path: Path, data: str | bytes) -> None:
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror}")


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode("ascii")


def _integrate(ledger: Any, batch: int) -> int:
    with _progress("integrating") as bar:
        task = bar.add_task("integrate", total=None)
        added: int = ledger.integrate(batch=batch, on_progress=lambda d, t: bar.update(task, completed=d, total=t))
        return added


# --------------------------------------------------------------------------- commands


@ledger_app.command("init")
def init(
    log_key: Path | None = LogKeyOption,
    origin: str | None = OriginOption,
    db: str | None = DbOption,
) -> None:
    """Create the log's signing key (a new 0600 file) and print its verifier key (vkey)."""
    from sle_events.ledger.log import LogKeyError, create_log_key, default_origin

    if log_key is None:
        fail("where to write the key: --log-key FILE or $SLE_LOG_KEY")
    if log_key.exists() or log_key.is_symlink():
        fail(f"{log_key} exists; refusing to overwrite a key")
    origin = origin or default_origin(database_url(db))
    try:
        signer = create_log_key(log_key, origin)
    except LogKeyError as e:
        fail(str(e))
    err.print(f"log key written to {escape(str(log_key))} (0600) for origin {escape(origin)}; give auditors this vkey:")
    write_stdout(signer.vkey + "\n")


@ledger_app.command("vkey")
def vkey(log_key: Path | None = LogKeyOption, db: str | None = DbOption) -> None:
    """Print the log's verifier key (one line): from the log key, else the one the ledger recorded."""
    if log_key is not None:
        write_stdout(_signer(log_key, None).vkey + "\n")
        return
    ledger = _ledger(db, create=False)
    try:
        recorded = ledger.state().vkey
    finally:
        ledger.close()
    if not recorded:
        _refuse("no checkpoint has been signed yet, so the ledger has no vkey; pass --log-key")
    write_stdout(recorded + "\n")


@ledger_app.command("integrate")
def integrate(
    db: str | None = DbOption,
    batch: int = BatchOption,
    limit: int | None = typer.Option(None, min=0, metavar="N", help="integrate at most this many events"),
) -> None:
    """Give every new event the next leaf index (the single sequencer; safe to run concurrently)."""
    ledger = _ledger(db, create=True)
    try:
        with handled():
            added = _integrate(ledger, batch) if limit is None else ledger.integrate(limit, batch=batch)
            state = ledger.state()
    finally:
        ledger.close()
    write_stdout(f"integrated {added} events; tree size {state.size}, root {_b64(state.root)}\n")


@ledger_app.command("checkpoint")
def checkpoint(
    db: str | None = DbOption,
    log_key: Path | None = LogKeyOption,
    origin: str | None = OriginOption,
    out: Path | None = typer.Option(
        None, "--out", metavar="FILE", help="also write the signed checkpoint to this file"
    ),
    integrate_first: bool = typer.Option(True, "--integrate/--no-integrate", help="integrate new events first"),
    batch: int = BatchOption,
) -> None:
    """Sign a checkpoint (C2SP tlog-checkpoint in a signed note) for the integrated tree; print it."""
    signer = _signer(log_key, origin)
    cp = _issue(db, signer, batch if integrate_first else None, out, lambda ledger: ledger.checkpoint(signer, origin))
    write_stdout(cp.note)


def _issue(db: str | None, signer: Any, batch: int | None, out: Path | None, sign: Callable[[Any], Any]) -> Any:
    """Integrate new events (unless `batch` is None), then `sign(ledger)` a checkpoint and write it to `out`."""
    from sle_events.ledger.log import LedgerError

    ledger = _ledger(db, create=True)
    try:
        _same_log(ledger, signer)
        with handled():
            if batch is not None:
                _integrate(ledger, batch)
            cp = sign(ledger)
    except LedgerError as e:
        _refuse(str(e))
    finally:
        ledger.close()
    if out is not None:
        _write(out, cp.note)
    return cp


@ledger_app.command("rotate-key")
def rotate_key(
    db: str | None = DbOption,
    log_key: Path | None = LogKeyOption,
    new_key: Path = typer.Option(
        ...,
        "--new-key",
        metavar="FILE",
        help="the log's next key (make it with `sle ledger init --log-key NEW --origin <this log's origin>`)",
    ),
    out: Path | None = typer.Option(
        None, "--out", metavar="FILE", help="also write the rotation checkpoint to this file"
    ),
    batch: int = BatchOption,
) -> None:
    """Hand the log to a new key: a checkpoint naming the old and the new vkey, signed by both. Later
    checkpoints need the new key; auditors holding either vkey follow the rotation (`sle verify`)."""
    old, new = _signer(log_key, None), _signer(new_key, None)
    cp = _issue(db, old, batch, out, lambda ledger: ledger.rotate_key(old, new))
    err.print(f"the log is now signed by {escape(new.vkey)}; give auditors this checkpoint and the new vkey")
    write_stdout(cp.note)


def _same_log(ledger: Any, signer: Any) -> None:
    """Refuse a key other than the one this ledger was signed with, before anything is written."""
    state = ledger.state()
    if state.vkey is not None and state.vkey != signer.vkey:
        ledger.close()
        fail(f"this ledger is signed by {state.vkey}; the given log key is {signer.vkey}")


def _event(ledger: Any, event_id: str) -> int:
    from sle_events.ledger.log import LedgerError, parse_event_id

    try:
        parsed = parse_event_id(event_id)
    except ValueError as e:
        fail(f"EVENT_ID: {e}")
    if isinstance(parsed, int):
        return parsed
    try:
        return int(ledger.position_of(*parsed))
    except LedgerError as e:
        _refuse(str(e))


@ledger_app.command("prove")
def prove(
    event_id: str | None = typer.Argument(
        None,
        metavar="EVENT_ID",
        help="<stream uuid>:<version>, the event's log position, or an ODM SourceID (ledger:<index>;event:...)",
    ),
    index: int | None = typer.Option(None, "--index", min=0, metavar="N", help="leaf index instead of an event"),
    out: Path = typer.Option(
        ..., "--out", metavar="FILE", help="tlog-proof file to write; the leaf bytes go to FILE.leaf"
    ),
    against: Path | None = typer.Option(
        None,
        "--checkpoint",
        metavar="FILE",
        help="prove against this saved checkpoint (default: the latest one issued)",
    ),
    db: str | None = DbOption,
) -> None:
    """Write an inclusion proof (c2sp.org/tlog-proof@v1) for one event, and its exact leaf bytes."""
    from sle_events.ledger.log import LedgerError

    if (event_id is None) == (index is None):
        fail("give exactly one of EVENT_ID or --index N")
    named: tuple[str, int] | None = None  # the event an ODM SourceID names beside its leaf index
    if event_id is not None and event_id.strip().startswith("ledger:"):
        from sle_events.exports.odm import parse_source_id

        try:
            index, stream, version = parse_source_id(event_id)
        except ValueError as e:
            fail(f"EVENT_ID: {e}")
        event_id = None
        named = (str(stream), version) if stream is not None and version is not None else None
    note = _read_text(against, "checkpoint") if against is not None else None
    ledger = _ledger(db, create=False)
    try:
        with handled():
            position = _event(ledger, event_id) if event_id is not None else None
            proof = ledger.inclusion_proof(position, index=index, checkpoint=note)
    except LedgerError as e:
        _refuse(str(e))
    finally:
        ledger.close()
    if named is not None and (proof.leaf.stream, proof.leaf.version) != named:
        _refuse(
            f"the SourceID names event {named[0]}:{named[1]}, but leaf {proof.leaf.index} of this log is "
            f"{proof.leaf.stream}:{proof.leaf.version}: the export was not built from this log"
        )
    leaf_file = out.with_name(out.name + ".leaf")
    _write(out, proof.text)
    _write(leaf_file, proof.leaf_bytes or b"")
    leaf = proof.leaf
    err.print(
        f"leaf {leaf.index} (log position {leaf.position}, {leaf.stream} v{leaf.version}) in the tree of "
        f"{proof.size}: proof {escape(str(out))}, leaf bytes {escape(str(leaf_file))}"
    )


@ledger_app.command("consistency")
def consistency(
    old: Path = typer.Option(..., "--old", metavar="FILE", help="a checkpoint saved earlier"),
    new: Path | None = typer.Option(
        None, "--new", metavar="FILE", help="prove up to this checkpoint (default: the latest)"
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        metavar="FILE",
        help="write the proof here (and the new checkpoint to FILE.checkpoint) instead of printing it",
    ),
    db: str | None = DbOption,
) -> None:
    """Consistency proof (RFC 9162) from a saved checkpoint to the latest one: one base64 hash per line."""
    from sle_events.ledger.log import LedgerError

    old_note = _read_text(old, "checkpoint")
    new_note = _read_text(new, "checkpoint") if new is not None else None
    ledger = _ledger(db, create=False)
    try:
        with handled():
            proof = ledger.prove_consistency(old_note, new_note)
    except LedgerError as e:
        _refuse(str(e))
    finally:
        ledger.close()
    if out is None:
        write_stdout(proof.text)
        return
    _write(out, proof.text)
    _write(out.with_name(out.name + ".checkpoint"), proof.new.note)
    err.print(
        f"consistency {proof.old_size} → {proof.new.size}: {len(proof.hashes)} hashes in {escape(str(out))}, "
        f"the new checkpoint in {escape(str(out))}.checkpoint"
    )


@ledger_app.command("verify-proof")
def verify_proof(
    proof_file: Path = typer.Argument(
        ..., metavar="PROOF_FILE", help="a tlog-proof (from `prove`) or a signed checkpoint"
    ),
    vkey: str = typer.Option(..., "--vkey", metavar="VKEY|FILE", help="the log's vkey, or a file holding it"),
    leaf: Path | None = typer.Option(None, "--leaf", metavar="FILE", help="the leaf bytes (default: PROOF_FILE.leaf)"),
    old_checkpoint: Path | None = typer.Option(
        None, "--old-checkpoint", metavar="FILE", help="a checkpoint saved earlier"
    ),
    consistency_file: Path | None = typer.Option(
        None, "--consistency", metavar="FILE", help="consistency proof from the old checkpoint to the one in PROOF_FILE"
    ),
    origin: str | None = typer.Option(
        None, "--origin", metavar="ORIGIN", help="expected origin (default: the vkey's name)"
    ),
) -> None:
    """Check a proof offline, with nothing but the log's vkey: no database needed."""
    from sle_events.audit.errors import ProofRejected, UnusableInput
    from sle_events.audit.offline import check_proof, is_inclusion_proof
    from sle_events.audit.trust import load_vkey

    try:
        verifier = load_vkey(vkey)
    except UnusableInput as e:
        fail(f"--vkey: {e}")
    if (old_checkpoint is None) != (consistency_file is None):
        fail("--old-checkpoint and --consistency go together")
    text = _read_text(proof_file, "proof")
    leaf_bytes = None
    if is_inclusion_proof(text):
        leaf_path = leaf or proof_file.with_name(proof_file.name + ".leaf")
        try:
            leaf_bytes = leaf_path.read_bytes()
        except OSError:
            fail(f"the leaf bytes are needed: {leaf_path} cannot be read (pass --leaf FILE)")
    old_text = _read_text(old_checkpoint, "old checkpoint") if old_checkpoint is not None else None
    proof_text = _read_text(consistency_file, "consistency proof") if consistency_file is not None else None
    try:
        lines = check_proof(
            text, verifier, origin or verifier.name, leaf=leaf_bytes, old_checkpoint=old_text, consistency=proof_text
        )
    except ProofRejected as e:
        err.print(f"[red]FAILED:[/red] {escape(str(e))}")
        raise typer.Exit(e.exit_code) from None
    write_stdout("\n".join(lines) + "\n")


@ledger_app.command("run")
def run(
    db: str | None = DbOption,
    log_key: Path | None = LogKeyOption,
    origin: str | None = OriginOption,
    interval: float = typer.Option(5.0, "--interval", min=0.05, metavar="SECONDS", help="seconds between checkpoints"),
    integrate_every: float = typer.Option(
        0.5,
        "--integrate-every",
        min=0.05,
        metavar="SECONDS",
        help="seconds between "
        "integrations (continuous by default: shortens the window in which an "
        "appended event can vanish without a trace)",
    ),
    batch: int = BatchOption,
) -> None:
    """Integrate new events continuously and sign a checkpoint every --interval seconds until SIGINT/SIGTERM."""
    from sle_events.ledger.log import LedgerError

    signer = _signer(log_key, origin)
    ledger = _ledger(db, create=True)
    _same_log(ledger, signer)

    def cycle(added: int, issued: Any) -> None:
        if issued is not None:
            err.print(f"integrated {added}; checkpoint #{issued.id} size {issued.size} root {_b64(issued.root)}")

    def problem(e: Exception) -> None:
        err.print(f"[yellow]database problem, retrying next cycle:[/yellow] {escape(type(e).__name__)}")

    err.print(f"ledger running every {interval:g} s for {escape(signer.name)}; stop with Ctrl-C or SIGTERM")
    try:
        ledger.run(
            signer,
            interval,
            origin=origin,
            batch=batch,
            integrate_every=integrate_every,
            on_cycle=cycle,
            on_error=problem,
        )
    except LedgerError as e:
        _refuse(str(e))
    finally:
        ledger.close()
    err.print("stopped")


@ledger_app.command("witness")
def witness(
    witness_key: Path = typer.Option(
        ..., "--witness-key", metavar="FILE", help="the witness's key file (created 0600 if missing)"
    ),
    name: str | None = typer.Option(
        None, "--name", metavar="NAME", help="witness name for a new key (default witness.local)"
    ),
    vkey: str | None = typer.Option(
        None,
        "--vkey",
        metavar="VKEY|FILE",
        help="the log's vkey or a file holding it (default: the one the ledger recorded)",
    ),
    state_file: Path = typer.Option(
        ..., "--state", metavar="FILE", help="JSON file: the last checkpoint this witness cosigned"
    ),
    checkpoint_file: Path | None = typer.Option(
        None, "--checkpoint", metavar="FILE", help="checkpoint to cosign (default: the ledger's latest)"
    ),
    consistency_file: Path | None = typer.Option(
        None,
        "--consistency",
        metavar="FILE",
        help="proof from the last cosigned checkpoint (default: asked from the ledger)",
    ),
    out: Path | None = typer.Option(None, "--out", metavar="FILE", help="write the cosigned checkpoint here"),
    db: str | None = DbOption,
) -> None:
    """Cosign a checkpoint (tlog-cosignature) only if it extends the last one this witness cosigned."""
    from sle_events.audit.errors import UnusableInput
    from sle_events.audit.trust import load_vkey
    from sle_events.ledger.checkpoint import Checkpoint
    from sle_events.ledger.cosignature import Witness, WitnessError
    from sle_events.ledger.log import LedgerError
    from sle_events.ledger.note import parse_note
    from sle_events.ledger.proof_file import ProofFileError, parse_consistency_proof

    signer = _witness_signer(witness_key, name)
    state, state_origin, followed = _witness_state(state_file)
    vkey = vkey or followed  # the log key this witness followed to, through the log's key rotations
    note = _read_text(checkpoint_file, "checkpoint") if checkpoint_file is not None else None
    proof_text = _read_text(consistency_file, "consistency proof") if consistency_file is not None else None
    ledger: Any = None  # opened only when the database is needed
    if vkey is None or note is None or (proof_text is None and state is not None):
        ledger = _ledger(db, create=False)
    try:
        if vkey is None:
            vkey = ledger.state().vkey
            if not vkey:
                fail("the ledger has no vkey yet; pass --vkey")
        try:
            log_verifier = load_vkey(vkey)
        except UnusableInput as e:
            fail(f"--vkey: {e}")
        if state_origin is not None and state_origin != log_verifier.name:
            fail(f"the witness state {state_file} is for log {state_origin!r}, not {log_verifier.name!r}")
        if note is None:
            latest = ledger.latest_checkpoint()
            if latest is None:
                _refuse("no checkpoint has been issued yet")
            note = latest.note
        try:
            new_size = Checkpoint.parse(parse_note(note)[0]).size
        except ValueError as e:
            _refuse(f"not a checkpoint: {e}")
        if proof_text is not None:
            try:
                proof = parse_consistency_proof(proof_text)
            except ProofFileError as e:
                _refuse(f"consistency proof: {e}")
        elif state is None or state.size == 0 or state.size > new_size:
            proof = []
        else:
            try:
                proof = ledger.consistency_proof(state.size, new_size)
            except LedgerError as e:
                _refuse(str(e))
    finally:
        if ledger is not None:
            ledger.close()
    w = Witness(signer, log_verifier, log_verifier.name, state)
    try:
        cosigned = w.cosign(note, proof)
    except WitnessError as e:
        err.print(f"[red]REFUSED:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
    new_state = w.state
    assert new_state is not None
    # the log's key as the witness now follows it: a note Verifier (from load_vkey), which the protocol type
    # NoteVerifier does not promise to carry a vkey
    now_following: str = w.log_verifier.vkey  # type: ignore[attr-defined]  # see above
    _save_witness_state(state_file, log_verifier.name, new_state, now_following)
    if out is not None:
        _write(out, cosigned)
    err.print(f"cosigned size {new_state.size} as {escape(signer.name)} ({escape(signer.vkey)})")
    write_stdout(cosigned)


def _witness_signer(path: Path, name: str | None) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sle_events.ledger.cosignature import CosignatureSigner
    from sle_events.ledger.log import LogKeyError, create_log_key, load_log_key
    from sle_events.ledger.note import b64decode_strict

    created = False
    if not path.exists():
        try:
            create_log_key(path, name or "witness.local")
        except LogKeyError as e:
            fail(str(e).replace("origin", "witness name"))
        created = True
    try:
        key = load_log_key(path)
    except LogKeyError as e:
        fail(str(e).replace("log key", "witness key").replace("log signing key", "witness key"))
    if name is not None and name != key.name:
        fail(f"the witness key is for {key.name!r}, not {name!r}")
    seed = b64decode_strict(key.export_skey().split("+", 4)[4])[1:]  # PRIVATE+KEY+name+id+base64
    signer = CosignatureSigner(key.name, Ed25519PrivateKey.from_private_bytes(seed))
    if created:
        err.print(f"new witness key {escape(str(path))} (0600); its cosigner vkey: {escape(signer.vkey)}")
    return signer


def _witness_state(path: Path) -> Any:
    from sle_events.ledger.cosignature import WitnessState
    from sle_events.ledger.note import b64decode_strict

    if not path.exists():
        return None, None, None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        state = WitnessState(int(doc["size"]), b64decode_strict(doc["root"]))
        return state, doc.get("origin"), doc.get("log_vkey")
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"witness state {path} is unreadable: {e}")


def _save_witness_state(path: Path, origin: str, state: Any, log_vkey: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write(
        tmp,
        json.dumps({"origin": origin, "size": state.size, "root": _b64(state.root_hash), "log_vkey": log_vkey}) + "\n",
    )
    os.replace(tmp, path)


@ledger_app.command("tiles")
def tiles(
    out: Path = typer.Option(..., "--out", metavar="DIR", help="folder for `checkpoint` and `tile/...`"),
    db: str | None = DbOption,
    entries: bool = typer.Option(
        False, "--entries/--no-entries", help="also write the entry bundles (the signed events: study data)"
    ),
) -> None:
    """Write the log as static C2SP tlog-tiles files (the latest checkpoint and every tile of its tree), to
    serve as they are or hand to an auditor. Entries only with --entries: they are the study's events."""
    from sle_events.ledger.log import LedgerError
    from sle_events.ledger.tiles import TileError, write_tiles

    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder")
    ledger = _ledger(db, create=False)
    try:
        with handled(), _progress("writing tiles") as bar:
            task = bar.add_task("tiles", total=None)
            written = write_tiles(
                ledger, out, entries=entries, on_progress=lambda d, t: bar.update(task, completed=d, total=t)
            )
    except (LedgerError, TileError) as e:
        _refuse(str(e))
    except OSError as e:
        _refuse(f"cannot write {out}: {e.strerror or e}")
    finally:
        ledger.close()
    write_stdout(
        f"tree size {written.size}: {written.tiles} hash tiles, {written.bundles} entry bundles, "
        f"{written.bytes} bytes in {out}\n"
    )
