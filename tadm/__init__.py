"""tadm: extreme image rescaling (x16, x32) with diffusion priors, on PyTorch Lightning."""

__version__ = "0.1.0"
