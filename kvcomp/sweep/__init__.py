"""Sweep helpers: Optuna storage and resume (``study``), the resumable sweeper loop (``sweeper``), the
report over run dirs (``report``, ``plots``). Hydra's plugin shims live in ``hydra_plugins/kvcomp_sweeps``."""
