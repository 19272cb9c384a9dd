"""Attention kernels: one dispatcher (`dispatch.attend`), each kernel in its own file.

- dispatch.py: `attend`, the entry point the decoder calls with an `AttentionMask`
  (model/kv_cache.py), and the choice of kernel;
- xla.py: the XLA path (blockwise prefill/extend, one-pass decode) and the dense reference;
- flash.py: the blockwise online-softmax kernel (`KeyBlock`s) with its own VJP;
- view.py: the zero-copy branch view as a key block of the blockwise kernel;
- cudnn_split.py: cuDNN flash attention, the cache layout split in two calls merged by log-sum-exp;
- splash.py: jax's TPU splash-attention Pallas kernel.
"""
