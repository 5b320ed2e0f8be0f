"""The fast kernels of MiSTER-E, each beside a plain reference that computes the same thing the obvious
way; tests/test_ops_*.py hold every kernel equal to its reference. What each gains: docs/BENCHMARKS.md.

  gru            `BidirectionalGRU` (`gru_layer`, `reverse_conversations`): every modality's and direction's
                 GRU stepped in one `lax.scan` over a feature-major state [G, H, B], because the CPU's matmul
                 library runs the tall-times-thin step product faster; all-padding steps skipped; a
                 hand-written backward pass whose weight gradients are large matmuls after the scan instead
                 of accumulations inside it. Reference `bidirectional_gru_reference`: one row-major scan per
                 stream, JAX's own gradients.
  forward_gru    `ForwardGRU`: the causal CANs' forward-only GRUs (`ModelConfig.causal`) on the same
                 `gru_layer`, one stream per modality. Reference `forward_gru_reference`: one row-major
                 scan per modality.
  temporal_conv  `temporal_conv` (weights `ConvWeights`): the temporal inception's 1-D 'same' or causal
                 convolution (Eq. 3) as one matmul over all taps and k shifted sums, cheaper on XLA:CPU
                 than the convolution op. Reference `temporal_conv_reference`: `jax.lax.conv_general_dilated`.
  attention      `StackedMultiHeadAttention`: the speech and text streams' multi-head attentions (Eq. 5–8)
                 as one batched computation over stacked weights, one op for both streams instead of two;
                 causal masks future keys. Reference `stacked_attention_reference`: one stream and one
                 head at a time (causal: one query at a time over the keys up to it).
  dropout        `dropout` / `Dropout`: two 16-bit uniform draws per 32-bit random word instead of one word
                 per element, since the draws are a noticeable share of a CPU step. Reference
                 `dropout_reference`: the same keep mask from the same key, in NumPy.
  clipping       `clip_by_global_norm`: the gradient scaled by one scalar factor, which fuses into Adam's
                 updates, instead of `optax.clip_by_global_norm`'s element-wise division written out in
                 full. Reference: `optax.clip_by_global_norm` itself.
"""
