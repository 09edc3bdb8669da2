"""The ``tadm demo`` page: gradio around :class:`~tadm.demo.round_trip.Demo` (the only module that imports gradio).

Two tabs. "Photo -> LR -> photo": a photo (uploaded or bundled) goes through the codec; the page shows the LR
file at its real size and magnified (nearest neighbour) with its pixels, bytes and bits per pixel of the
original, the photo restored from that file, bicubic down + up, a before/after slider between any two of
original / restored / bicubic, PSNR-Y / SSIM-Y (then LPIPS / DISTS when VGG16 is on disk) for both, the
enhancer's timestep map, and both PNGs to download. "LR file -> photo": an LR file restored alone. What the
page shows of a result (Markdown, HTML, picture files) is made in :mod:`tadm.demo.views`; this module wires it.

gradio is imported inside the functions, after ``GRADIO_ANALYTICS_ENABLED=False`` (no analytics, no update
check); uploads and results live in a temporary folder deleted when the demo stops. One codec job runs at a
time (memory: one CLI call's); Stop ends it at the next tile; any error is a line in the page and the app
goes on serving.
"""

# No ``from __future__ import annotations`` here: gradio finds the ``gr.Request`` parameter of a handler by
# its annotation, which must be the class itself, not a string naming a name local to ``build_app``.
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tadm.demo.jobs import Cancelled, SessionJobs
from tadm.demo.results import PhotoResult
from tadm.demo.round_trip import Demo
from tadm.demo.views import (
    CSS,
    done_md,
    error_md,
    heat_file,
    internal_error_md,
    load_view,
    lr_html,
    nearest,
    photo_views,
    save_view,
    scores_html,
    timestep_label,
)
from tadm.errors import TadmError
from tadm.inference.codec import Codec

#: what the before/after slider can compare
VIEWS = ("original", "restored", "bicubic")
#: the largest upload gradio accepts (a 16 MP 16-bit PNG is ~100 MB); a larger one gets gradio's message
MAX_UPLOAD = "300mb"


def serve(
    codec: Codec,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    max_megapixels: float | None = None,
    max_hr_side: int | None = None,
    perceptual: bool = True,
    samples: Sequence[Path] = (),
) -> int:
    """Serve the page until Ctrl-C (KeyboardInterrupt) or SIGTERM (exit 143); the temporary folder goes with it."""
    with tempfile.TemporaryDirectory(prefix="tadm-demo-") as tmp:
        work = Path(tmp)
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported and when Blocks start
        os.environ["GRADIO_TEMP_DIR"] = str(
            work / "uploads"
        )  # uploads go with the demo, not into /tmp/gradio
        import gradio as gr

        options: dict[str, Any] = {"perceptual": perceptual}
        if max_megapixels is not None:
            options["max_megapixels"] = max_megapixels
        if max_hr_side is not None:
            options["max_hr_side"] = max_hr_side
        demo = Demo(codec, work / "results", **options)
        print(f"tadm demo: {demo.describe()}; warming up ...", flush=True)
        demo.warm_up()
        app = build_app(demo, samples)
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            _, local_url, share_url = _launch(
                app,
                server_name=host,
                server_port=port,
                share=share,
                prevent_thread_lock=True,
                inbrowser=False,
                show_error=True,
                quiet=True,
                allowed_paths=[str(demo.work_dir), *{str(Path(p).parent) for p in samples}],
                max_file_size=MAX_UPLOAD,
                ssr_mode=False,
                mcp_server=False,
                pwa=False,
                enable_monitoring=False,
                theme=gr.themes.Default(),
                css=CSS,
            )
            where = f"{local_url}" + (f" and {share_url}" if share_url else "")
            print(f"tadm demo: serving at {where} (Ctrl-C stops)", flush=True)
            while True:
                time.sleep(0.5)
        except (KeyboardInterrupt, SystemExit) as stop:
            code = 130 if isinstance(stop, KeyboardInterrupt) else stop.code
            _exit_after(2 * EXIT_GRACE_S, code if isinstance(code, int) else 1)  # after close and cleanup
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            _close(app, EXIT_GRACE_S)
    return 0


