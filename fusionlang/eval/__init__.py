"""Evaluation of models and merges: `eval` statements on zoo tasks (`evaluation`), and
merge arguments chosen on validation data (`tuning`: `tune()`; search comes here too)."""
