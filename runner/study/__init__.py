"""The sensitivity study: which groups of a model's linear layers a precision hurts, and the
recipe that keeps the fewest of them in FP32 to meet the job's tolerance.

- ranking.py: the study itself, plain functions (groups, measurements, the ranking, the recipe);
- stage.py: the stage of `quantbench run` that drives it over the cluster and writes its file;
- steps.py: what a worker runs for one of its steps (torch);
- report.py: its section of `quantbench report` (matplotlib).
"""
