"""mister_jax.configs: the paper's presets (Sec. 4.2), the authors-code preset, and --set overrides."""

import dataclasses

import pytest

from mister_jax.config import TrainConfig
from mister_jax.configs import PAPER_LABELS, STYLES, authors_code, get_config
from mister_jax.configs.overrides import OverrideError, apply_overrides, valid_keys


@pytest.mark.parametrize(
    "name, batch, lam, alpha, tau, layers",
    [("iemocap", 8, 2, 0.1, 1, 3), ("meld", 32, 1, 1e-3, 0.05, 2), ("mosi", 8, 1, 0.1, 1, 3)],
)
def test_presets_follow_the_paper_table(name, batch, lam, alpha, tau, layers):
    c = get_config(name)
    assert (c.train.batch_size, c.loss.lambda_con, c.loss.alpha_kl, c.loss.temperature, c.model.gru_layers) == (
        batch,
        lam,
        alpha,
        tau,
        layers,
    )
    assert (c.train.learning_rate, c.train.clip_norm, c.train.epochs, c.train.seeds) == (1e-5, 1.0, 100, 3)


def test_presets_have_the_paper_classes_and_other_corpora_get_iemocaps_with_their_labels():
    assert get_config("meld").model.num_classes == 7 and get_config("mosi").model.num_classes == 2
    assert get_config("emorynlp").model.variant == "text-only"
    assert {n: get_config(n).model.num_classes for n in PAPER_LABELS} == {n: len(v) for n, v in PAPER_LABELS.items()}
    other = get_config("my-corpus", ["a", "b", "c"])
    assert other.model.num_classes == 3 and other.train == get_config("iemocap").train
    assert other.loss == get_config("iemocap").loss


def test_authors_code_preset_is_the_paper_preset_with_their_departures():
    paper, authors = get_config("meld"), get_config("meld", style="authors-code")
    assert STYLES == ("paper", "authors-code")
    assert (
        authors.model.attention_heads,
        authors.model.gate,
        authors.model.gate_temperature,
        authors.model.can_dropout,
    ) == (3, "mlp", 2.0, 0.0)
    assert (authors.loss.contrastive_scope, authors.loss.kl_form) == ("batch", "symmetric")
    assert (authors.train.batching, paper.train.batching) == ("random", "bucketed")
    assert (
        dataclasses.replace(authors.train, batching="bucketed"),
        authors.model.gru_layers,
        authors.loss.lambda_con,
    ) == (paper.train, 2, 1.0)
    assert (paper.model.attention_heads, paper.model.gate, paper.loss.kl_form) == (4, "fc", "directional")
    # Every departure is one of the module's tables, and nothing else changes.
    assert dataclasses.replace(authors.model, **{k: getattr(paper.model, k) for k in authors_code.MODEL}) == paper.model
    assert dataclasses.replace(authors.loss, **{k: getattr(paper.loss, k) for k in authors_code.LOSS}) == paper.loss


def test_authors_code_rounds_an_attention_width_down_to_a_multiple_of_three_heads():
    demo = get_config("demo", style="authors-code")
    assert get_config("demo").model.attention_dim == 16 and demo.model.attention_dim == 15
    assert demo.model.attention_dim % demo.model.attention_heads == 0
    with pytest.raises(ValueError, match="preset style 'torch'"):
        get_config("demo", style="torch")


def test_set_overrides_convert_types_and_reject_unknown_keys():
    c = apply_overrides(get_config("iemocap"), ["lambda_con=0", "train.epochs=7", "gate=mlp", "loss.gamma=0"])
    assert c.loss.lambda_con == 0.0 and isinstance(c.loss.lambda_con, float)
    assert c.train.epochs == 7 and c.model.gate == "mlp" and c.loss.gamma == 0.0
    assert apply_overrides(get_config("iemocap"), ["test_every_epoch=yes"]).train.test_every_epoch is True
    assert "lambda_con" in valid_keys() and "epochs" in valid_keys() and "gate" in valid_keys()
    with pytest.raises(OverrideError, match="unknown key; valid keys: .*lambda_con"):
        apply_overrides(get_config("iemocap"), ["lamda_con=0"])
    with pytest.raises(OverrideError, match="expected a value of type int"):
        apply_overrides(get_config("iemocap"), ["epochs=many"])
    with pytest.raises(OverrideError, match="expected true or false"):
        apply_overrides(get_config("iemocap"), ["test_every_epoch=maybe"])
    with pytest.raises(OverrideError, match="expected key=value"):
        apply_overrides(get_config("iemocap"), ["epochs"])


def test_an_override_the_config_refuses_is_its_validation_error():
    with pytest.raises(ValueError, match="gate='moe' is not one of"):
        apply_overrides(get_config("iemocap"), ["gate=moe"])
    with pytest.raises(ValueError, match="checkpoint_minutes=-1"):
        TrainConfig(checkpoint_minutes=-1)
