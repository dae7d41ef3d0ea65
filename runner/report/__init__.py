"""Figures, plots and the HTML report of a run or sweep directory (`jobs/report.py`)."""

from runner.report.html import REPORT_DIR, Report, build_report

__all__ = ["REPORT_DIR", "Report", "build_report"]
