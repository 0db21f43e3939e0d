"""The evaluators a run config names under ``model.init_args.evaluator``, in one place: each turns a split's
prediction rows (question, reference, generation, ranked choice, meta) into the task's figures, with bootstrap
intervals, logged as ``<split>/<metric>``.

- :class:`VQAEvaluator`: closed and open questions by type (CT VQA): accuracy, measurement error.
- :class:`VerifyEvaluator`: yes/no questions per attribute (PTB-XL superclasses): AUROC, F1.
- :class:`ReportEvaluator`: generated reports (fundus): grade and referral read back, BLEU/ROUGE.
- :class:`CheckerEvaluator`: report error-checking answers (is there an error, of which type).
"""

from mmclin.reports.scoring import CheckerEvaluator
from mmclin.tasks.report import ReportEvaluator
from mmclin.tasks.verify import VerifyEvaluator
from mmclin.tasks.vqa import VQAEvaluator

__all__ = ["CheckerEvaluator", "ReportEvaluator", "VQAEvaluator", "VerifyEvaluator"]
