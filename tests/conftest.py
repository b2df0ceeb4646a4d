"""Shared offline fixtures: one tiny random CLIP per test session."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The vision pass on torch, as before engines existed; tests/test_engine.py tests the others (and auto) by name.
os.environ.setdefault("ZSAD_ENGINE", "torch")

# Under pytest-xdist (.ci/run runs two workers) the cores are shared out among the workers, and the processes their
# tests start inherit the share: torch threads outnumbering the cores would slow every test down.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TEST_IMAGE_SIZE = 112  # 8x8 patch grid on the tiny CLIP's 14-px patches

# Fixtures whose tests are integration tests wherever they are written (see pyproject's markers).
INTEGRATION_FIXTURES = {"two_process_launcher"}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh where one is)")
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    from zsad.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_clip_path):
    from zsad import CLIPBackbone

    return CLIPBackbone.from_pretrained(str(tiny_clip_path))


@pytest.fixture
def fresh_backbone(tiny_clip_path):
    """A tiny backbone of the test's own, with no text features cached yet (for tests that count encoder calls)."""
    from zsad import CLIPBackbone

    return CLIPBackbone.from_pretrained(str(tiny_clip_path))


@pytest.fixture(scope="session")
def good_files(tmp_path_factory):
    """Readable images of every awkward kind (16-bit, CMYK, RGBA, grey, EXIF-rotated, ...); see image_files.py."""
    from image_files import write_good_images

    return write_good_images(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory):
    """Files a user may upload that are not usable images; see image_files.py."""
    from image_files import write_bad_images

    return write_bad_images(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="session")
def two_process_launcher(tmp_path_factory):
    """Builds an accelerate launch command for 2 CPU processes; skips the test if gloo cannot run here."""
    from train_script import skip_unless_gloo_works, two_process_launcher

    skip_unless_gloo_works(tmp_path_factory.mktemp("gloo"))
    return two_process_launcher


def tiny_model(method: str, backbone, **config_overrides):
    """An untrained model of a ``zsad.METHODS`` method on a tiny backbone, at the test image size unless given."""
    import zsad

    return zsad.load_model(method, backbone=backbone, **{"image_size": TEST_IMAGE_SIZE, **config_overrides})


def random_pixels(count: int = 2, seed: int = 3) -> torch.Tensor:
    """``count`` random (3, S, S) model inputs at the test size."""
    return torch.randn(count, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pixels():
    """Two random (3, S, S) model inputs at the test size (a new tensor per test: tests may change it)."""
    return random_pixels()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """``synthetic_root(categories, num_defective)``: a synthetic MVTec-layout dataset (2 good images per category,
    64 px), written once per argument set."""
    from zsad.data.synthetic import generate

    made = {}

    def make(categories: list[str], num_defective: int):
        key = (tuple(categories), num_defective)
        if key not in made:
            made[key] = generate(tmp_path_factory.mktemp("synthetic"), categories=list(categories), num_good=2,
                                 num_defective=num_defective, image_size=64, seed=0)
        return made[key]

    return make


TRAINING_CATEGORIES = ["wood", "capsule"]


@pytest.fixture(scope="session")
def training_root(synthetic_root):
    """The training tests' synthetic dataset: TRAINING_CATEGORIES, 2 good and 4 defective images each."""
    return synthetic_root(TRAINING_CATEGORIES, num_defective=4)


def whole_dataset_batch(root, image_size: int, backbone) -> dict:
    """Every image of an MVTec-layout dataset as one batch, preprocessed as train.py does."""
    from torch.utils.data import default_collate

    from zsad.data import load_dataset
    from zsad.data.model_input import TrainingSet
    from zsad.modeling.image_processing_zsad import ZSADImageProcessor

    dataset = TrainingSet(load_dataset("mvtec", root), ZSADImageProcessor(image_size, backbone.image_mean, backbone.image_std))
    return default_collate([dataset[i] for i in range(len(dataset))])
