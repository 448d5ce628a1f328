"""The digits benchmark behind `python -m bench.train` (bench/train.py is the command line):
data, models, optimizer families, the training loop, tables and figures, one module each."""
