"""The fine-tuning speed levers compute what the plain path computes: the audio tower's cache, gradient
checkpointing, the attention kernel, length-bucketed batches. Tiny models built from configs, the IEMOCAP
fixture."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders_torch.corpora import read_corpus
from encoders_torch.encoder import EmotionModel, LoraSettings
from encoders_torch.finetune import TrainConfig, epoch_batches, make_optimizer, train_epoch
from encoders_torch.heads import ClassifierHead, HeadConfig, focal_loss
from encoders_torch.speech_encoder import build_speech_encoder
from encoders_torch.text_encoder import TextEncoder

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _fixture(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    data = _fixture("iemocap").write_iemocap(root / "IEMOCAP_full_release")
    corpus = read_corpus("iemocap", data, require=("text", "audio"))
    words = [u.transcript for s in corpus.splits for u in corpus.utterances(s)]
    tiny = _fixture("tiny_models")
    return {
        "root": root,
        "corpus": corpus,
        "llama": tiny.tiny_llama(root / "tiny-llama", words),
        "qwen2_audio": tiny.tiny_qwen2_audio(root / "tiny-qwen2-audio", words),
    }


def _model(encoder, corpus):
    torch.manual_seed(0)
    head = ClassifierHead(HeadConfig(encoder.hidden_size, len(corpus.label_names), encoder.pooling, 16, 0.0))
    return EmotionModel(encoder, head)


def test_cached_audio_tower_trains_with_the_losses_of_the_uncached_one_and_runs_the_tower_once(world, tmp_path):
    utterances = world["corpus"].utterances("val")  # 12 clips
    config = TrainConfig(batch_size=4, lr=1e-2)
    losses, tower_calls = {}, {}
    for cached in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation; no dropout, so that both runs draw nothing
        encoder = build_speech_encoder(world["qwen2_audio"], LoraSettings(dropout=0.0))
        if cached:
            encoder.use_audio_cache(tmp_path / "cache")
        model = _model(encoder, world["corpus"])
        calls = []
        encoder.model.model.audio_tower.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        optimizer, rng = make_optimizer(model, config), np.random.default_rng(0)
        losses[cached], tower_calls[cached] = [], []
        for _ in range(3):
            calls.clear()
            losses[cached].append(train_epoch(model, optimizer, utterances, config, rng, CPU, log_every=0))
            tower_calls[cached].append(len(calls))
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert tower_calls[False] == [3, 3, 3] and tower_calls[True] == [3, 0, 0]
    assert len(list((tmp_path / "cache").glob("*/*.npy"))) == len(utterances)


def test_gradient_checkpointing_gives_the_loss_and_gradients_of_keeping_the_activations(world):
    batch_utterances = world["corpus"].utterances("train")[:6]
    labels = torch.tensor([u.label for u in batch_utterances])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = TextEncoder(world["llama"], LoraSettings(dropout=0.0), attn_implementation="eager")
        if checkpointing:
            encoder.enable_gradient_checkpointing()
        model = _model(encoder, world["corpus"]).train()
        loss = focal_loss(model(encoder.collate(batch_utterances))[0], labels, 3.0)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and any("lora_A" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sdpa_attention_gives_the_embeddings_of_eager_attention(world):
    utterances = world["corpus"].utterances("test")
    embeddings = {}
    for kernel in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = _model(TextEncoder(world["llama"], attn_implementation=kernel), world["corpus"]).eval()
        assert model.encoder.model.config._attn_implementation == kernel
        with torch.no_grad():
            embeddings[kernel] = model(model.encoder.collate(utterances))[1]
    torch.testing.assert_close(embeddings["sdpa"], embeddings["eager"], rtol=1e-5, atol=1e-5)


def test_bucketed_batches_cover_every_utterance_once_with_less_padding_than_the_authors_shuffled_ones():
    lengths = np.clip(np.random.default_rng(0).lognormal(2.3, 0.7, 500).round(), 1, 64)
    padded = {}
    for batching in ("bucketed", "shuffled"):
        config = TrainConfig(batch_size=8, batching=batching)
        batches = epoch_batches(lengths, config, np.random.default_rng(1))
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(len(lengths)))
        padded[batching] = sum(len(b) * lengths[b].max() for b in batches)
    assert padded["bucketed"] < 0.75 * padded["shuffled"]
    assert padded["bucketed"] >= lengths.sum()
