"""The page: the single-image tab (public API ``/detect`` and ``/full_resolution``), the batch tab
(``/detect_batch``) and the examples."""

import functools
import json
from pathlib import Path

import gradio as gr

from zsad.detection.detector import DEFAULT_THRESHOLD, AnomalyDetector

from .config import DISPLAY_SIDE, EXAMPLES_DIR, MAX_REFERENCES, BatchCaps
from .files import FOLDER_LINGER_SECONDS, OutputFolders, full_resolution_files, serving_files
from .handlers import CALIBRATED, FALSE_ALARM_RATES, LOWEST_RATE, SLIDER, make_batch_handler, make_handler, rate_choice_info
from .render import BATCH_TABLE_HEADERS, BATCH_TABLE_TYPES, TABLE_HEADERS, TABLE_TYPES, banner, method_choices, product_label, runtime
from .scheduling import ComputeTurns, taking_turns

BATCH_CONCURRENCY_ID = "batch"
BATCH_CONCURRENCY_LIMIT = 1
# A visitor's last detection (what the full-resolution files are made from) is dropped this long after it was set,
# and when the visitor's tab closes (Gradio's own session end).
LAST_RESULT_SECONDS = 1800
# Gradio's cache (its copies of every returned file: overlays, CSVs, masks.zip) is cleaned like zsad's own request
# folders: every (frequency, age) seconds, the files older than the age zsad's folders linger.
DELETE_CACHE = (int(FOLDER_LINGER_SECONDS) // 2, int(FOLDER_LINGER_SECONDS))


def example_rows() -> list[list]:
    """[image path, class name] rows from examples/examples.json (written by examples/make_examples.py)."""
    manifest = EXAMPLES_DIR / "examples.json"
    if not manifest.is_file():
        return []
    return [[str(EXAMPLES_DIR / row["image"]), row["class_name"]] for row in json.loads(manifest.read_text())]


def gradio_tuple(handler):
    """``handler`` returning a typed result, as Gradio calls it (the outputs' tuple)."""

    @functools.wraps(handler)  # Gradio reads the parameters (the progress tracker) from the handler's signature
    def call(*inputs):
        return handler(*inputs).as_gradio()

    return call


def product_box(detector: AnomalyDetector, method: str, elem_id: str) -> gr.Textbox:
    """The product-name box as ``method`` needs it (its label says when the name is optional)."""
    return gr.Textbox(label=product_label(detector, method), placeholder="e.g. bottle, metal nut, pcb", elem_id=elem_id)


def relabel_on_change(detector: AnomalyDetector, method: gr.Radio, class_name: gr.Textbox) -> None:
    """Picking a method relabels the product-name box (a page event, not part of the public API)."""
    method.change(lambda picked: gr.Textbox(label=product_label(detector, picked)), inputs=[method], outputs=[class_name],
                  queue=False, api_visibility="private")


def batch_tab(detector: AnomalyDetector, caps: BatchCaps, turns: ComputeTurns, output_root: Path | None) -> None:
    """The batch tab's inputs, outputs and event (inside an open ``gr.Tab``)."""
    choices = method_choices(detector, compare=False)
    with gr.Row():
        with gr.Column():
            uploads = gr.File(label=f"Images or a zip of images (up to {caps.max_images} images, {caps.max_megabytes:g} MB, "
                              f"{caps.max_megapixels:g} megapixels)", file_count="multiple", file_types=["image", ".zip"],
                              type="filepath", elem_id="batch-files")
            class_name = product_box(detector, choices[0][1], "batch-class-name")
            method = gr.Radio(choices=choices, value=choices[0][1], label="Method", elem_id="batch-method")
            relabel_on_change(detector, method, class_name)
            threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Threshold (mask and verdict)")
            mutual = gr.Checkbox(False, label="Score the images against each other (no text, no references needed)",
                                 info="at least 2 images of one product; the product name may stay empty for an untrained "
                                 f"method; masks at most {DISPLAY_SIDE} px", elem_id="batch-mutual")
            threshold_mode = gr.Radio(choices=[CALIBRATED, SLIDER], value=CALIBRATED, label="Threshold used",
                                      info="calibrated: the slider for a trained method or images scored against each other, "
                                      "no verdict for an untrained one scored alone; slider: always the slider",
                                      elem_id="batch-threshold-mode")
            run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
        with gr.Column():
            summary = gr.Markdown(label="Summary", elem_id="batch-summary")  # the label names the output in view_api
            csv_file = gr.File(label="Scores (CSV)", elem_id="batch-csv")
            masks_zip = gr.File(label="Masks (zip of PNGs)", elem_id="batch-masks")
    table = gr.Dataframe(headers=BATCH_TABLE_HEADERS, datatype=BATCH_TABLE_TYPES, label="Results (click a header to sort)",
                         interactive=False, elem_id="batch-table")
    views = gr.Gallery(label="Overlays", columns=5, height=420, object_fit="contain", elem_id="batch-gallery")
    run.click(
        gradio_tuple(make_batch_handler(detector, OutputFolders(root=output_root), caps, turns)),
        inputs=[uploads, class_name, method, threshold, mutual, threshold_mode],
        outputs=[table, views, csv_file, masks_zip, summary],
        api_name="detect_batch",
        preprocess=False,  # every upload goes through zsad.space.uploads.received_file
        concurrency_id=BATCH_CONCURRENCY_ID,
        concurrency_limit=BATCH_CONCURRENCY_LIMIT,
    )


def build_demo(detector: AnomalyDetector, batch_caps: BatchCaps = BatchCaps(),
               turns: ComputeTurns | None = None, output_root: Path | None = None) -> gr.Blocks:
    """The Blocks page around ``detector`` (not launched); ``output_root`` holds the requests' output folders (by
    default, temporary folders of their own)."""
    choices = method_choices(detector)
    turns = turns or ComputeTurns()
    with gr.Blocks(title="zsad: zero-shot anomaly detection", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(
            "# zsad: zero-shot anomaly detection\n"
            "Drop an image of a product, type what the product is (optional for a method whose prompts name no product), "
            "pick a method and see where the defect is. "
            "The Batch tab takes many images (or a zip) at once."
        )
        notice = banner(detector)
        if notice:
            gr.Markdown(notice, elem_id="banner")
        with gr.Tab("One image", id="single"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", sources=["upload", "webcam", "clipboard"], type="filepath", elem_id="input-image")
                    class_name = product_box(detector, choices[0][1], "class-name")
                    method = gr.Radio(choices=choices, value=choices[0][1], label="Method", elem_id="method")
                    relabel_on_change(detector, method, class_name)
                    threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Threshold (mask and verdict)",
                                          elem_id="threshold")
                    references = gr.File(label=f"Reference images of good parts (optional, up to {MAX_REFERENCES}): calibrated "
                                         "thresholds and a reference map", file_count="multiple", type="filepath", elem_id="references")
                    # Choices are the API's own values: with preprocess=False the page sends what it shows.
                    threshold_mode = gr.Radio(choices=[CALIBRATED, SLIDER], value=CALIBRATED, label="Threshold used",
                                              info="calibrated: the thresholds calibrated on the reference images when they "
                                              "give them, else the slider for a trained method and no verdict for an untrained "
                                              "one; slider: always the slider",
                                              elem_id="threshold-mode")
                    false_alarm_rate = gr.Radio(choices=list(FALSE_ALARM_RATES), value=LOWEST_RATE, label="False-alarm rate",
                                                info=rate_choice_info(),
                                                elem_id="false-alarm-rate")
                    tiles = gr.Checkbox(False, label="Tiles: score the full-resolution image in overlapping model-size windows "
                                        "(small defects on large images; slower, one method at a time)", elem_id="tiles")
                    run = gr.Button("Detect", variant="primary", elem_id="run")
                with gr.Column():
                    overlay = gr.ImageSlider(label="Heat map (drag: original / overlay)", type="pil", elem_id="overlay")
                    mask = gr.Image(label="Mask", type="pil", format="png", elem_id="mask")
                    score = gr.Number(label="Anomaly score", precision=4, elem_id="score")
                    verdict = gr.Markdown(label="Report", elem_id="report")  # the label names the output in view_api
                    full_resolution = gr.Button("Full-resolution map and mask (files)", elem_id="full-resolution")
                    downloads = gr.File(label="Full-resolution anomaly map (0-255) and mask", file_count="multiple", elem_id="downloads")
                    last = gr.State(None, time_to_live=LAST_RESULT_SECONDS)
            table = gr.Dataframe(headers=TABLE_HEADERS, datatype=TABLE_TYPES, label="Per method", interactive=False)
            views = gr.Gallery(label="Compare: every method's overlay and mask", columns=4, height=320, object_fit="contain")
            rows = example_rows()
            if rows:
                gr.Examples(rows, inputs=[image, class_name], label="Synthetic examples")
            folders = OutputFolders(root=output_root)
            run.click(
                serving_files(taking_turns(make_handler(detector), turns), folders),
                inputs=[image, class_name, method, threshold, references, tiles, threshold_mode, false_alarm_rate],
                outputs=[overlay, mask, score, verdict, table, views, downloads, last],
                api_name="detect",
                preprocess=False,  # every upload goes through zsad.space.uploads.received_file (zsad's own messages)
            )
            full_resolution.click(serving_files(full_resolution_files, folders), inputs=[last], outputs=[downloads],
                                  api_name="full_resolution")
        with gr.Tab("Batch", id="batch"):
            batch_tab(detector, batch_caps, turns, output_root)
        gr.Markdown(runtime(detector), elem_id="runtime")
    return demo
