"""Diffusion backbones (contract: :class:`tadm.contracts.DiffusionBackbone`): own the VAE and, for
the enhancer, the diffusion model, its noise schedule and the empty-prompt conditioning."""