#: seconds the server's threads get to end after Ctrl-C / SIGTERM before the process exits without them
EXIT_GRACE_S = 10.0


def _close(app: Any, timeout: float) -> None:
    """``app.close()``, waiting at most ``timeout`` s: an open browser connection can hold uvicorn's shutdown."""
    closer = threading.Thread(target=app.close, daemon=True)
    closer.start()
    closer.join(timeout)


def _exit_after(seconds: float, code: int) -> None:
    """Make sure the process ends: gradio's worker threads are not daemons, and one still waiting on a
    connection would keep the interpreter from exiting after the temporary folder is gone."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def _launch(app: Any, **options: Any) -> Any:
    """``app.launch``; no free port (gradio tries 7860-7959 without --port) is one line naming the options."""
    try:
        return app.launch(**options)
    except OSError as err:
        port = options.get("server_port")
        where = f"port {port}" if port else "a free port from 7860 to 7959"
        reason = str(err).split(". You can")[0]
        raise TadmError(
            f"cannot listen on {options.get('server_name')}, {where}: {reason}; choose a --port"
        ) from err


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends the server like Ctrl-C does, so the temporary folder is removed."""
    sys.exit(128 + signum)


def build_app(demo: Demo, samples: Sequence[Path] = ()) -> Any:
    """The gr.Blocks page for ``demo`` (not launched)."""
    import gradio as gr

    jobs = SessionJobs()

    def run_photo(path: str | None, request: gr.Request, progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
        if not path:
            return _photo_outputs(gr, "Upload a photo or pick a bundled one.")
        key = _session(request)
        cancel = jobs.start(key)
        name = Path(path).name
        try:
            result = demo.round_trip(
                path, name=name, progress=_progress(progress), cancel=cancel, scores=None
            )
        except Cancelled:
            return _photo_outputs(gr, f"Stopped: {name}.")
        except TadmError as err:
            return _photo_outputs(gr, error_md(err))
        except Exception as err:  # a bug: say it in the page, log it, keep serving
            return _photo_outputs(gr, internal_error_md(err))
        finally:
            jobs.end(key, cancel)
        views = photo_views(result, demo.codec.scale)
        status = done_md(result.name, result.hr_size, result.seconds, result.notes)
        return (
            status,
            lr_html(result.lr_file, result.lr_size, result.hr_size),
            views["lr"],
            views["restored"],
            views["bicubic"],
            (views["original"], views["restored"]),
            scores_html(
                result.scores, _pending(demo, result) if result.scores else "computing the scores ..."
            ),
            gr.update(value=views.get("timesteps"), label=timestep_label(result), visible=demo.has_enhancer),
            str(result.lr_file),
            str(result.restored_file),
            # what later steps need; the images stay on disk, not in the session's memory
            {"views": views, "scores": result.scores, "hr_size": result.hr_size},
        )

    def run_scores(state: dict[str, Any] | None, request: gr.Request) -> tuple[Any, Any]:
        """PSNR-Y / SSIM-Y of a large photo once its images are on the page (the numbers ``round_trip`` gives)."""
        if not state or state["scores"]:
            return gr.update(), state
        key = _session(request)
        cancel = jobs.start(key)
        try:
            views = state["views"]
            original, restored, bicubic = (load_view(views[k]) for k in ("original", "restored", "bicubic"))
            scores = demo.score(original, restored, bicubic, cancel=cancel)
        except Cancelled:
            return scores_html(None, "scores: stopped"), state
        except Exception as err:
            traceback.print_exc()
            return scores_html(None, f"scores failed: {type(err).__name__}: {err}"), state
        finally:
            jobs.end(key, cancel)
        state = {**state, "scores": scores}
        pending = demo.perceptual_reason(state["hr_size"]) or "LPIPS/DISTS: computing ..."
        return scores_html(scores, pending), state

    def run_perceptual(state: dict[str, Any] | None, request: gr.Request) -> Any:
        if not state or not state["scores"] or demo.perceptual_reason(state["hr_size"]) is not None:
            return gr.update()
        key = _session(request)
        cancel = jobs.start(key)
        try:
            views = state["views"]
            original, restored, bicubic = (load_view(views[k]) for k in ("original", "restored", "bicubic"))
            scores = demo.perceptual(original, restored, bicubic, cancel=cancel)
        except Cancelled:
            return scores_html(state["scores"], "LPIPS/DISTS: stopped")
        except Exception as err:  # a result pruned from disk meanwhile, a bug: the scores shown stay
            traceback.print_exc()
            return scores_html(state["scores"], f"LPIPS/DISTS failed: {type(err).__name__}: {err}")
        finally:
            jobs.end(key, cancel)
        return scores_html(scores or state["scores"], None)

    def slide(left: str, right: str, state: dict[str, Any] | None) -> Any:
        if not state:
            return None
        return (state["views"][left], state["views"][right])

    def run_restore(path: str | None, request: gr.Request, progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
        if not path:
            return _restore_outputs(gr, "Upload an LR PNG (from `tadm downscale` or the first tab).")
        key = _session(request)
        cancel = jobs.start(key)
        name = Path(path).name
        try:
            result = demo.restore(path, name=name, progress=_progress(progress), cancel=cancel)
        except Cancelled:
            return _restore_outputs(gr, f"Stopped: {name}.")
        except TadmError as err:
            return _restore_outputs(gr, error_md(err))
        except Exception as err:
            return _restore_outputs(gr, internal_error_md(err))
        finally:
            jobs.end(key, cancel)
        folder = result.restored_file.parent
        h, w = result.lr.shape[:2]
        magnified = save_view(folder / "lr.view.png", nearest(result.lr, demo.codec.scale))
        return (
            done_md(result.name, result.hr_size, result.seconds, result.notes),
            lr_html(Path(path), (h, w), result.hr_size),
            magnified,
            str(result.restored_file),
            gr.update(value=heat_file(result), label=timestep_label(result), visible=demo.has_enhancer),
            str(result.restored_file),
        )

    def stop(request: gr.Request) -> str:
        return (
            "**Stopped.** The page is ready for the next one."
            if jobs.stop(_session(request))
            else "Nothing is running."
        )

    with gr.Blocks(title="tadm demo", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(
            f"## tadm: extreme image rescaling, x{demo.codec.scale}\n"
            f"{demo.describe()} · {demo.perceptual_note} · photos up to {demo.max_megapixels:g} MP · runs on this "
            "machine; nothing is sent anywhere",
            elem_id="model",
        )
        with gr.Tabs():
            with gr.Tab("Photo → LR → photo", id="photo-tab"):
                with gr.Row():
                    with gr.Column(scale=1):
                        photo = gr.File(
                            label="Photo", file_count="single", type="filepath", elem_id="photo-input"
                        )
                        with gr.Row():
                            run_button = gr.Button("Round trip", variant="primary", elem_id="photo-run")
                            stop_button = gr.Button("Stop", variant="stop", elem_id="photo-stop")
                    with gr.Column(scale=1):
                        if samples:
                            gr.Examples(
                                [[str(p)] for p in samples],
                                inputs=[photo],
                                label="Bundled photos (public domain / CC0)",
                                examples_per_page=8,
                            )
                status = gr.Markdown("Upload a photo or pick a bundled one.", elem_id="photo-status")
                with gr.Row():
                    with gr.Column(scale=1):
                        lr_real = gr.HTML(elem_id="lr-real")
                        scores = gr.HTML(elem_id="scores")
                        with gr.Row():
                            lr_download = gr.File(
                                label="LR file (what tadm upscale reads)", elem_id="lr-download"
                            )
                            restored_download = gr.File(label="Restored PNG", elem_id="restored-download")
                    lr_big = gr.Image(
                        label="LR image magnified (nearest neighbour)",
                        type="filepath",
                        interactive=False,
                        elem_id="lr-magnified",
                        scale=1,
                    )
                with gr.Row():
                    restored = gr.Image(
                        label="Restored from the LR file",
                        type="filepath",
                        interactive=False,
                        elem_id="restored",
                    )
                    bicubic = gr.Image(
                        label="Bicubic down + up (the baseline)",
                        type="filepath",
                        interactive=False,
                        elem_id="bicubic",
                    )
                with gr.Row():
                    left = gr.Dropdown(
                        list(VIEWS), value="original", label="Slider: left", elem_id="slider-left"
                    )
                    right = gr.Dropdown(
                        list(VIEWS), value="restored", label="Slider: right", elem_id="slider-right"
                    )
                slider = gr.ImageSlider(label="Before / after", type="filepath", elem_id="slider")
                timesteps = gr.Image(
                    label="Timestep map the aligner chose",
                    type="filepath",
                    interactive=False,
                    visible=demo.has_enhancer,
                    elem_id="timesteps",
                )
                state = gr.State(None)
            with gr.Tab("LR file → photo", id="restore-tab"):
                with gr.Row():
                    lr_input = gr.File(
                        label="LR PNG", file_count="single", type="filepath", elem_id="lr-input"
                    )
                    with gr.Column():
                        restore_button = gr.Button("Restore", variant="primary", elem_id="lr-run")
                        restore_stop = gr.Button("Stop", variant="stop", elem_id="lr-stop")
                restore_status = gr.Markdown(
                    "Upload an LR PNG (from `tadm downscale` or the first tab).", elem_id="lr-status"
                )
                with gr.Row():
                    lr_view = gr.HTML(elem_id="lr-real-2")
                    lr_big_2 = gr.Image(
                        label="LR image magnified (nearest neighbour)",
                        type="filepath",
                        interactive=False,
                        elem_id="lr-magnified-2",
                    )
                restored_2 = gr.Image(
                    label="Restored", type="filepath", interactive=False, elem_id="restored-2"
                )
                timesteps_2 = gr.Image(
                    label="Timestep map the aligner chose",
                    type="filepath",
                    interactive=False,
                    visible=demo.has_enhancer,
                    elem_id="timesteps-2",
                )
                restored_download_2 = gr.File(label="Restored PNG", elem_id="restored-download-2")

        photo_outputs = [
            status,
            lr_real,
            lr_big,
            restored,
            bicubic,
            slider,
            scores,
            timesteps,
            lr_download,
            restored_download,
            state,
        ]
        heavy = {"concurrency_limit": 1, "concurrency_id": "codec"}
        photo_events = []
        for trigger in (photo.change, run_button.click):
            event = trigger(run_photo, [photo], photo_outputs, show_progress="full", **heavy)
            scored = event.then(run_scores, [state], [scores, state], show_progress="hidden", **heavy)
            perceptual = scored.then(run_perceptual, [state], [scores], show_progress="hidden", **heavy)
            photo_events += [event, scored, perceptual]
        for dropdown in (left, right):
            dropdown.change(slide, [left, right, state], [slider], queue=False)
        stop_button.click(stop, None, [status], cancels=photo_events, queue=False)

        restore_outputs = [restore_status, lr_view, lr_big_2, restored_2, timesteps_2, restored_download_2]
        restore_events = [
            trigger(run_restore, [lr_input], restore_outputs, show_progress="full", **heavy)
            for trigger in (lr_input.change, restore_button.click)
        ]
        restore_stop.click(stop, None, [restore_status], cancels=restore_events, queue=False)
    return app


# ---------------------------------------------------------------------------------------------- page pieces


def _pending(demo: Demo, result: PhotoResult) -> str:
    return demo.perceptual_reason(result.hr_size) or "LPIPS/DISTS: computing ..."


def _session(request: Any) -> str:
    return str(getattr(request, "session_hash", None) or "local")


def _progress(progress: Any) -> Callable[[float, str], None]:
    def report(fraction: float, text: str) -> None:
        progress(fraction, desc=text)

    return report


def _photo_outputs(gr: Any, message: str) -> tuple[Any, ...]:
    """The photo tab with ``message`` and nothing else: no result of an earlier photo beside an error."""
    # status, LR, LR magnified, restored, bicubic, slider, scores, timesteps, 2 downloads, state
    return (message, "", None, None, None, None, "", gr.update(value=None), None, None, None)


def _restore_outputs(gr: Any, message: str) -> tuple[Any, ...]:
    # status, LR, LR magnified, restored, timesteps, download
    return (message, "", None, None, gr.update(value=None), None)
