"""Regenerate the Space's example images with zsad's own synthetic generator (no third-party images).

```bash
python examples/make_examples.py            # rewrites examples/*.png and examples/examples.json
```
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

from zsad.data.synthetic import generate

EXAMPLES_DIR = Path(__file__).resolve().parent
# (category, defect folder): a few objects and textures, one normal image; "good" is a defect-free test image.
EXAMPLES = (("capsule", "crack"), ("disk", "hole"), ("wood", "scratch"), ("tile", "stain"), ("plate", "good"))
IMAGE_SIZE = 192
SEED = 0


def make_examples(directory: Path = EXAMPLES_DIR, seed: int = SEED) -> list[dict]:
    """Write the example PNGs and their manifest (``examples.json``: image, class_name, defect) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for category, defect in EXAMPLES:
            # The generator's images depend only on (seed, category, defect, index), not on how many are made,
            # so asking for one image of each kind gives the same pixels as a full dataset's first images.
            generate(root, categories=[category], num_good=1, num_defective=7, image_size=IMAGE_SIZE, seed=seed, num_train_good=0)
            name = f"{category}_{defect}.png"
            shutil.copyfile(Path(root) / category / "test" / defect / "000.png", directory / name)
            rows.append({"image": name, "class_name": category, "defect": defect})
    (directory / "examples.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    for row in make_examples(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLES_DIR):
        print(row["image"])
