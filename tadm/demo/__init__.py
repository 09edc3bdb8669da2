"""``tadm demo``: the codec as a local web page (docs/demo.md).

- :mod:`~tadm.demo.round_trip`: what the page shows, without gradio: a photo through the real codec
  (``Codec.downscale``, the LR file ``tadm downscale`` writes, ``Codec.upscale`` of that file), bicubic down + up,
  PSNR-Y / SSIM-Y / LPIPS from ``tadm evaluate``'s metrics, the timestep map; around it
  :mod:`~tadm.demo.uploads` (every bad input becomes one :class:`~tadm.demo.uploads.DemoError` line for the
  page), :mod:`~tadm.demo.jobs` (progress per tile and Stop) and :mod:`~tadm.demo.results` (what a job returns).
- :mod:`~tadm.demo.app`: the gradio page around it (the only module that imports gradio, the ``demo`` extra);
  what the page shows of a result (Markdown, HTML, picture files) comes from :mod:`~tadm.demo.views`.

Sits beside training and studies, below the commands (``tadm.commands.demo`` imports it lazily); may import
the model, inference, evaluation and data layers; nothing below imports it.
"""

#: photos above this many pixels are refused with a message (``tadm demo --max-megapixels``); the commands take any
DEFAULT_MAX_MEGAPIXELS = 16.0
