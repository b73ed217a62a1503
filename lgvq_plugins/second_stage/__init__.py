"""Second stage: a GPT over a frozen tokenizer's code indices, its sampling, and the code cache.

* :mod:`~lgvq_plugins.second_stage.gpt` — :class:`CodeGPT` (pre-LN transformer, causal SDPA)
  with an optional conditioning prefix (text features, a half image's codes, ...);
* :mod:`~lgvq_plugins.second_stage.sampling` — temperature / top-k / top-p filtering;
* :mod:`~lgvq_plugins.second_stage.code_cache` — codes (and caption features) extracted once
  from a frozen tokenizer over a data set, stored as safetensors under a content hash;
* :mod:`~lgvq_plugins.second_stage.train` — the training loop on cached codes, with
  checkpoints and resume through :mod:`lgvq_plugins.training.checkpoint`.
"""
