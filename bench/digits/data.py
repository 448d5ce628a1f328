"""The data: scikit-learn's bundled handwritten digits (1,797 8x8 images, no download), one
fixed stratified 75/25 split, and its shuffled minibatches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEST_FRACTION = 0.25
SPLIT_SEED = 0  # the split never changes; seeds vary the initialisation and batch order


@dataclass
class Digits:
    x_train: torch.Tensor  # [n, 1, 8, 8], standardised with the training set's statistics
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def resized(self, size: int) -> "Digits":
        """Bilinear upsampling for models that need larger inputs (done once, not per batch)."""
        if size == self.x_train.shape[-1]:
            return self
        up = lambda x: F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return Digits(up(self.x_train), self.y_train, up(self.x_test), self.y_test)


def load_digits_split(device: torch.device) -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    mean, std = x_tr.mean(), x_tr.std()
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32, device=device).view(-1, 1, 8, 8)
    as_y = lambda a: torch.tensor(a, dtype=torch.long, device=device)
    return Digits(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))



def batches(data: Digits, batch_size: int, gen: torch.Generator):
    """Shuffled minibatches; the last partial batch is dropped (a 3-image batch would give
    BatchNorm useless statistics)."""
    order = torch.randperm(len(data.y_train), generator=gen).to(data.y_train.device)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield data.x_train[idx], data.y_train[idx]

