"""MiSTER-E in JAX: `train_and_evaluate(config, store, workdir)` trains a run (`mister_jax.train`);
`mister_jax.configs.get_config` gives the paper's presets."""


def __getattr__(name: str):
    # Imported on first use, so that `python -m mister_jax.train` does not find its own module loaded.
    if name == "train_and_evaluate":
        from mister_jax.train import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module 'mister_jax' has no attribute {name!r}")
