"""Encoders, head, fine-tuning and extraction, on tiny models built from configs and the IEMOCAP fixture."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from bridges import FeatureStore
from bridges.check import main as check_store
from encoders_torch import extract, finetune
from encoders_torch.corpora import Utterance, read_corpus
from encoders_torch.encoder import EmotionModel
from encoders_torch.finetune import TrainConfig, fit, make_optimizer, train_epoch
from encoders_torch.heads import AttentiveStatisticsPooling, ClassifierHead, HeadConfig, focal_loss, masked_mean
from encoders_torch.speech_encoder import build_speech_encoder
from encoders_torch.text_encoder import TextEncoder

torch.set_num_threads(1)


def _fixture(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


iemocap, tiny_models = _fixture("iemocap"), _fixture("tiny_models")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The IEMOCAP fixture, its corpus, and tiny text and speech models saved to folders."""
    root = tmp_path_factory.mktemp("encoders")
    data = iemocap.write_iemocap(root / "IEMOCAP_full_release")
    corpus = read_corpus("iemocap", data, require=("text", "audio"))
    words = [u.transcript for s in corpus.splits for u in corpus.utterances(s)]
    return {
        "root": root,
        "data": data,
        "corpus": corpus,
        "llama": tiny_models.tiny_llama(root / "tiny-llama", words),
        "qwen2_audio": tiny_models.tiny_qwen2_audio(root / "tiny-qwen2-audio", words),
    }


def _model(encoder, corpus, embedding_dim=16):
    torch.manual_seed(0)
    head = ClassifierHead(HeadConfig(encoder.hidden_size, len(corpus.label_names), encoder.pooling, embedding_dim, 0.0))
    return EmotionModel(encoder, head)


# ------------------------------------------------------------------------------------------- head


def test_focal_loss_matches_numpy_and_is_cross_entropy_at_gamma_zero():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True)
    p_y = p[np.arange(3), labels.numpy()]
    expected = np.mean(-((1 - p_y) ** 3) * np.log(p_y))
    assert focal_loss(logits, labels, 3.0).item() == pytest.approx(expected, rel=1e-5)
    assert focal_loss(logits, labels, 0.0).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6
    )


def test_attentive_statistics_pooling_matches_numpy_and_ignores_padding():
    torch.manual_seed(0)
    pool = AttentiveStatisticsPooling(4, 3)
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = pool(hidden, mask)
    h = hidden[0, :3].detach().numpy()
    scores = (
        np.tanh(h @ pool.project.weight.detach().numpy().T + pool.project.bias.detach().numpy())
        @ pool.score.weight.detach().numpy().T
    ).squeeze(-1)
    alpha = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    mean = alpha @ h
    std = np.sqrt(alpha @ (h * h) - mean * mean)
    np.testing.assert_allclose(out[0].detach().numpy(), np.concatenate([mean, std]), rtol=1e-4, atol=1e-5)
    changed = hidden.clone()
    changed[0, 3:] = 100.0
    torch.testing.assert_close(pool(changed, mask)[0], out[0])
    torch.testing.assert_close(masked_mean(changed, mask)[0], hidden[0, :3].mean(0))


# ---------------------------------------------------------------------------------------- encoders


def test_text_lora_training_moves_adapter_and_head_but_not_base_weights(world):
    model = _model(TextEncoder(world["llama"]), world["corpus"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(batch_size=4, lr=1e-2)
    train_epoch(
        model,
        make_optimizer(model, config),
        world["corpus"].utterances("train"),
        config,
        np.random.default_rng(0),
        torch.device("cpu"),
    )
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if n.startswith("encoder.") and "lora_" not in n]
    assert lora and base
    assert all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in base)
    assert all(not after[n].requires_grad for n in base)
    assert not torch.equal(before["head.embed.weight"], after["head.embed.weight"])


