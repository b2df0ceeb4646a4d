"""Product profiles on disk: written as one artefact (a kill leaves the old profile or the new one, never a mix), the
memory's sha256 recorded and checked, and every number validated when loading."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from zsad import ProductProfile, ZSADError
from zsad.detection.profile import Calibration
from zsad.detection.references import FusionScale, ReferenceMemory
from zsad.runtime.atomic import atomic_file, atomic_folder, write_text_atomic


def hand_built(class_name: str, seed: int, image_threshold: float = 0.6) -> ProductProfile:
    generator = torch.Generator().manual_seed(seed)
    memory = ReferenceMemory([1], [torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=generator), dim=-1)], 2, 28, 1)
    calibration = Calibration(image_threshold, 0.7, "good quantile", [0.2, 0.3])
    return ProductProfile("baseline", class_name, memory, calibration, "clip", None, FusionScale(1.0, 0.1, 0.2, 0.3, 0.4))


def test_a_profile_round_trips_and_records_its_memorys_sha256(tmp_path):
    profile = hand_built("screw", 0)
    folder = profile.save(tmp_path / "profile")
    meta = json.loads((folder / "profile.json").read_text())
    assert meta["memory_sha256"] == "sha256:" + hashlib.sha256((folder / "memory.safetensors").read_bytes()).hexdigest()
    again = ProductProfile.load(folder)
    assert again.class_name == "screw" and torch.equal(again.memory.features[0], profile.memory.features[0])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["profile"]  # no temporary folder left behind


def test_a_memory_copied_from_another_profile_is_refused(tmp_path):
    screw = hand_built("screw", 0).save(tmp_path / "screw")
    bottle = hand_built("bottle", 1).save(tmp_path / "bottle")
    shutil.copy(bottle / "memory.safetensors", screw / "memory.safetensors")
    with pytest.raises(ZSADError, match="not the memory profile.json was written with"):
        ProductProfile.load(screw)


@pytest.mark.parametrize(("change", "message"), [
    (lambda meta: meta["calibration"].update(image_threshold=float("nan")), "image threshold nan"),
    (lambda meta: meta["calibration"].update(image_threshold=-1), "image threshold -1 is not a number in"),
    (lambda meta: meta["calibration"].update(pixel_threshold=7), "pixel threshold 7 is not a number in"),
    (lambda meta: meta["calibration"].update(image_threshold="0.5"), "image threshold '0.5'"),
    (lambda meta: meta["fusion"].update(reference_spread=0.0), "reference_spread 0.0 is not a positive number"),
    (lambda meta: meta["fusion"].update(method_spread=-0.2), "method_spread -0.2 is not a positive number"),
    (lambda meta: meta["fusion"].update(weight=1.5), "fusion weight 1.5"),
    (lambda meta: meta["fusion"].update(method_location=float("inf")), "method_location inf is not a finite number"),
    (lambda meta: meta.pop("memory_sha256"), "records no sha256"),
])
def test_numbers_out_of_range_are_refused_when_loading(tmp_path, change, message):
    folder = hand_built("screw", 0).save(tmp_path / "profile")
    meta = json.loads((folder / "profile.json").read_text())
    change(meta)
    (folder / "profile.json").write_text(json.dumps(meta))
    with pytest.raises(ZSADError, match=message):
        ProductProfile.load(folder)


def test_saving_over_a_folder_of_other_files_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ZSADError, match="already holds other files"):
        hand_built("screw", 0).save(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_profile_files import hand_built
    import zsad.runtime.atomic

    point = sys.argv[2]
    if point == "between the files":  # memory.safetensors written, profile.json not yet
        original = Path.write_text
        def killed(self, *args, **kwargs):
            if self.name == "profile.json":
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *args, **kwargs)
        Path.write_text = killed
    else:  # "between the renames": the old profile moved aside, the new one not yet in place
        renames = []
        original = os.rename
        def killed(source, target):
            renames.append(target)
            if len(renames) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(source, target)
        zsad.runtime.atomic.os.rename = killed
    hand_built("bottle", 1, image_threshold=0.9).save(sys.argv[1])
    """
)


@pytest.mark.parametrize("point", ["between the files", "between the renames"])
def test_a_kill_during_save_never_mixes_two_profiles(tmp_path, point):
    folder = hand_built("screw", 0).save(tmp_path / "profile")
    tests = os.path.dirname(__file__)
    completed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder), point, tests], capture_output=True, text=True,
                               timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), tests])})
    assert completed.returncode == -9, completed.stderr[-2000:]
    if point == "between the files":
        survivor = ProductProfile.load(folder)  # the old profile, whole
        assert (survivor.class_name, survivor.calibration.image_threshold) == ("screw", 0.6)
    else:  # no profile at the target (a clear error), the old one whole beside it
        with pytest.raises(ZSADError, match="No profile.json"):
            ProductProfile.load(folder)
        (aside,) = tmp_path.glob(".profile.old-*")
        assert ProductProfile.load(aside).class_name == "screw"
    hand_built("bottle", 1).save(folder)  # the next save succeeds over what the kill left
    assert ProductProfile.load(folder).class_name == "bottle"


def test_atomic_file_keeps_the_old_content_when_writing_fails(tmp_path):
    target = write_text_atomic(tmp_path / "scores.json", "old")
    with pytest.raises(RuntimeError), atomic_file(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [path.name for path in tmp_path.iterdir()] == ["scores.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_atomic_folder_removes_its_staging_folder_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "artefact", marker="x.json") as staging:
        (staging / "x.json").write_text("{}")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
