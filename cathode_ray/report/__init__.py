"""Report stage: the governance report (checks, metrics, plots). Pure numpy / matplotlib."""

from cathode_ray.report.governance import SplitData, report_from_predictions, write_report

__all__ = ["SplitData", "report_from_predictions", "write_report"]
