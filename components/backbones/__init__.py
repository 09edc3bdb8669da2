"""Diffusion backbones (contract: :class:`tadm.contracts.DiffusionBackbone`): own the VAE and, for
the enhancer, the diffusion model, its noise schedule and the empty-prompt conditioning.

One sub-package per diffusers family over one shared base: ``diffusers_base`` (loading, family
detection, VAE latent space, LoRA, freezing), ``stable_diffusion`` (UNet: SD 1.5 / 2.1 / SDXL),
``flow_transformers`` (rectified-flow transformers: SD 3.5, FLUX.1); ``space_to_depth`` is the
weight-free one. Random-weight twins for tests live in :mod:`tadm.testing.twins`."""
