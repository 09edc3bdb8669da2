"""``tadm demo``: the codec as a local web page (docs/demo.md).

    tadm demo                                   # the shipped CPU model at http://127.0.0.1:7860
    tadm demo --ckpt runs/enhancer_x16/checkpoints/last.ckpt --port 8080

Upload a photo (or pick a bundled one): the page shows the LR file, the photo restored from it, bicubic down
+ up, a before/after slider and the scores; a second tab restores an LR file alone. The checkpoint, device,
precision, tiling and colour-fix options are ``tadm upscale``'s. It listens on 127.0.0.1 unless ``--host``
says otherwise, makes a public gradio.live link only with ``--share``, and sends no analytics. Needs the
``demo`` extra (gradio): ``pip install 'tadm[demo]'``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import socket
from collections.abc import Sequence
from pathlib import Path

from tadm.commands.common import add_color_fix_argument, add_model_arguments, command, load_from_args
from tadm.demo import DEFAULT_MAX_MEGAPIXELS
from tadm.errors import InputError, TadmError
from tadm.inference.codec import DEFAULT_MAX_HR_SIDE

REPO = Path(__file__).resolve().parents[2]
#: the model ``tadm demo`` serves without --ckpt: the best shipped CPU model (docs/shipped_model.md; ships with
#: a checkout, works on a CPU with no download)
SHIPPED_MODEL = REPO / "assets" / "models" / "photos_x16.safetensors"
#: the bundled photos the page offers (public domain / CC0, assets/samples/LICENSES.md)
SAMPLE_FOLDERS = (REPO / "assets" / "samples" / "val", REPO / "assets" / "samples" / "heldout")
INSTALL_HINT = "pip install 'tadm[demo]' (in a checkout: pip install -e '.[demo]')"


def parser() -> argparse.ArgumentParser:
    """``tadm demo``'s options: ``tadm upscale``'s model options (``--ckpt`` optional) plus the server's."""
    ap = argparse.ArgumentParser(
        prog="tadm demo",
        description="The codec as a local web page: a photo through the model, its LR file, the restored photo, "
        "bicubic beside it and the scores; an LR file restored alone (docs/demo.md).",
    )
    add_model_arguments(ap)
    # the shared options, adapted: --ckpt defaults to the shipped model; no console progress bar to turn off
    for action in ap._actions:
        if action.dest == "ckpt":
            action.required = False
            action.default = str(SHIPPED_MODEL)
            action.help = f"checkpoint or export (default: the shipped {SHIPPED_MODEL.relative_to(REPO)})"
        elif action.dest == "no_progress":
            action.help = argparse.SUPPRESS
    add_color_fix_argument(ap)
    ap.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    ap.add_argument(
        "--port",
        type=_port,
        default=None,
        help="port (default: the first free one from 7860, as gradio picks)",
    )
    ap.add_argument(
        "--share", action="store_true", help="also make a public gradio.live link (off by default)"
    )
    ap.add_argument(
        "--max-megapixels",
        type=_positive,
        default=DEFAULT_MAX_MEGAPIXELS,
        help=f"refuse larger photos with a message (default {DEFAULT_MAX_MEGAPIXELS:g}; the commands take any size)",
    )
    ap.add_argument(
        "--max-hr-side",
        type=int,
        default=DEFAULT_MAX_HR_SIDE,
        help="as tadm upscale: refuse an LR file without tadm metadata whose restored longer side would pass this",
    )
    ap.add_argument(
        "--no-perceptual", action="store_true", help="no LPIPS/DISTS even when the VGG16 weights are present"
    )
    return ap


@command("tadm demo")
def demo_command(argv: Sequence[str]) -> int:
    """Serve the demo page until Ctrl-C."""
    args = parser().parse_args(list(argv))
    if not _installed("gradio"):  # before the model loads: say what to install, exit 2
        raise TadmError(f"the web demo needs gradio, which is not installed: {INSTALL_HINT}")
    # a taken port or an address not of this machine: one line now, not after the model has loaded
    _check_listen(args.host, args.port)
    if args.ckpt == str(SHIPPED_MODEL) and not SHIPPED_MODEL.is_file():
        raise InputError(f"no --ckpt given, and the shipped model is not at '{SHIPPED_MODEL}': give --ckpt")
    codec = load_from_args(args)
    from tadm.demo.app import serve

    samples = [
        p for folder in SAMPLE_FOLDERS if folder.is_dir() for p in sorted(folder.iterdir()) if _is_photo(p)
    ]
    return serve(
        codec,
        host=args.host,
        port=args.port,
        share=args.share,
        max_megapixels=args.max_megapixels,
        max_hr_side=args.max_hr_side,
        perceptual=not args.no_perceptual,
        samples=samples,
    )


def _check_listen(host: str, port: int | None) -> None:
    """Bind ``host:port`` once, as the server will (without a port gradio picks a free one itself)."""
    if port is None:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as err:
        raise InputError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); choose another --port, "
            "or leave it out for the first free one from 7860"
        ) from err


def _installed(package: str) -> bool:
    """Importable and installed: an uninstalled gradio can leave a folder behind (a file it wrote at run time),
    which imports as an empty namespace package."""
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _is_photo(path: Path) -> bool:
    return path.suffix.lower() in (".png", ".jpg", ".jpeg")


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {port}")
    return port


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
