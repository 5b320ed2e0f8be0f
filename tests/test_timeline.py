"""`python -m mister_jax.timeline`: per conversation, the predicted emotion and its probability per
utterance above, the gate weights β^s, β^t, β^m stacked below."""

import json

import numpy as np
import pytest
from matplotlib.image import imread

from mister_jax import timeline
from mister_jax.errors import UsageError

NAMES = ["neutral", "happy", "sad"]


def prediction(conversation, utterance, probs, gate, label=None):
    """A line of DESIGN §6, its prediction the most probable class."""
    k = int(np.argmax(probs))
    return {
        "conversation_id": conversation,
        "utterance_id": utterance,
        "label": label,
        "prediction": NAMES[k],
        "label_id": NAMES.index(label) if label else -1,
        "prediction_id": k,
        "probs": probs,
        "experts": {},
        "gate": gate,
    }


ROWS = [
    prediction("d/1", "u1", [0.7, 0.2, 0.1], [0.2, 0.5, 0.3], "neutral"),
    prediction("d/1", "u2", [0.1, 0.6, 0.3], [0.6, 0.1, 0.3], "sad"),
    prediction("d/1", "u3", [0.25, 0.15, 0.6], [0.1, 0.1, 0.8]),
    prediction("d/1", "u4", [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]),
    prediction("e 2", "x1", [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]),
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_each_utterance_is_a_bar_as_high_as_its_top_probability_coloured_by_the_emotion():
    fig = timeline.timeline_figure("d/1", ROWS[:4])
    bars = fig.axes[0].patches
    assert [b.get_x() + b.get_width() / 2 for b in bars] == pytest.approx([0, 1, 2, 3])
    assert [b.get_height() for b in bars] == pytest.approx([0.7, 0.6, 0.6, 0.5])
    colours = [b.get_facecolor() for b in bars]
    assert colours[0] == colours[3] and len({colours[0], colours[1], colours[2]}) == 3
    names = [t.get_text() for t in fig.axes[0].texts]
    assert names == ["neutral", "neutral", "happy", "sad", "sad", "neutral"]  # predicted, then true when labelled
    wrong = [t.get_color() for t in fig.axes[0].texts if t.get_text() == "sad" and t.get_position()[1] < 0]
    assert wrong == ["red"]


def test_the_gate_weights_are_stacked_speech_text_multimodal_per_utterance():
    fig = timeline.timeline_figure("d/1", ROWS[:4])
    bars = fig.axes[1].patches
    gate = np.array([r["gate"] for r in ROWS[:4]])
    bottoms = np.concatenate([np.zeros((4, 1)), np.cumsum(gate, axis=1)[:, :2]], axis=1)
    assert len(bars) == 12  # expert-major: the speech bars of every utterance, then text, then multimodal
    assert [b.get_height() for b in bars] == pytest.approx(gate.T.ravel())
    assert [b.get_y() for b in bars] == pytest.approx(bottoms.T.ravel())
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["β speech", "β text", "β multimodal"]


def test_a_run_without_a_gate_draws_no_gate_bars_and_says_so():
    fig = timeline.timeline_figure("d/1", [{**r, "gate": None} for r in ROWS[:4]])
    assert len(fig.axes[1].patches) == 0
    assert [t.get_text() for t in fig.axes[1].texts] == ["no gate: this run's variant has no experts"]


def test_the_command_writes_one_png_per_conversation_named_by_its_id(tmp_path):
    assert timeline.main([str(write(tmp_path / "pred.jsonl", ROWS)), "--out", str(tmp_path / "fig")]) == 0
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["d_1.png", "e_2.png"]
    assert all(imread(tmp_path / "fig" / name).shape[2] == 4 for name in ("d_1.png", "e_2.png"))


def test_a_long_conversation_gets_a_wider_figure():
    long = [{**ROWS[k % 4], "utterance_id": f"u{k}"} for k in range(30)]
    assert timeline.timeline_figure("d", long).get_figwidth() > timeline.timeline_figure("d", ROWS[:4]).get_figwidth()


def test_a_line_that_is_not_a_prediction_is_one_error_naming_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "pred.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"conversation_id": "d"}) + "\n")
    assert timeline.main([str(path), "--out", str(tmp_path / "fig")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}:2: not a prediction line (no utterance_id, label, prediction, prediction_id, probs, gate) "
        "— pass the JSONL that python -m mister_jax.predict writes"
    ]
    assert not (tmp_path / "fig").exists()


def test_conversations_whose_file_names_would_clash_are_refused(tmp_path):
    rows = [ROWS[0], {**ROWS[1], "conversation_id": "d 1"}]
    with pytest.raises(UsageError, match="would share the file name d_1.png"):
        timeline.write_timelines(write(tmp_path / "pred.jsonl", rows), tmp_path / "fig")
