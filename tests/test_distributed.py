"""`torchrun --nproc_per_node 2 -m encoders_torch.extract`: data-parallel fine-tuning over gloo on CPU and the
export split across the processes give what one process gives on the same global batches. A tiny LLaMA
built from a config; the IEMOCAP fixture's transcripts as a custom corpus with 33 train utterances, so
that the last global batch of 8 holds one utterance (shards of 1 and 0); dropout 0 so that both runs are
deterministic."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from encoders_torch import extract
from encoders_torch.corpora import read_corpus
from encoders_torch.distributed import World

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # float32: the all-reduced gradient sums in another order than one process's backward
# The attention score's bias shifts every score of an utterance alike, which softmax ignores: its gradient
# is 0 but for rounding, and Adam scales that rounding to steps of ±lr, differently in each run.
SHIFT_INVARIANT = {"pool.score.bias"}


def _fixture(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _custom_corpus(corpus, path: Path, drop_train: int) -> Path:
    """`corpus` as a custom JSONL file, less the last `drop_train` train utterances."""
    rows = [{"label_names": list(corpus.label_names)}]
    for split, conversations in corpus.splits.items():
        for conversation in conversations:
            for u in conversation.utterances:
                rows.append(
                    {
                        "conversation_id": conversation.id,
                        "utterance_id": u.id,
                        "speaker": u.speaker,
                        "text": u.transcript,
                        "label": corpus.label_names[u.label],
                        "split": split,
                    }
                )
    train = [i for i, r in enumerate(rows) if r.get("split") == "train"]
    kept = [r for i, r in enumerate(rows) if i not in train[len(train) - drop_train :]]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


def _argv(data, model, out, batch_size):
    return [
        "--dataset",
        "custom",
        "--data-root",
        str(data),
        "--modality",
        "text",
        "--model",
        str(model),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        str(batch_size),
        "--lr",
        "1e-2",
        "--embedding-dim",
        "8",
        "--chunk-size",
        "8",
        "--lora-dropout",
        "0",
        "--head-dropout",
        "0",
        "--device",
        "cpu",
        "--log-every",
        "0",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same fine-tuning and export: one process with batch 8, and torchrun's 2 processes with batch 4 each."""
    root = tmp_path_factory.mktemp("distributed")
    corpus = read_corpus(
        "iemocap", _fixture("iemocap").write_iemocap(root / "IEMOCAP_full_release", audio=False), require=("text",)
    )
    data = _custom_corpus(corpus, root / "talks.jsonl", drop_train=3)
    model = _fixture("tiny_models").tiny_llama(
        root / "tiny-llama", [u.transcript for s in corpus.splits for u in corpus.utterances(s)]
    )
    assert extract.main(_argv(data, model, root / "single", 8)) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [*command, "-m", "encoders_torch.extract", *_argv(data, model, root / "two", 4)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "single" / "custom", root / "two" / "custom", done.stdout


def test_two_gloo_processes_train_the_adapter_and_head_one_process_trains_on_the_same_global_batches(runs):
    single, two, stdout = runs
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        a, b = (load_file(store / "adapters" / "text" / name) for store in (single, two))
        assert a.keys() == b.keys()
        for key in a.keys() - SHIFT_INVARIANT:
            torch.testing.assert_close(b[key], a[key], rtol=TOLERANCE, atol=TOLERANCE, msg=f"{name}: {key}")
    one, both = (json.loads((s / "adapters" / "text" / "training.json").read_text()) for s in (single, two))
    assert one["train"]["batch_size"] == both["train"]["batch_size"] == 8
    assert "33 train" in stdout  # 4 global batches of 8 and one of 1
    assert both["history"]["train_loss"] == pytest.approx(one["history"]["train_loss"], rel=TOLERANCE)
    assert both["history"]["val_weighted_f1"] == one["history"]["val_weighted_f1"]
    # The lr is large enough for one epoch to move the adapter far beyond the tolerance.
    lora_b = load_file(single / "adapters" / "text" / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in lora_b.items() if "lora_B" in k) > 100 * TOLERANCE


def test_the_export_split_across_two_processes_writes_the_store_of_one_process(runs):
    single, two, stdout = runs
    assert stdout.count("wrote text") == 1  # rank 0 alone writes and speaks
    for split in ("train", "val", "test"):
        assert (two / split / "index.npz").read_bytes() == (single / split / "index.npz").read_bytes()
        a, b = (np.load(s / split / "text.npy") for s in (single, two))
        np.testing.assert_allclose(b, a, rtol=TOLERANCE, atol=TOLERANCE)
    assert not (two / ".work").exists()


def test_world_shards_cover_a_global_batch_in_order_with_sizes_one_apart():
    batch = np.arange(7)
    shards = [World(rank, 3).shard(batch) for rank in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), batch)
    assert [len(s) for s in shards] == [3, 2, 2]
    assert len(World(1, 2).shard(np.arange(1))) == 0
