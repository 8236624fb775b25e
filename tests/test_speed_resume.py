"""benchmarks/speed.py --job-only: (a) and (b) are reused only from the same benchmark."""
import importlib.util
import json
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("plabel_speed_bench", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOW = {"backend": "vit_b", "random_weights": True, "images": 100, "device": "cpu",
       "teacher": "/t/teacher.pt", "batch_size": 1, "classes_refined": 390}


def test_save_then_reuse_the_same_benchmark(speed, tmp_path):
    measured = {**NOW, "command": "speed.py refine ...", "a": {"images_per_s": 0.045},
                "b": {"images_per_s": 0.065}, "equivalence": {"heart": {"mean_dice": 1.0}},
                "equivalence_held": True}
    speed.save(tmp_path, measured)
    earlier = speed.earlier_ab(tmp_path / "speed.json", dict(NOW))
    assert (earlier["a"], earlier["b"]) == ({"images_per_s": 0.045}, {"images_per_s": 0.065})
    assert earlier["measured_at"] == measured["measured_at"] and earlier["measured_at"].endswith("Z")


def test_reuse_refuses_another_benchmark_a_missing_file_or_a_run_stopped_early(speed, tmp_path):
    path = tmp_path / "speed.json"
    with pytest.raises(SystemExit, match=r"speed.json does not exist; run once without --job-only"):
        speed.earlier_ab(path, dict(NOW))
    path.write_text(json.dumps({**NOW, "command": "x", "a": {"images_per_s": 0.045}}))
    with pytest.raises(SystemExit, match=r"has no b, equivalence: that run stopped before measuring them"):
        speed.earlier_ab(path, dict(NOW))
    path.write_text(json.dumps({**NOW, "command": "x", "a": {}, "b": {}, "equivalence": {}}))
    with pytest.raises(SystemExit, match=r"another benchmark \(images: 100 there, 200 now; "
                                         r"classes_refined: 390 there, 500 now\)"):
        speed.earlier_ab(path, {**NOW, "images": 200, "classes_refined": 500})
