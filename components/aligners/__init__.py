"""Timestep aligners (contract: :class:`tadm.contracts.TimestepAligner`): choose the one-step
diffusion timestep from the reconstructed latent. One module per aligner."""
