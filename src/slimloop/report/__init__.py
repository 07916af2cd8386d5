"""The report: inputs, comparison table, summary text, plots and the gallery of regressions."""
