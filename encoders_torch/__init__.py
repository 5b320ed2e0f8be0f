"""encoders_torch: corpus readers and LoRA-fine-tuned text / speech LLM encoders (PyTorch, transformers, peft).

Writes utterance embeddings into the `bridges` feature store. Never imports jax, flax, optax or orbax.
Import the submodules directly (`encoders_torch.corpora`, `encoders_torch.finetune`, ...): this
package file stays light so that reading corpora does not load torch.
"""
