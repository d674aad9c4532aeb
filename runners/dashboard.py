"""CLI: ``python -m runners.dashboard <sweep dir | storage URL> [--port 8080]``: watch a study live.

Serves optuna-dashboard (optimisation history, Pareto front, parameter importances, slices, every trial's
parameters and attributes) for the studies of a kvcomp sweep, on 127.0.0.1 only: from another machine use
an SSH tunnel (``ssh -L 8080:127.0.0.1:8080 host``). The argument is a sweep dir (its ``optuna.db``,
``optuna.journal``, or the storage its ``multirun.yaml`` names), a ``.db``/``.journal`` file, or any
SQLAlchemy URL (``postgresql+psycopg2://user:pw@host/db``). It prints the dashboard's URL and one URL per
study, then serves until Ctrl-C. It only reads: a sweep may keep running (and adding trials) meanwhile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HOST = "127.0.0.1"  # never all interfaces: the dashboard can edit studies (notes, trial states) and has no login


def storage_spec(target: str) -> str:
    """The resolved storage spec (``kvcomp.sweep.storage``) of a sweep dir, a study file or a URL."""
    from kvcomp.sweep import storage as stg

    path = Path(target)
    if path.is_dir():
        spec = stg.of_sweep_dir(path)
        if spec is None:
            raise ValueError(f"{target}: no optuna.db, optuna.journal or multirun.yaml storage in this directory")
        return spec
    if path.is_file():
        if path.suffix in (".journal", ".log"):
            return f"journal:{path.resolve()}"
        return f"sqlite:///{path.resolve()}"
    if "://" in target:
        return target
    raise ValueError(f"{target}: not a sweep dir, a .db/.journal file or a storage URL (e.g. postgresql://...)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runners.dashboard", description=__doc__.splitlines()[0])
    ap.add_argument("target", help="a sweep dir, an optuna.db / optuna.journal file, or a storage URL")
    ap.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    args = ap.parse_args(argv)
    import optuna
    from optuna_dashboard import run_server

    from kvcomp.sweep.storage import as_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = as_storage(storage_spec(args.target))
        names = optuna.get_all_study_names(storage=storage)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not names:
        print(f"error: {args.target}: the storage holds no study yet (start the sweep first)", file=sys.stderr)
        return 2
    url = f"http://{HOST}:{args.port}/dashboard/"
    print(f"optuna-dashboard: {url}  (Ctrl-C stops it)")
    for name in names:
        print(f"  study {name}: {url}studies/{storage.get_study_id_from_name(name)}")
    sys.stdout.flush()
    try:
        run_server(storage, host=HOST, port=args.port)
    except OSError as e:  # port in use
        print(f"error: --port {args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
