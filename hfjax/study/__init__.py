"""`hfjax study`: did fusion put the sources' knowledge into the target? Fused vs controls
(zero / noise / mismatched sources, the target tuned on the same replay) vs homogeneous
merges, over training seeds, with hierarchical-bootstrap intervals and one verdict per
comparison.

    from hfjax.study import run_study
    run_study(fuse_cfg, {"movie": "movie_test.json"}, seeds=(0, 1, 2), out_dir="study_out")
"""

from hfjax.study.plan import DEFAULT_ROWS, Row, Unit, make_plan, select_rows
from hfjax.study.runner import EvalOptions, StudyError, parse_eval_data, run_study
from hfjax.study.stats import bootstrap, verdict

__all__ = ["DEFAULT_ROWS", "EvalOptions", "Row", "StudyError", "Unit", "bootstrap",
           "make_plan", "parse_eval_data", "run_study", "select_rows", "verdict"]
