"""multilevel_hd: multi-level hyper-gradient descent optimizers for PyTorch."""
from .optimizer import MultiLevelAdam, MultiLevelAdamW, MultiLevelSGD

__all__ = ["MultiLevelSGD", "MultiLevelAdam", "MultiLevelAdamW"]
__version__ = "0.1.0"
