"""Radiology reports: sections, synthetic error injection, a rule-based checker and error-checking scores."""

from mmclin.reports.injection import COARSE_TYPES, FINE_TYPES, InjectedError, corpus_summary, inject, inject_corpus
from mmclin.reports.rules import RuleChecker
from mmclin.reports.scoring import score_checker, write_confusion_matrices
from mmclin.reports.sections import Report, find_mentions, parse_sections

__all__ = ["COARSE_TYPES", "FINE_TYPES", "InjectedError", "Report", "RuleChecker", "corpus_summary", "find_mentions",
           "inject", "inject_corpus", "parse_sections", "score_checker", "write_confusion_matrices"]
