"""The Gradio Blocks: layout first, then the wiring of events to handlers (STYLE rule 13).

Every event that touches the model shares one queue slot (``concurrency_id="model"``, limit 1):
users take turns on the one shared model instead of loading it twice.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import gradio as gr

from app import analysis, handlers, tile_handlers
from app.map_component import make_map
from app.server import PreviewStore
from app.session import Session
from app.settings import AppSettings
from app.state import ModelHolder

__all__ = ["build_demo", "CSS"]

logger = logging.getLogger(__name__)

CSS = """
#skymoe-side { min-width: 380px; }
#skymoe-notice p { margin: 0; }
"""
MODEL_QUEUE = {"concurrency_id": "model", "concurrency_limit": 1}


@dataclass
class _RasterTab:
    upload: gr.File
    server_path: gr.Textbox
    bands: gr.Dropdown
    custom_bands: gr.Textbox
    stretch_low: gr.Number
    stretch_high: gr.Number
    pixel_mode: gr.Checkbox
    load: gr.Button
    info: gr.Markdown


@dataclass
class _AnalyseTab:
    task: gr.Dropdown
    query: gr.Textbox
    tile: gr.Number
    overlap: gr.Number
    batch: gr.Number
    scope: gr.Radio
    aoi: gr.Textbox
    run: gr.Button
    stop: gr.Button
    status: gr.Markdown


@dataclass
class _ResultsTab:
    counts: gr.Dataframe
    detections: gr.Dataframe
    answers: gr.Dataframe
    fmt: gr.Radio
    export: gr.Button
    file: gr.File


def _raster_tab(settings: AppSettings, info: str) -> _RasterTab:
    upload = gr.File(label=f"Upload a GeoTIFF (at most {settings.max_upload_mb:g} MB)", type="filepath",
                     file_types=[".tif", ".tiff", ".vrt", ".img", ".jp2"])
    folders = ", ".join(str(d) for d in settings.allowed_dirs)
    server_path = gr.Textbox(label="...or a path on the server", placeholder=f"inside {folders}")
    with gr.Row():
        bands = gr.Dropdown(handlers.BAND_CHOICES, value="auto", label="Band preset")
        custom_bands = gr.Textbox(label="Custom bands (1-based)", placeholder="4,3,2")
    with gr.Row():
        low = gr.Number(2, label="Stretch low %", minimum=0, maximum=100)
        high = gr.Number(98, label="Stretch high %", minimum=0, maximum=100)
    pixel = gr.Checkbox(False, label="Pixel coordinates (no CRS)")
    load = gr.Button("Open raster", variant="primary")
    return _RasterTab(upload, server_path, bands, custom_bands, low, high, pixel, load, gr.Markdown(info))


def _analyse_tab() -> _AnalyseTab:
    task = gr.Dropdown(analysis.TASK_CHOICES, value="count", label="Task")
    query = gr.Textbox(label="Query: class to count, expression to find, or question",
                       placeholder="small vehicle")
    scope = gr.Radio(analysis.SCOPES, value="Whole scene", label="Run over")
    aoi = gr.Textbox(label="Area of interest: west,south,east,north (degrees; draw it with ▭ on the map)")
    with gr.Row():
        run = gr.Button("Run", variant="primary")
        stop = gr.Button("Stop", variant="stop")
    status = gr.Markdown()
    with gr.Accordion("Tiles and batches", open=False):
        with gr.Row():
            tile = gr.Number(504, label="Tile (px)", precision=0, minimum=64, maximum=4096)
            overlap = gr.Number(64, label="Overlap (px)", precision=0, minimum=0, maximum=2048)
            batch = gr.Number(8, label="Batch size", precision=0, minimum=1, maximum=64)
    return _AnalyseTab(task, query, tile, overlap, batch, scope, aoi, run, stop, status)


def _results_tab() -> _ResultsTab:
    counts = gr.Dataframe(handlers.counts_table(None), label="Counts", interactive=False)
    detections = gr.Dataframe(handlers.detections_table(None), label="Detections (click a row to zoom)",
                              interactive=False, max_height=320)
    answers = gr.Dataframe(analysis.answers_table(None), label="Per-tile answers", interactive=False,
                           max_height=240, wrap=True)
    with gr.Row():
        fmt = gr.Radio(list(handlers.EXPORT_FORMATS), value="GeoJSON (EPSG:4326)", label="Export as")
        export = gr.Button("Export")
    return _ResultsTab(counts, detections, answers, fmt, export, gr.File(label="Download", interactive=False))


@dataclass
class _Ui:
    """Every component the wiring needs."""

    session: gr.State
    notice: gr.Markdown
    the_map: gr.HTML
    selected: gr.Textbox
    raster: _RasterTab
    analyse: _AnalyseTab
    results: _ResultsTab
    chatbot: gr.Chatbot
    question: gr.Textbox
    ask: gr.Button
    routing_task: gr.Dropdown
    show_routing: gr.Button
    routing_note: gr.Markdown
    heatmaps: gr.Image
    loads: gr.Image
    model_info: gr.Markdown
    model_dir: gr.Textbox
    quant: gr.Radio
    device: gr.Radio
    load_model: gr.Button
    model_timer: gr.Timer


def _chat_tab() -> tuple[gr.Chatbot, gr.Textbox, gr.Button]:
    chatbot = gr.Chatbot(label="Questions about the selected tile", height=360)
    gr.Markdown("Questions about the same tile continue one conversation (the model sees the earlier "
                "turns; the tile is encoded once). Selecting another tile starts a new one.")
    question = gr.Textbox(label="Question", placeholder="Is there a runway?")
    return chatbot, question, gr.Button("Ask", variant="primary")


def _routing_tab() -> tuple[gr.Dropdown, gr.Button, gr.Markdown, gr.Image, gr.Image]:
    task = gr.Dropdown(list(tile_handlers.ROUTING_QUERIES), value="caption", label="Heatmaps for task")
    show = gr.Button("Show routing on the selected tile", variant="primary")
    note = gr.Markdown()
    # Labels as headings: the image's own label chip would cover the figures' top-left titles.
    gr.Markdown("**Per-expert heatmaps** (rows: MoE layers; first column: the tile)")
    heatmaps = gr.Image(label="Per-expert heatmaps", show_label=False, type="pil", interactive=False)
    gr.Markdown("**Expert load per task**")
    loads = gr.Image(label="Expert load per task", show_label=False, type="pil", interactive=False)
    return task, show, note, heatmaps, loads


def _model_tab(settings: AppSettings) -> tuple[gr.Markdown, gr.Textbox, gr.Radio, gr.Radio, gr.Button]:
    info = gr.Markdown()
    model_dir = gr.Textbox(str(settings.model_dir or ""), label="Checkpoint folder")
    with gr.Row():
        quant = gr.Radio(["4bit", "8bit", "none"], value=settings.quant, label="Quantization")
        device = gr.Radio(["auto", "cpu", "cuda"], value=settings.device, label="Device")
    return info, model_dir, quant, device, gr.Button("Load model", variant="primary")


def _layout(settings: AppSettings, initial: Session, initial_info: str) -> _Ui:
    """The components, inside an open ``gr.Blocks``: the map left, the tabs right."""
    session = gr.State(initial)
    gr.Markdown("## SkyMoE Geo: ask a remote-sensing model about a GeoTIFF")
    notice = gr.Markdown(elem_id="skymoe-notice")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            the_map = make_map(initial.map)
        with gr.Column(scale=2, elem_id="skymoe-side"):
            selected = gr.Textbox(label="Selected tile (click a grid tile on the map; used by Chat and Routing)",
                                  placeholder="none: the first tile")
            with gr.Tabs():
                with gr.Tab("Raster"):
                    raster = _raster_tab(settings, initial_info)
                with gr.Tab("Analyse"):
                    analyse = _analyse_tab()
                with gr.Tab("Results"):
                    results = _results_tab()
                with gr.Tab("Chat"):
                    chat = _chat_tab()
                with gr.Tab("Routing"):
                    routing = _routing_tab()
                with gr.Tab("Model"):
                    model = _model_tab(settings)
    return _Ui(session, notice, the_map, selected, raster, analyse, results, *chat, *routing, *model,
               model_timer=gr.Timer(1.5))


def _wire_raster_and_map(ui: _Ui, settings: AppSettings, previews: PreviewStore) -> None:
    rt, at = ui.raster, ui.analyse
    load_inputs = [rt.upload, rt.server_path, rt.bands, rt.custom_bands, rt.stretch_low, rt.stretch_high,
                   rt.pixel_mode, at.tile, at.overlap]
    load_outputs = [ui.session, ui.the_map, rt.info, ui.selected]
    load_fn = functools.partial(handlers.load_raster, settings=settings, previews=previews)
    rt.load.click(load_fn, load_inputs, load_outputs, api_name="load_raster", show_progress_on=[rt.info])
    rt.upload.upload(load_fn, load_inputs, load_outputs, api_visibility="private", show_progress_on=[rt.info])
    at.task.change(analysis.query_hint, [at.task], [at.query], api_visibility="private", show_progress="hidden")
    ui.the_map.aoi(handlers.on_aoi, [ui.session], [ui.session, at.aoi, at.scope], api_visibility="private",
                   show_progress="hidden")
    ui.the_map.tile_select(handlers.on_tile_select, [ui.session], [ui.session, ui.selected],
                           api_visibility="private", show_progress="hidden")
    ui.results.detections.select(handlers.select_result_row, [ui.session], [ui.session, ui.the_map],
                                 api_visibility="private", show_progress="hidden")
    ui.results.export.click(handlers.export_result, [ui.session, ui.results.fmt], [ui.results.file], api_name="export")


def _wire_model_events(ui: _Ui, holder: ModelHolder) -> None:
    at, res = ui.analyse, ui.results
    run_event = at.run.click(
        functools.partial(analysis.run_analysis, holder=holder),
        [ui.session, at.task, at.query, at.tile, at.overlap, at.batch, at.scope, at.aoi],
        [ui.session, ui.the_map, res.detections, res.counts, res.answers, at.status, ui.selected],
        api_name="analyze", show_progress_on=[at.status], **MODEL_QUEUE)
    at.stop.click(analysis.stopped_status, [ui.session], [at.status], cancels=[run_event], api_name="stop")
    chat_inputs = [ui.session, ui.question, ui.chatbot, ui.selected]
    chat_outputs = [ui.chatbot, ui.question, ui.session, ui.the_map]
    chat_fn = functools.partial(tile_handlers.chat, holder=holder)
    ui.ask.click(chat_fn, chat_inputs, chat_outputs, api_name="chat", show_progress_on=[ui.chatbot], **MODEL_QUEUE)
    ui.question.submit(chat_fn, chat_inputs, chat_outputs, api_visibility="private", show_progress_on=[ui.chatbot],
                       **MODEL_QUEUE)
    ui.show_routing.click(functools.partial(tile_handlers.routing, holder=holder),
                          [ui.session, ui.selected, ui.routing_task],
                          [ui.heatmaps, ui.loads, ui.routing_note, ui.session, ui.the_map], api_name="routing",
                          show_progress_on=[ui.routing_note], **MODEL_QUEUE)
    ui.load_model.click(functools.partial(handlers.load_model, holder=holder), [ui.model_dir, ui.quant, ui.device],
                        [ui.model_info], api_name="load_model", **MODEL_QUEUE).then(
        functools.partial(_notice, holder), None, [ui.notice], api_visibility="private")


def build_demo(settings: AppSettings, holder: ModelHolder, previews: PreviewStore,
               initial: Session, initial_info: str) -> gr.Blocks:
    """The app's Blocks for ``settings``, sharing ``holder``'s model and ``previews``."""
    with gr.Blocks(title="SkyMoE Geo") as demo:
        ui = _layout(settings, initial, initial_info)
        refresh = functools.partial(_refresh_model, holder, settings.model_dir is not None)
        status_outputs = [ui.notice, ui.model_info, ui.model_timer]
        demo.load(refresh, None, status_outputs, api_visibility="private")
        ui.model_timer.tick(refresh, None, status_outputs, api_visibility="private", show_progress="hidden")
        _wire_raster_and_map(ui, settings, previews)
        _wire_model_events(ui, holder)
    return demo


def _refresh_model(holder: ModelHolder, asked: bool) -> tuple[str, str, gr.Timer]:
    """Notice line, Model tab report, and the polling timer (stopped once the start-up load settled)."""
    status = holder.status
    settled = not asked or status.loaded or bool(status.error)
    return _notice(holder), handlers.model_report(holder), gr.Timer(active=not settled)


def _notice(holder: ModelHolder) -> str:
    """One line above the map: the model in use, or what is missing."""
    status = holder.status
    if status.loaded and status.summary is not None:
        text = f"Model: `{status.path.name}` ({status.summary.quantization}, {status.summary.device})"
        if status.notices:
            text += " ⚠️ " + " ".join(status.notices)
        return text
    if status.loading:
        return f"Model `{status.path}` is loading..."
    reason = (status.error or "none was asked for at start").rstrip(".")
    return f"⚠️ No model loaded: {reason}. Load one in the Model tab."
