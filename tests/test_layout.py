"""The layout's one-way arrows, checked by parsing every module's imports (function-level ones too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    ("domain", "store"), ("domain", "projections"), ("domain", "cli"),
    ("signing", "domain"),
    ("ledger", "projections"),
    ("projections", "cli"),
    ("store", "ledger"), ("store", "audit"), ("ledger", "audit"),  # the verifier sits above both
    ("domain", "api"), ("store", "api"), ("projections", "api"), ("exports", "api"), ("api", "cli"),  # HTTP on top
    ("domain", "exports"), ("projections", "exports"), ("exports", "cli"), ("exports", "web"),
    ("domain", "web"), ("projections", "web"), ("web", "cli"),
    ("client", "store"), ("client", "api"), ("client", "cli"),  # a service's client needs no server code
}  # fmt: skip  # one group of forbidden pairs per row


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "sle_events":
        return parts[1] if len(parts) > 1 else None
    return parts[0] if parts[0] in ("projections", "migrations") else None


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("sle_events", "projections", "migrations"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:  # `from sle_events import schema` imports the module sle_events.schema
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return out


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the modules that import it."""
    modules = _modules()
    graph: dict[str, dict[str, set[str]]] = {}
    for module, path in modules.items():
        src = _package(module)
        for imported in _imports(module, path, set(modules)):
            dst = _package(imported)
            if src and dst and src != dst:
                graph.setdefault(src, {}).setdefault(dst, set()).add(module)
    return graph


def test_no_forbidden_arrow():
    graph = package_graph()
    bad = {(a, b): sorted(graph[a][b]) for a, b in FORBIDDEN if b in graph.get(a, {})}
    assert bad == {}


def test_no_import_cycle_between_packages():
    graph = package_graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, {}):
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif len(path) < 12:
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    assert cycles == []


def test_the_checker_sees_a_function_level_import():
    graph = package_graph()
    assert "sle_events.cli.main" in graph["cli"]["audit"]  # `_verify` imports the verifier inside the function


def test_reading_a_checkpoint_or_vkey_offline_imports_no_database_code(tmp_path):
    """`sle ledger verify-proof` and the trust root's file readers run with the vkey alone."""
    from sle_events.ledger import Checkpoint, Signer, sign_checkpoint

    signer = Signer.generate("sle.local/TEST")
    note = sign_checkpoint(
        Checkpoint(
            "sle.local/TEST", 0, bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        ),
        signer,
    )
    (tmp_path / "CHECKPOINT").write_text(note)
    (tmp_path / "vkey").write_text(signer.vkey + "\n")
    script = f"""
import sys
from sle_events.audit.offline import check_proof
from sle_events.audit.trust import load_vkey, read_checkpoint_notes
verifier = load_vkey({str(tmp_path / "vkey")!r})
[(label, note)] = read_checkpoint_notes({str(tmp_path / "CHECKPOINT")!r})
print(check_proof(note, verifier, verifier.name)[0])
from typer.testing import CliRunner
from sle_events.cli.main import app
args = ["ledger", "verify-proof", {str(tmp_path / "CHECKPOINT")!r}, "--vkey", {str(tmp_path / "vkey")!r}]
done = CliRunner().invoke(app, args)
assert done.exit_code == 0, done.output
heavy = ("sqlalchemy", "eventsourcing", "eventsourcing_sqlalchemy", "psycopg")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
assert loaded == [], loaded
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK: checkpoint of sle.local/TEST, size 0")
