"""Step benchmarks of multilevel_hd against torch.optim (run from the repository root).

    python -m bench.report --help        the Markdown report (bench/report.py)
    pytest bench                         pytest-benchmark cases (bench/test_step.py)
"""
