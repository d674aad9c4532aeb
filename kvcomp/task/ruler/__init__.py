"""RULER (NVIDIA/RULER): ``task=ruler`` and the official scoring functions ``score_example`` / ``score_task``."""

from kvcomp.task.ruler import task as _task  # noqa: F401  registers task=ruler
from kvcomp.task.ruler.constants import OFFLINE_TASKS, TASK_NAMES
from kvcomp.task.ruler.scoring import postprocess_pred, score_example, score_task

__all__ = ["OFFLINE_TASKS", "TASK_NAMES", "postprocess_pred", "score_example", "score_task"]
