"""The paper's per-dataset presets (DESIGN §5; paper Sec. 4.2), one module each, and the authors' code.

Every dataset trains with Adam, learning rate 1e-5, gradient clipping at global norm 1.0, for 100
epochs; the table of DESIGN §5 fixes the batch size, λ, α, τ and the GRU depth. ``demo`` is the
built-in synthetic store. A name without a module of its own gets the IEMOCAP preset with the store's
label names. ``style="authors-code"`` applies `authors_code.apply` on top.
"""

from __future__ import annotations

from typing import Sequence

from mister_jax.config import Config
from mister_jax.configs import authors_code, demo, emorynlp, iemocap, meld, mosi

DATASETS = {"iemocap": iemocap, "meld": meld, "mosi": mosi, "emorynlp": emorynlp, "demo": demo}
STYLES = ("paper", "authors-code")
PAPER_LABELS = {name: module.LABELS for name, module in DATASETS.items() if name != "demo"}


def get_config(dataset: str, label_names: Sequence[str] | None = None, style: str = "paper") -> Config:
    """The preset of ``dataset``; ``label_names`` (from the store) override the paper's classes."""
    if style not in STYLES:
        raise ValueError(f"preset style {style!r} is not one of {STYLES}")
    module = DATASETS.get(dataset, iemocap)
    config = module.get_config(tuple(label_names or module.LABELS))
    return authors_code.apply(config) if style == "authors-code" else config
