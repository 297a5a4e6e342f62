"""Installable like a library: a built wheel (not the editable install) carries the Alembic revisions and the
data files, and its `sle` upgrades a fresh PostgreSQL database and runs the demo from a folder far from the
checkout.

The wheel goes into a fresh venv with `--no-deps`; the dependencies come from this venv's site-packages, added
as a plain path (its `.pth` files are not run, so the editable install's hook never puts the checkout back).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from sle_events import schema

from conftest import BASE_PG_URL, REQUIRE_PG, count_rows

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SLE_DATABASE_URL")
    }
    env["COLUMNS"] = "200"  # rich wraps at 80 columns without a terminal
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh venv's bin folder, an empty folder outside the checkout to run it in)."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build reuses ./build, which may hold modules deleted since.
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".hypothesis",
            "*.db",
            "demo-keys",
            "tests",
            "bench",
        ),
    )
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", work / "dist", source], cwd=work)
    (wheel,) = (work / "dist").glob("sle_events-*.whl")

    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work)
    python = venv / "bin" / "python"
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work).stdout.strip()
    )
    (site / "zz_sle_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
        cwd=work,
    )

    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    # The installed copies are the ones imported, and the checkout is nowhere on the path.
    where = _run(
        [
            python,
            "-c",
            "import sys, sle_events, migrations, projections; "
            "print(sle_events.__file__, migrations.__file__, projections.__file__); print(*sys.path)",
        ],
        cwd=elsewhere,
    ).stdout.splitlines()
    assert all(Path(f).is_relative_to(site) for f in where[0].split()), where
    in_checkout = [
        p for p in where[1].split() if Path(p).is_relative_to(ROOT) and not Path(p).is_relative_to(sys.prefix)
    ]
    assert not in_checkout, where
    return venv / "bin", elsewhere


def test_the_wheel_ships_the_revisions_and_the_data_files(installed: tuple[Path, Path]) -> None:
    bin_dir, elsewhere = installed
    listing = _run(
        [
            bin_dir / "python",
            "-c",
            "import migrations, importlib.resources as r; "
            "m = r.files(migrations); print(*sorted(p.name for p in m.joinpath('versions').iterdir())); "
            "print(m.joinpath('env.py').is_file(), m.joinpath('script.py.mako').is_file()); "
            "d = r.files('sle_events.domain').joinpath('data'); print(*sorted(p.name for p in d.iterdir()))",
        ],
        cwd=elsewhere,
    ).stdout.splitlines()
    revisions = {p.name for p in (ROOT / "migrations" / "versions").glob("*.py")}
    assert set(listing[0].split()) >= revisions
    assert listing[1] == "True True"
    assert set(listing[2].split()) >= {p.name for p in (ROOT / "sle_events" / "domain" / "data").glob("*.csv")}


def test_installed_sle_upgrades_a_fresh_postgresql_database(installed: tuple[Path, Path]) -> None:
    bin_dir, elsewhere = installed
    admin_url = sa.engine.make_url(BASE_PG_URL).set(database="postgres")
    name = f"sle_wheel_{os.getpid()}"
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
            conn.execute(sa.text(f'create database "{name}"'))
    except sa.exc.OperationalError as e:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (SLE_REQUIRE_POSTGRES=1) but unreachable at {admin_url}: {e}")
        pytest.skip(f"PostgreSQL unreachable at {admin_url}: {e}")
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    try:
        _run([bin_dir / "sle", "db", "upgrade", "--db", url], cwd=elsewhere)
        checkout_head = ScriptDirectory.from_config(schema.alembic_config("sqlite://")).get_current_head()
        assert schema.current(url) == checkout_head
        engine = sa.create_engine(url)
        try:
            tables = set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()
        assert set(schema.target_metadata().tables) <= tables
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


def test_installed_sle_runs_the_demo_elsewhere(installed: tuple[Path, Path]) -> None:
    bin_dir, elsewhere = installed
    url = f"sqlite:///{elsewhere / 'elsewhere.db'}"
    out = _run([bin_dir / "sle", "demo", "--subjects", "2", "--db", url], cwd=elsewhere).stdout
    assert "verified: every signature, key, role and chain holds" in out
    assert count_rows(url) > 0
    assert (elsewhere / "demo-keys").is_dir()  # its keys land in the folder it runs in, not the checkout
