"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, 10 classes, no download."""

import torch
from sklearn.datasets import load_digits

DIGITS_MAX = 16.0  # pixel intensities in the dataset run 0..16


def load_digits_images():
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels, [str(c) for c in digits.target_names]
