"""Running a scenario: the runner and its typed results, memory estimates, admission,
the worker pool and the worker, shipping arrays between them, metrics, sweeps.
Never imports the judging or the page.
"""
