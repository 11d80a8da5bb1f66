"""The built-in default job and the digits benchmark: a small text-to-image teacher trained on scikit-learn's digits,
distilled on the CPU and scored (``python -m distill.demo``; see ``run.py`` and ``digits.py``)."""

from .run import (digit_prompts, digit_scores, load_student_pipeline, load_teacher_pipeline, metrics_table,
                  real_data_fd, save_grid, score, student_guidance)

__all__ = ["digit_prompts", "digit_scores", "load_student_pipeline", "load_teacher_pipeline", "metrics_table",
           "real_data_fd", "save_grid", "score", "student_guidance"]
