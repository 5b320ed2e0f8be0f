"""MiSTER-E in JAX/Flax: model (`mister_jax.model`), losses (`mister_jax.losses`), configs (`mister_jax.config`)."""