def test_speech_lora_only_in_llm_projector_trained_audio_encoder_frozen(world):
    model = _model(build_speech_encoder(world["qwen2_audio"]), world["corpus"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")}
    assert trainable and all("language_model" in n and "lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert not any("audio_tower" in n and "lora_" in n for n, _ in model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(batch_size=4, lr=1e-2)
    train_epoch(
        model,
        make_optimizer(model, config),
        world["corpus"].utterances("val"),
        config,
        np.random.default_rng(0),
        torch.device("cpu"),
    )
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("multi_modal_projector" in n for n in moved)
    assert any("lora_B" in n for n in moved)
    assert not any("audio_tower" in n or ("language_model" in n and "lora_" not in n) for n in moved)


def test_speech_mask_covers_prompt_and_one_token_per_audio_frame(world):
    encoder = build_speech_encoder(world["qwen2_audio"])
    utterances = world["corpus"].utterances("val")[:3]
    batch = encoder.collate(utterances)
    seconds = [encoder.length(u) for u in utterances]
    # 10 ms mel frames → conv stride 2 → pooling 2: one audio token per 40 ms
    frames = [-(-round(s * 16_000) // 160) for s in seconds]
    expected_audio = [((f - 1) // 2 + 1 - 2) // 2 + 1 for f in frames]
    n_prompt = len(encoder.prefix_ids) + len(encoder.suffix_ids)
    assert batch["attention_mask"].sum(-1).tolist() == [a + n_prompt for a in expected_audio]
    assert (batch["input_ids"] == encoder.audio_token_id).sum(-1).tolist() == expected_audio
    hidden, mask = encoder(batch)
    assert hidden.shape == (3, batch["input_ids"].shape[1], encoder.hidden_size) and mask.dtype == torch.bool


def test_fine_tuning_lowers_the_loss_and_keeps_the_best_val_epoch(world):
    model = _model(TextEncoder(world["llama"]), world["corpus"])
    corpus = world["corpus"]
    history = fit(
        model,
        corpus.utterances("train"),
        corpus.utterances("val"),
        TrainConfig(epochs=6, batch_size=6, lr=5e-3, gamma=2.0),
        torch.device("cpu"),
        log=lambda s: None,
    )
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["best_val_weighted_f1"] == max(history["val_weighted_f1"])
    assert history["best_epoch"] == int(np.argmax(history["val_weighted_f1"]))


def test_patience_stops_fine_tuning_once_validation_stops_improving(world):
    model = _model(TextEncoder(world["llama"]), world["corpus"])
    corpus = world["corpus"]
    # lr 0: nothing changes after the first evaluation, so epoch 1 stays the best.
    history = fit(
        model,
        corpus.utterances("train"),
        corpus.utterances("val"),
        TrainConfig(epochs=20, patience=2, batch_size=6, lr=0.0),
        torch.device("cpu"),
        log=lambda s: None,
    )
    assert history["stopped_early"] and len(history["val_weighted_f1"]) == 3 and history["best_epoch"] == 0


def _scripted_val_scores(monkeypatch, scores):
    """fit sees `scores` as its successive val weighted F1s, whatever the model predicts."""
    remaining = iter(scores)
    monkeypatch.setattr(finetune, "weighted_f1", lambda labels, logits: next(remaining))


def _counted_epochs(monkeypatch, interrupt_at=None):
    """Counts fit's training epochs; the `interrupt_at`-th one (1-based) raises KeyboardInterrupt before it trains."""
    calls = []
    train_epoch = finetune.train_epoch

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_epoch", counted)
    return calls


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_patience_counts_from_the_latest_improvement(world, monkeypatch):
    corpus = world["corpus"]
    _scripted_val_scores(monkeypatch, [0.3, 0.2, 0.5, 0.4, 0.4, 0.9, 0.9])
    epochs = _counted_epochs(monkeypatch)
    history = fit(
        _model(TextEncoder(world["llama"]), corpus),
        corpus.utterances("train")[:12],
        corpus.utterances("val"),
        TrainConfig(epochs=7, patience=2, batch_size=6, lr=1e-3),
        torch.device("cpu"),
        log=lambda s: None,
    )
    assert len(epochs) == len(history["val_weighted_f1"]) == 5
    assert history["best_epoch"] == 2 and history["best_val_weighted_f1"] == 0.5 and history["stopped_early"]


def test_interrupted_fine_tuning_resumes_with_its_best_epoch_and_patience_count(world, monkeypatch, tmp_path):
    corpus = world["corpus"]
    train, val = corpus.utterances("train"), corpus.utterances("val")
    scores = [0.3, 0.5, 0.4, 0.6, 0.55, 0.58, 0.9, 0.95]  # best after epoch 4; patience 2 ends the run after epoch 6
    config = TrainConfig(epochs=8, patience=2, batch_size=6, lr=1e-3)

    def model():
        torch.manual_seed(0)
        return _model(TextEncoder(world["llama"]), corpus)

    _scripted_val_scores(monkeypatch, scores)
    reference_model = model()
    reference = fit(reference_model, train, val, config, torch.device("cpu"), log=lambda s: None)
    assert reference["best_epoch"] == 3 and len(reference["val_weighted_f1"]) == 6 and reference["stopped_early"]

    _scripted_val_scores(monkeypatch, scores)
    _counted_epochs(monkeypatch, interrupt_at=6)  # after epoch 5, one epoch without improvement
    with pytest.raises(KeyboardInterrupt):
        fit(model(), train, val, config, torch.device("cpu"), log=lambda s: None, checkpoint=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_0003", "epoch_0004"]

    epochs = _counted_epochs(monkeypatch)
    lines = []
    resumed_model = model()
    resumed = fit(
        resumed_model, train, val, config, torch.device("cpu"), log=lines.append, checkpoint=tmp_path / "ckpt"
    )
    assert len(epochs) == 1
    assert any(line.startswith("resuming fine-tuning") and "5 epochs done, best epoch 4" in line for line in lines)
    for key in ("train_loss", "val_weighted_f1", "best_epoch", "best_val_weighted_f1", "stopped_early"):
        assert resumed[key] == reference[key], key
    best, expected = _trainable(resumed_model), _trainable(reference_model)
    assert best.keys() == expected.keys() and all(torch.equal(best[n], expected[n]) for n in best)

    _scripted_val_scores(monkeypatch, [0.1, 0.2])
    epochs = _counted_epochs(monkeypatch)
    lines.clear()
    other = dataclasses.replace(config, epochs=2, lr=2e-3)
    fit(model(), train, val, other, torch.device("cpu"), log=lines.append, checkpoint=tmp_path / "ckpt")
    assert len(epochs) == 2 and any(line.startswith("discarding the fine-tuning checkpoint") for line in lines)


def test_encoders_fine_tune_for_the_papers_50_epochs_by_default():
    from encoders_torch.extract import parser

    args = parser().parse_args(
        ["--dataset", "iemocap", "--data-root", "x", "--modality", "text", "--model", "m", "--out", "o"]
    )
    assert args.epochs == TrainConfig().epochs == 50 and args.patience == 0


# -------------------------------------------------------------------------------------- extraction


def _argv(world, out, modality, *extra):
    model = world["llama"] if modality == "text" else world["qwen2_audio"]
    return [
        "--dataset",
        "iemocap",
        "--data-root",
        str(world["data"]),
        "--modality",
        modality,
        "--model",
        str(model),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--embedding-dim",
        "24",
        "--chunk-size",
        "8",
        "--device",
        "auto",
        *extra,
    ]


def test_extract_writes_text_and_speech_into_one_store_that_bridges_check_accepts(world, capsys):
    out = world["root"] / "features"
    assert extract.main(_argv(world, out, "speech")) == 0
    assert extract.main(_argv(world, out, "text")) == 0
    assert check_store([str(out / "iemocap")]) == 0
    store = FeatureStore.open(out / "iemocap")
    assert set(store.modalities) == {"text", "speech"}
    assert store.modalities["text"]["dim"] == 24
    assert store.modalities["text"]["source"]["encoder"]["model"] == str(world["llama"])
    val = store.split("val")
    corpus = world["corpus"]
    assert list(val.utterance_ids) == [u.id for u in corpus.utterances("val")]
    assert list(val.labels) == [u.label for u in corpus.utterances("val")]
    assert [c.id for c in val.conversations()] == [c.id for c in corpus.splits["val"]]
    assert not (out / "iemocap" / ".work").exists()


def test_saved_adapter_reproduces_the_embeddings(world):
    first, second = world["root"] / "first", world["root"] / "second"
    assert extract.main(_argv(world, first, "text")) == 0
    adapter = first / "iemocap" / "adapters" / "text"
    assert json.loads((adapter / "training.json").read_text())["label_names"][0] == "angry"
    assert extract.main(_argv(world, second, "text", "--adapter", str(adapter))) == 0
    a = FeatureStore.open(first / "iemocap").split("test").features("text")
    b = FeatureStore.open(second / "iemocap").split("test").features("text")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_export_uses_the_adapter_and_head_of_the_best_val_epoch(world, monkeypatch):
    out = world["root"] / "best-epoch"
    _scripted_val_scores(monkeypatch, [0.2, 0.7, 0.4, 0.5])
    snapshots = []
    predict = finetune.predict

    def snapshot(model, *args, **kwargs):
        snapshots.append(
            (
                {k: v.clone() for k, v in get_peft_model_state_dict(model.encoder.peft_model).items()},
                {k: v.detach().clone() for k, v in model.head.state_dict().items()},
            )
        )
        return predict(model, *args, **kwargs)

    monkeypatch.setattr(finetune, "predict", snapshot)
    assert extract.main(_argv(world, out, "text", "--epochs", "4")) == 0
    trained = out / "iemocap" / "adapters" / "text"
    history = json.loads((trained / "training.json").read_text())["history"]
    assert history["val_weighted_f1"] == [0.2, 0.7, 0.4, 0.5] and history["best_epoch"] == 1
    adapter, head = (
        load_file(trained / "adapter" / "adapter_model.safetensors"),
        load_file(trained / "head.safetensors"),
    )
    best, last = snapshots[1], snapshots[3]
    assert adapter.keys() == best[0].keys() and head.keys() == best[1].keys()
    assert all(torch.equal(adapter[k], best[0][k]) for k in adapter) and all(
        torch.equal(head[k], best[1][k]) for k in head
    )
    assert not all(torch.equal(head[k], last[1][k]) for k in head)
    assert not (trained.parent / ".text.checkpoint").exists()
    exported = np.asarray(FeatureStore.open(out / "iemocap").split("test").features("text"))
    model = EmotionModel(TextEncoder(world["llama"], adapter=trained / "adapter"), ClassifierHead.load(trained))
    _, embeddings = predict(model, world["corpus"].utterances("test"), 32, torch.device("cpu"))
    np.testing.assert_allclose(exported, embeddings, rtol=1e-5, atol=1e-6)


def test_interrupted_fine_tuning_in_extract_resumes_and_matches_an_uninterrupted_run(world, monkeypatch):
    first, interrupted = world["root"] / "uninterrupted", world["root"] / "interrupted"
    argv = lambda out: _argv(world, out, "text", "--epochs", "3")
    assert extract.main(argv(first)) == 0
    _counted_epochs(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        extract.main(argv(interrupted))
    adapters = interrupted / "iemocap" / "adapters"
    assert not (adapters / "text").exists() and (adapters / ".text.checkpoint" / "epoch_0001" / "state.json").is_file()
    epochs = _counted_epochs(monkeypatch)
    assert extract.main(argv(interrupted)) == 0
    assert len(epochs) == 1 and not (adapters / ".text.checkpoint").exists()
    expected, got = (
        json.loads((o / "iemocap" / "adapters" / "text" / "training.json").read_text())["history"]
        for o in (first, interrupted)
    )
    assert got["val_weighted_f1"] == expected["val_weighted_f1"] and got["train_loss"] == expected["train_loss"]
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        a, b = (load_file(o / "iemocap" / "adapters" / "text" / name) for o in (first, interrupted))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_extraction_resumes_without_redoing_finished_chunks(world, tmp_path):
    model = _model(TextEncoder(world["llama"]), world["corpus"])
    utterances = world["corpus"].utterances("train")  # 36 utterances: 9 batches of 4, chunks of 8 (2 batches)
    reference, _ = extract.embed_split(
        model, utterances, tmp_path / "clean", "fp", 4, 8, torch.device("cpu"), log=lambda s: None
    )
    calls = []
    forward = model.encoder.forward

    def counted(batch, fail_at=None):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return forward(batch)

    model.encoder.forward = lambda batch: counted(batch, fail_at=6)
    with pytest.raises(KeyboardInterrupt):
        extract.embed_split(model, utterances, tmp_path / "work", "fp", 4, 8, torch.device("cpu"), log=lambda s: None)
    assert len(list((tmp_path / "work").glob("chunk_*.npz"))) == 2
    calls.clear()
    model.encoder.forward = counted
    resumed, _ = extract.embed_split(
        model, utterances, tmp_path / "work", "fp", 4, 8, torch.device("cpu"), log=lambda s: None
    )
    assert len(calls) == 9 - 4
    np.testing.assert_allclose(resumed, reference, rtol=1e-5, atol=1e-6)
    calls.clear()
    extract.embed_split(
        model, utterances, tmp_path / "work", "other adapter", 4, 8, torch.device("cpu"), log=lambda s: None
    )
    assert len(calls) == 9


def test_text_length_is_the_token_count_collate_gives_after_truncation(world):
    words = "okay fine then furious angry mad glad happy smile".split()
    transcripts = [" ".join(words[:n]) for n in range(1, 10)] + ["furious furious", "okay fine then"]
    utterances = [Utterance(f"u{i}", "A", t, None, 0) for i, t in enumerate(transcripts)]
    encoder = TextEncoder(world["llama"], max_length=6)
    tokens = [int(encoder.collate([u])["attention_mask"].sum()) for u in utterances]
    assert [encoder.length(u) for u in utterances] == tokens
    assert max(tokens) == 6 and min(tokens) < 6  # some utterances truncated, some not
    assert encoder.length(utterances[-2]) < encoder.length(utterances[-1])  # fewer tokens, more characters


def test_extraction_recomputes_every_chunk_when_the_sorted_order_changes(world, tmp_path):
    model = _model(TextEncoder(world["llama"]), world["corpus"])
    utterances = world["corpus"].utterances("train")
    reference, _ = extract.embed_split(
        model, utterances, tmp_path / "work", "fp", 4, 8, torch.device("cpu"), log=lambda s: None
    )
    calls = []
    forward = model.encoder.forward
    model.encoder.forward = lambda batch: calls.append(1) or forward(batch)
    model.encoder.length = lambda u: -float(len(u.transcript or ""))  # another order of the same utterances
    reordered, _ = extract.embed_split(
        model, utterances, tmp_path / "work", "fp", 4, 8, torch.device("cpu"), log=lambda s: None
    )
    assert len(calls) == 9
    np.testing.assert_allclose(reordered, reference, rtol=1e-4, atol=1e-5)


def test_encoders_torch_never_imports_jax():
    package = Path(__file__).resolve().parents[1] / "encoders_torch"
    forbidden = ("jax", "flax", "optax", "orbax")
    for path in package.glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in forbidden, f"{path.name}: {line.strip()}"


def test_device_auto_is_cpu_float32_without_cuda():
    from encoders_torch.encoder import EncoderError, resolve_device

    if torch.cuda.is_available():
        assert resolve_device("auto") == (torch.device("cuda"), torch.bfloat16)
    else:
        assert resolve_device("auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(EncoderError, match="--device cuda"):
            resolve_device("cuda")


@pytest.mark.skipif(shutil.which("ffmpeg") is not None, reason="ffmpeg is installed here")
def test_meld_mp4_audio_without_ffmpeg_is_a_one_line_error(tmp_path, capsys):
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    for name, folder in (
        ("train_sent_emo.csv", "train_splits"),
        ("dev_sent_emo.csv", "dev_splits_complete"),
        ("test_sent_emo.csv", "output_repeated_splits_test"),
    ):
        (tmp_path / name).write_text(header + '1,Hi.,Ross,joy,positive,0,0,1,1,"00:00:01,000","00:00:02,000"\n')
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "dia0_utt0.mp4").write_bytes(b"")
    argv = [
        "--dataset",
        "meld",
        "--data-root",
        str(tmp_path),
        "--modality",
        "speech",
        "--model",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    ]
    assert extract.main(argv) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "ffmpeg" in message and "3 audio files are ['.mp4']" in message


def test_max_utterances_keeps_whole_leading_conversations(world):
    conversations = world["corpus"].splits["train"]  # 6 conversations of 6 utterances
    assert extract.limit_conversations(conversations, 13) == conversations[:2]
    assert extract.limit_conversations(conversations, 3) == conversations[:1]
    assert extract.limit_conversations(conversations, None) == conversations
