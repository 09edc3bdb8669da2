"""What a data module may ask of the model, handed over explicitly (litgpt's ``connect``) instead of
the data module reaching into the trainer's LightningModule."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ConnectsToModel(Protocol):
    """A data module that needs run-time facts of the model; the tadm CLI calls :meth:`connect` once
    model and data module are built (call it yourself when you build them in Python)."""

    def connect(self, backbone_id: str, latent_rescaler: bool) -> None:
        """``backbone_id``: the model's backbone (cached latents of another are not served);
        ``latent_rescaler``: whether the rescaler works on latents at all."""
