"""LongBench v1: the official metrics (``metrics.py``) and the ``task=longbench`` loader."""

from kvcomp.task.longbench import task as _task  # noqa: F401  registers task=longbench
from kvcomp.task.longbench.metrics import DATASET_METRIC, score_example, score_task, score_task_e

__all__ = ["DATASET_METRIC", "score_example", "score_task", "score_task_e"]
