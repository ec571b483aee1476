"""Where a study lives: an Optuna journal file (one machine) or any SQLAlchemy URL (many machines).

- default: ``runs/<study>/journal.log`` through ``JournalStorage(JournalFileBackend(path))``; local worker
  processes share it (the backend locks the file for each append).
- ``--storage postgresql://user:pass@host/db`` (or ``mysql+pymysql://``, ``sqlite:///file.db``): Optuna's
  ``RDBStorage``, with heartbeats (every 60 s, stale after 180 s) so a trial whose host died is failed and
  re-queued by whichever worker notices; a plain path is read as a journal file.

An unreachable URL (server down, bad credentials, missing driver) fails here, before any training, in one
line. Connections time out after 10 s instead of waiting for TCP's minutes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from qsmlab.errors import QSMInputError

HEARTBEAT_S = 60
GRACE_S = 180


def is_url(storage: str | None) -> bool:
    return bool(storage) and "://" in str(storage)


def journal_path(study_dir: Path, storage: str | None) -> Path | None:
    """The journal file a storage string names (None for an RDB URL)."""
    if storage is None:
        return study_dir / "journal.log"
    return None if is_url(storage) else Path(storage)


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _with_driver(url: str) -> str:
    """``postgresql://`` -> ``postgresql+psycopg2://`` when only psycopg2 is installed: SQLAlchemy 2.1
    maps the bare scheme to psycopg 3, qsmlab's dev dependencies ship psycopg2-binary."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(storage: str | None, study_dir: Path, stale_trial_callback=None):
    """An Optuna storage for ``storage`` (None = the default journal under ``study_dir``)."""
    import optuna

    path = journal_path(study_dir, storage)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
        except OSError as e:
            raise QSMInputError(f"--storage {path}: cannot create the journal file ({e.strerror or e})") from None
        return optuna.storages.JournalStorage(backend)
    storage = _with_driver(storage)
    engine_kwargs = {}
    if storage.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and exactly what is needed
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=stale_trial_callback)
    except ImportError as e:
        raise QSMInputError(f"--storage {_redact(storage)}: database driver missing ({e}); for PostgreSQL "
                            "install psycopg2-binary") from None
    except Exception as e:  # sqlalchemy.exc.OperationalError/ArgumentError, ValueError for bad URLs
        first = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise QSMInputError(f"--storage {_redact(storage)}: cannot open the study database "
                            f"({type(e).__name__}: {first[0] if first else 'no detail'})") from None


def storage_url(storage: str | None, study_dir: Path) -> str:
    """What workers are given: the URL or the absolute journal path."""
    path = journal_path(study_dir, storage)
    return str(path.resolve()) if path is not None else str(storage)
