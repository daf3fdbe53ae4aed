"""Long-context quality (`lcrun eval`): seeded retrieval tasks (``tasks``), the teacher-forced
fidelity text (``text``) and the harness that runs them through the runtime (``harness``)."""
from lcrun.eval.harness import Cell, Evaluator, FidelityRun, Mode, Suite, markdown_table, parse_length, run_eval

__all__ = ["Cell", "Evaluator", "FidelityRun", "Mode", "Suite", "markdown_table", "parse_length", "run_eval"]
