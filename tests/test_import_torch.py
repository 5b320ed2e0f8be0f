"""python -m mister_jax.import_torch: a checkpoint of the authors' AttentionMoE becomes a run of ours.

The reference is `benchmarks/torch_reference.py` (the authors' key names, shapes and forward); its
outputs on unpadded conversations are what the imported model must reproduce. The reader of the
`.pth` file (`mister_jax.torch_checkpoint`) is tested on archives made by torch and by hand.
"""

import collections
import dataclasses
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import PAPER  # noqa: E402
from torch_reference import AttentionMoE, authors_loss, total_loss  # noqa: E402

from bridges import init_store, write_index, write_modality  # noqa: E402
from mister_jax import import_torch, torch_checkpoint  # noqa: E402
from mister_jax import predict as predict_cli  # noqa: E402
from mister_jax.model import MisterE  # noqa: E402

DIMS = dataclasses.replace(
    PAPER,
    speech_dim=24,
    text_dim=20,
    num_classes=4,
    can_hidden=8,
    gru_layers=2,
    fusion_dim=32,
    fusion_layers=2,
    attention_dim=12,
    attention_heads=3,
)
LABELS = ["neutral", "happy", "sad", "angry"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference model with random weights (LayerNorms included) and their unused `proj` and
    `classifier`, saved as the authors save theirs."""
    torch.manual_seed(0)
    model = AttentionMoE(DIMS, unused_hidden=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("pth") / "moe_model.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _conversation(length, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(1, length, DIMS.speech_dim)).astype(np.float32),
        rng.normal(size=(1, length, DIMS.text_dim)).astype(np.float32),
    )


@pytest.mark.parametrize("length", [1, 3, 7])
def test_imported_model_computes_the_references_outputs(reference, length):
    model, path = reference
    cfg, params = import_torch.params_from_state_dict(import_torch.read_state_dict(path))
    speech, text = _conversation(length, length)
    with torch.no_grad():
        want = model(torch.from_numpy(speech), torch.from_numpy(text))
    got = MisterE(cfg).apply({"params": params}, speech, text, np.ones((1, length), bool))
    for field in ("logits", "speech_logits", "text_logits", "multimodal_logits", "gate", "m_speech", "m_text"):
        np.testing.assert_allclose(np.asarray(getattr(got, field)), want[field].numpy(), atol=1e-5, err_msg=field)


def test_architecture_is_read_from_the_tensor_shapes(reference):
    cfg, _ = import_torch.params_from_state_dict(import_torch.read_state_dict(reference[1]))
    assert (
        cfg.speech_dim,
        cfg.text_dim,
        cfg.num_classes,
        cfg.can_hidden,
        cfg.gru_layers,
        cfg.fusion_dim,
        cfg.fusion_layers,
        cfg.attention_dim,
        cfg.gate,
        cfg.gate_hidden,
        cfg.gate_temperature,
    ) == (24, 20, 4, 8, 2, 32, 2, 12, "mlp", 10, 2.0)


def _store(root: Path, lengths=(3, 5, 2)):
    """A test split of a few conversations in a store written by hand."""
    directory = init_store(root, "mine", LABELS, ["test"])
    ids, convs, speech, text = [], [], [], []
    for c, n in enumerate(lengths):
        s, t = _conversation(n, 100 + c)
        speech.append(s[0]), text.append(t[0])
        ids += [f"c{c}_u{i}" for i in range(n)]
        convs += [f"c{c}"] * n
    labels = np.arange(len(ids)) % len(LABELS)
    write_index(directory, "test", ids, convs, labels)
    write_modality(directory, "test", "speech", np.concatenate(speech), {"model": "test"})
    write_modality(directory, "test", "text", np.concatenate(text), {"model": "test"})
    return speech, text


def test_import_then_predict_gives_the_references_probabilities(reference, tmp_path):
    model, path = reference
    speech, text = _store(tmp_path / "features")
    out = tmp_path / "run"
    assert (
        import_torch.main([str(path), "--dataset", "mine", "--features", str(tmp_path / "features"), "--out", str(out)])
        == 0
    )
    assert json.loads((out / "run_config.json").read_text())["imported_from"]["sha256"]
    predictions = tmp_path / "pred.jsonl"
    assert (
        predict_cli.main(
            [
                "--run",
                str(out),
                "--dataset",
                "mine",
                "--features",
                str(tmp_path / "features"),
                "--out",
                str(predictions),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    with torch.no_grad():
        want = np.concatenate(
            [
                model(torch.from_numpy(s[None]), torch.from_numpy(t[None]))["logits"].softmax(-1)[0].numpy()
                for s, t in zip(speech, text)
            ]
        )
    np.testing.assert_allclose(np.array([r["probs"] for r in rows]), want, atol=1e-5)


def _edited_checkpoint(reference, tmp_path, edit):
    state = dict(reference[0].state_dict())
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.__setitem__("fusion.extra.weight", torch.zeros(2)), "unknown key fusion.extra.weight"),
        (lambda s: s.pop("fusion.units.1.fc_text_s.bias"), "missing key fusion.units.1.fc_text_s.bias"),
        (lambda s: s.__setitem__("fusion.fc_2.bias", torch.zeros(7)), "classifier_out']['bias']: shape [7]"),
    ],
)
def test_a_checkpoint_that_does_not_fit_gets_one_line_per_problem(reference, tmp_path, capsys, edit, message):
    _store(tmp_path / "features")
    path = _edited_checkpoint(reference, tmp_path, edit)
    assert (
        import_torch.main(
            [str(path), "--dataset", "mine", "--features", str(tmp_path / "features"), "--out", str(tmp_path / "run")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_trained_run_is_not_overwritten_and_an_imported_one_is(reference, tmp_path, capsys):
    _store(tmp_path / "features")
    args = lambda out: [
        str(reference[1]),
        "--dataset",
        "mine",
        "--features",
        str(tmp_path / "features"),
        "--out",
        str(out),
    ]
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "run_config.json").write_text(json.dumps({"dataset": "mine"}))
    assert import_torch.main(args(trained)) == 2
    err = capsys.readouterr().err
    assert "holds a run that was not imported" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in trained.iterdir()] == ["run_config.json"]
    imported = tmp_path / "imported"
    assert import_torch.main(args(imported)) == 0 and import_torch.main(args(imported)) == 0


def test_a_store_of_other_dims_is_named_with_its_manifest(reference, tmp_path, capsys):
    directory = init_store(tmp_path / "features", "mine", LABELS[:3], ["test"])
    write_index(directory, "test", ["u0"], ["c0"], [0])
    write_modality(directory, "test", "speech", np.zeros((1, DIMS.speech_dim), np.float32), {})
    write_modality(directory, "test", "text", np.zeros((1, 5), np.float32), {})
    assert (
        import_torch.main(
            [
                str(reference[1]),
                "--dataset",
                "mine",
                "--features",
                str(tmp_path / "features"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "manifest.json: text dim 5 but the checkpoint's model has 20" in err
    assert "manifest.json: label count 3 but the checkpoint's model has 4" in err


class _Shell:
    def __reduce__(self):
        import os

        return os.system, ("true",)


def test_the_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"a": _Shell()}, protocol=2))
    with pytest.raises(torch_checkpoint.CheckpointFormatError, match="refers to posix.system"):
        torch_checkpoint.read_state_dict(path)


class _Tensor:
    """Pickles as torch pickles a tensor, with whatever size, stride and offset it is given."""

    def __init__(self, offset, size, stride):
        self.args = offset, size, stride


def _raw_checkpoint(path: Path, tensors: dict, storage: bytes, numel: int) -> Path:
    """A zip in torch's layout whose data.pkl maps names to `_Tensor`s over one float32 storage."""
    from torch._utils import _rebuild_tensor_v2

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj == "storage 0" else None

        def reducer_override(self, obj):
            if isinstance(obj, _Tensor):
                return _rebuild_tensor_v2, ("storage 0", *obj.args, False, collections.OrderedDict())
            return NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("raw/data.pkl", buffer.getvalue())
        archive.writestr("raw/data/0", storage)
    return path


def test_the_reader_gives_torchs_values_for_views_and_every_float_dtype(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6) / 7
    state = {
        "view": base[1:, 2:5].t(),
        "half": base.half(),
        "bfloat16": base.bfloat16(),
        "long": torch.arange(5),
        "float": base.float()[2],
    }
    torch.save(state, tmp_path / "x.pth")
    got = torch_checkpoint.read_state_dict(tmp_path / "x.pth")
    for key, tensor in state.items():
        np.testing.assert_array_equal(got[key], tensor.float().numpy() if key == "bfloat16" else tensor.numpy(), key)


def test_the_reader_refuses_a_tensor_outside_its_storage(tmp_path):
    storage = np.arange(4, dtype=np.float32).tobytes()
    fine = _raw_checkpoint(tmp_path / "fine.pth", {"a": _Tensor(1, (3,), (1,))}, storage, 4)
    np.testing.assert_array_equal(torch_checkpoint.read_state_dict(fine)["a"], [1, 2, 3])
    for offset, size, stride in ((0, (3,), (2,)), (2, (2, 2), (1, 1)), (-1, (2,), (1,))):
        path = _raw_checkpoint(tmp_path / "far.pth", {"a": _Tensor(offset, size, stride)}, storage, 4)
        with pytest.raises(torch_checkpoint.CheckpointFormatError, match="outside its storage of 4 elements"):
            torch_checkpoint.read_state_dict(path)
    short = _raw_checkpoint(tmp_path / "short.pth", {"a": _Tensor(0, (4,), (1,))}, storage[:8], 4)
    with pytest.raises(torch_checkpoint.CheckpointFormatError, match="has 8 bytes where 4 elements"):
        torch_checkpoint.read_state_dict(short)


def test_damaged_and_legacy_files_are_refused_in_one_line(tmp_path):
    damaged = tmp_path / "damaged.pth"
    with zipfile.ZipFile(damaged, "w") as archive:
        archive.writestr("x/data.pkl", b"\x80\x02}q\x00(X")
    legacy = tmp_path / "legacy.pth"
    torch.save({"a": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    for path, message in ((damaged, "holds a pickle that cannot be read"), (legacy, "is not a zip archive")):
        with pytest.raises(torch_checkpoint.CheckpointFormatError, match=message) as err:
            torch_checkpoint.read_state_dict(path)
        assert len(str(err.value).splitlines()) == 1


def test_heads_that_do_not_divide_the_attention_width_are_one_line(reference, tmp_path, capsys):
    _store(tmp_path / "features")
    assert (
        import_torch.main(
            [
                str(reference[1]),
                "--dataset",
                "mine",
                "--features",
                str(tmp_path / "features"),
                "--out",
                str(tmp_path / "run"),
                "--attention-heads",
                "5",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--attention-heads 5 does not divide the attention width 12" in err and len(err.strip().splitlines()) == 1


def test_the_authors_reduction_on_an_unpadded_batch_differs_from_the_masked_one_only_in_the_kl_scale():
    """Unpadded, their focal and contrastive averages are ours (every anchor has a positive: its utterance
    in the other modality); their KL is summed over the T positions of each conversation, not averaged."""
    torch.manual_seed(1)
    model = AttentionMoE(DIMS).eval()
    b, t = 2, 5
    speech, text = torch.randn(b, t, DIMS.speech_dim), torch.randn(b, t, DIMS.text_dim)
    labels, mask = torch.tensor([[0, 1, 2, 3, 0], [1, 2, 3, 0, 1]]), torch.ones(b, t, dtype=torch.bool)
    with torch.no_grad():
        out = model(speech, text)
        without_kl = [f(out, labels, mask, alpha_kl=0.0) for f in (authors_loss, total_loss)]
        kl_only = [f(out, labels, mask, alpha_kl=1.0) - w for f, w in zip((authors_loss, total_loss), without_kl)]
    torch.testing.assert_close(without_kl[0], without_kl[1])
    torch.testing.assert_close(kl_only[0], t * kl_only[1])


def test_the_references_masked_loss_is_ours_with_the_authors_code_preset():
    """Both reductions see the same outputs of a padded batch with an unlabelled utterance: the masked
    reference loss is `mister_jax.losses.total_loss` with `--preset authors-code`'s loss config."""
    from mister_jax.configs import get_config
    from mister_jax.losses import total_loss as ours
    from mister_jax.model import ModelOutputs

    loss_cfg = get_config("iemocap", LABELS, "authors-code").loss
    torch.manual_seed(2)
    model = AttentionMoE(DIMS).eval()
    b, t = 3, 6
    speech, text = torch.randn(b, t, DIMS.speech_dim), torch.randn(b, t, DIMS.text_dim)
    mask = torch.arange(t)[None] < torch.tensor([[6], [4], [1]])
    labels = torch.randint(0, DIMS.num_classes, (b, t)).masked_fill(~mask, 0)
    labels[0, 2] = -1
    with torch.no_grad():
        out = model(speech, text)
        want = total_loss(
            out,
            labels,
            mask,
            gamma=loss_cfg.gamma,
            lambda_con=loss_cfg.lambda_con,
            alpha_kl=loss_cfg.alpha_kl,
            temperature=loss_cfg.temperature,
        )
    got, _ = ours(
        ModelOutputs(**{k: v.numpy() for k, v in out.items()}), labels.numpy(), mask.numpy(), loss_cfg, "mister-e"
    )
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)


def test_the_reference_has_the_authors_parameter_count_at_paper_dims():
    assert sum(p.numel() for p in AttentionMoE(PAPER, heads=3).parameters()) == 89_661_809
    with_unused = AttentionMoE(PAPER, heads=3, unused_hidden=768)  # their training script's hidden_dim
    assert sum(p.numel() for p in with_unused.parameters()) == 89_661_809 + 1024 * 768 + 768 + 768 * 6 + 6
