"""zsad Space: drop an image, type the product's name, pick a method, see where the defect is.

```bash
python app.py                                  # default CLIP (Hub or cache), every registered method
python app.py --clip /path/to/clip             # a local copy of the backbone
python app.py --checkpoint stackclip=user/repo # or ZSAD_STACKCLIP_CHECKPOINT=user/repo
python app.py --tiny                           # tiny random CLIP: UI work only, results are noise
```

Host and port follow Gradio's own ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``. The page and its public API
(``/detect``, ``/detect_batch``, ``/full_resolution``) are built in ``zsad.space``.
"""

import os
import sys
import tempfile
from pathlib import Path

from zsad import ZSADError
from zsad.runtime.allocator import return_large_buffers_to_the_system
from zsad.space.config import CONCURRENCY_LIMIT, batch_caps, build_parser, configured_checkpoints, launch_options, load_detector
from zsad.space.layout import build_demo, example_rows
from zsad.space.scheduling import ComputeTurns, choose_engine_in_background, warm_example_names
from zsad.space.shutdown import remove_when_stopped


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    return_large_buffers_to_the_system()  # before loading: the weights' conversion buffers go back too
    clip = args.clip or os.environ.get("ZSAD_CLIP")
    if args.tiny:
        from zsad.runtime.tiny_clip import save_tiny_clip

        clip = str(save_tiny_clip(tempfile.mkdtemp(prefix="zsad-tiny-clip-")))
    try:
        detector = load_detector(clip, configured_checkpoints(args.checkpoint), args.precision, args.device, args.engine)
    except ZSADError as error:
        sys.exit(f"zsad app: {error}")
    turns = ComputeTurns()
    warm_example_names(detector, [name for _, name in example_rows()], turns)
    choose_engine_in_background(detector, turns)
    output_root = Path(tempfile.mkdtemp(prefix="zsad-space-"))
    remove_when_stopped(output_root)
    demo = build_demo(detector, batch_caps=batch_caps(args), turns=turns, output_root=output_root)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=CONCURRENCY_LIMIT).launch(**launch_options(args))


if __name__ == "__main__":
    main()
