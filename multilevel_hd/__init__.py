"""multilevel_hd: multi-level hyper-gradient descent optimizers for PyTorch."""
from .diagnostics import log_rates, rate_summary
from .optimizer import MultiLevelAdam, MultiLevelAdamW, MultiLevelSGD

__all__ = ["MultiLevelSGD", "MultiLevelAdam", "MultiLevelAdamW", "rate_summary", "log_rates"]
__version__ = "0.1.0"
