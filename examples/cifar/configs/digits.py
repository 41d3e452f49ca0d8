"""Offline quickstart: scikit-learn's digits as 32x32 images, ResNet-8, SGD; no download needed.

    python -m examples.cifar.compare --config digits --arms none,gc,gcc --seeds 0,1

Numbers: see the README (measured on 2 CPU cores).
"""

from examples.cifar.config import Config


def get_config() -> Config:
  """A few minutes on a laptop CPU: small model, few epochs, cosine schedule."""
  return Config(dataset="digits", model="resnet8", augment="crop", epochs=6, batch_size=32,
                schedule="cosine", gc_log_every_epochs=3, log_every_steps=5)
