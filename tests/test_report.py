"""report.md and its figures: written whole, and a file that cannot be written is one ReportError."""

import pytest

from mister_jax.metrics import EXPERTS, GATE_EXPERTS
from mister_jax.report import ReportError, write_report

LABELS = ["neutral", "happy", "sad"]


def _stats(mean):
    return {"mean": mean, "std": 0.01, "per_seed": [mean - 0.01, mean + 0.01]}


def _results():
    split = {
        "experts": {e: {"weighted_f1": _stats(0.5 + 0.05 * i)} for i, e in enumerate(EXPERTS)},
        "per_class_f1": {n: 0.6 for n in LABELS},
        "confusion_matrix": [[5, 1, 0], [2, 4, 1], [0, 1, 6]],
        "gate": {
            "mean": {e: 1 / 3 for e in GATE_EXPERTS},
            "per_class": {n: {e: 1 / 3 for e in GATE_EXPERTS} for n in LABELS},
        },
    }
    return {
        "dataset": "demo",
        "variant": "mister-e",
        "label_names": LABELS,
        "seeds": [0, 1],
        "epochs": 2,
        "best_epoch": [2, 1],
        "val": split,
        "test": split,
    }


HISTORY = [{"epoch": e, "train_loss": [1.0 / e, 1.1 / e], "val": {"moe": [0.4 + 0.1 * e, 0.5]}} for e in (1, 2)]


def test_the_report_and_every_figure_are_written_and_no_temporary_file_is_left(tmp_path):
    path = write_report(tmp_path, _results(), HISTORY)
    assert path == tmp_path / "report.md" and "![gate](gate.png)" in path.read_text(encoding="utf-8")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["confusion.png", "curves.png", "experts.png", "gate.png", "report.md"]
    assert all((tmp_path / n).read_bytes().endswith(b"IEND\xaeB`\x82") for n in names if n.endswith(".png"))


def test_a_report_that_cannot_be_written_is_one_error_naming_it_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "report.md").mkdir()  # os.replace cannot put a file there
    with pytest.raises(ReportError, match=r"report\.md: could not be written \(Is a directory\)"):
        write_report(tmp_path, _results(), HISTORY)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
