"""Rescalers (contract: :class:`tadm.contracts.Rescaler`): HR image (+ latent) -> 8-bit LR image ->
reconstruction. One module per rescaler."""
