"""Default fame-jax configuration: FAME on Beauty with the SASRec/RecBole defaults.

Every dataset config (beauty.py, sports.py, toys.py, yelp.py, synthetic.py) starts
from `get_config()` here and changes only what differs. Any field can be
overridden from the command line, e.g. `--config.model.num_experts=8`.
"""

import os

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()

  config.seed = 42  # Seeds parameter init, dropout and the data order.
  config.batch_size = 256  # Global training batch (sequences); split over all devices.
  # Users per full-ranking evaluation batch. -1 = auto: 512 on CPU; on GPU/TPU up to
  # 8192 (fewer dispatches), as many as fit 1 GiB of scores (scoring.auto_eval_batch_size).
  config.eval_batch_size = -1
  config.num_epochs = 200  # Upper bound on training epochs.

  config.data = ml_collections.ConfigDict()
  config.data.name = "Beauty"  # File stem in data.dir ("Beauty" -> Beauty.txt), or "synthetic".
  config.data.dir = os.environ.get("FAME_DATA_DIR", "./data")  # Where the dataset files live.
  config.data.max_len = 50  # L: the model sees at most the last L items.
  # Pack several training windows end to end into each row of max_len slots
  # (one static shape, almost no padding). A packed batch has as many rows as
  # batch_size windows of average length need, so steps per epoch stay the same.
  # Evaluation packs the histories of eval_batch_size users likewise.
  config.data.packing = True
  # Without packing: windows (and evaluation histories) are padded to the
  # smallest of these lengths that fits the batch (0 stands for max_len).
  config.data.length_buckets = (8, 16, 32, 0)
  # Without packing: sort windows by length inside pools of this many batches
  # (1 disables it; every batch is then padded to its longest window's bucket).
  config.data.bucket_pool_batches = 32
  config.data.exclude_history = True  # Drop items of the user's history from the ranking.
  # Synthetic data (used only when data.name == "synthetic"): planted facets.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_users = 2000  # Number of users generated.
  config.data.synthetic.num_items = 600  # Catalogue size.
  config.data.synthetic.num_facets = 2  # Independent facets per item (e.g. genre, brand).
  config.data.synthetic.values_per_facet = 6  # Distinct values a facet can take.
  config.data.synthetic.liked_values = 2  # Values each user likes within each facet.
  config.data.synthetic.min_len = 6  # Shortest generated sequence.
  config.data.synthetic.max_len = 30  # Longest generated sequence.
  config.data.synthetic.noise = 0.05  # Probability of a uniformly random next item.

  config.model = ml_collections.ConfigDict()
  config.model.name = "fame"  # "fame", or "sasrec" for the baseline (no FAME layer).
  config.model.hidden_size = 64  # d.
  config.model.num_layers = 2  # Transformer layers; with FAME the last one is the FAME layer.
  config.model.num_heads = 2  # H; must divide hidden_size.
  config.model.num_experts = 4  # N query experts per head (1 = no MoE ablation).
  config.model.ffn_size = 256  # Inner size of the standard blocks' FFN (4d).
  config.model.head_ffn_size = 0  # Inner size of the shared per-head FFN' (0 = 4 d/H).
  config.model.dropout = 0.5  # Dropout on hidden states.
  config.model.attention_dropout = 0.5  # Dropout on attention probabilities.
  config.model.activation = "gelu"  # FFN activation: "gelu" (RecBole) or "relu" (SASRec).
  config.model.layer_norm_eps = 1e-12  # LayerNorm epsilon (RecBole's value).
  config.model.init_std = 0.02  # Std of the normal weight init (RecBole's).
  # Eq. 11: "mixture_of_softmax" (p = sum_h g_h softmax(s_h), -log p) or
  # "logit_sum" (score = sum_h g_h s_h, softmax CE). Chosen by measurement:
  # docs/open_points.md.
  config.model.combine = "mixture_of_softmax"
  config.model.gate = True  # Learned head gate (Eq. 10); False = uniform 1/H (ablation).
  # Residual of FFN' (Eq. 7): "mixture" adds f^(h), "none" has no residual
  # (measured worse: docs/open_points.md).
  config.model.head_ffn_residual = "mixture"
  config.model.dtype = "float32"  # Activation/matmul dtype ("bfloat16" on GPU/TPU); params stay float32.

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-3  # Adam peak learning rate.
  config.optim.weight_decay = 0.0  # Decoupled weight decay (AdamW) if > 0.
  config.optim.b1 = 0.9  # Adam beta1.
  config.optim.b2 = 0.999  # Adam beta2.
  config.optim.warmup_steps = 0  # Linear warm-up steps (0 = constant learning rate).
  config.optim.grad_clip_norm = 0.0  # Clip the global gradient norm (0 = off).

  # Items per chunk of the streaming cross-entropy (0 = materialise all logits);
  # memory O(tokens * chunk) for any catalogue. -1 = auto: 1024 on CPU, where the
  # chunk's logits stay in cache (2x faster steps than 0, benchmarks/README.md);
  # 0 on GPU/TPU (one matmul, no loop) unless the logits would pass 1 GiB
  # (scoring.auto_chunk_size).
  config.loss_chunk_size = -1
  # Positions of the training cross-entropy scored at a time against the whole
  # catalogue, the gradients taken in the same pass (scoring.next_item_nll; used
  # instead of loss_chunk_size when > 0). -1 = auto: on CPU up to 160 positions
  # whose logits fit 15 MiB (Beauty: 155; its step ~10% shorter than with
  # 1024-item chunks, benchmarks/README.md); 0 (off) on GPU/TPU and where fewer
  # than 32 positions fit (scoring.auto_row_block).
  config.loss_row_block = -1
  # The training output layer (item tables E W_f and the row-blocked loss) as one
  # hand-written kernel (fame_jax/cpu_kernels.py): "auto" uses it on one CPU device
  # with AVX-512 and C/C++ compilers, for FAME's mixture rule with d/H = 32 in
  # float32, on all cores (Beauty's step ~32% shorter than with XLA's kernels on
  # 2 cores); "xla" never.
  config.loss_kernel = "auto"
  config.eval_chunk_size = 0  # Items per chunk when ranking (0 = whole catalogue).
  # Users ranked together (0 = the whole batch). -1 = auto: 128 on CPU (their
  # scores stay in cache), 0 on GPU/TPU (scoring.auto_user_block).
  config.eval_user_block = -1

  # Training steps per jitted call (a lax.scan over that many stacked batches; an
  # epoch's last call is padded with empty batches, which change nothing). Fewer
  # dispatches, transfers and host syncs; the same numbers. -1 = auto: 1 on CPU;
  # 8-16 on GPU/TPU, whichever pads least (train_lib.auto_steps_per_call). > 1
  # needs data.packing. Pre-emption and checkpoint_every_steps act between calls.
  config.steps_per_call = -1

  config.eval_every_epochs = 1  # Validate every this many epochs.
  config.early_stop_metric = "NDCG@10"  # Validation metric that picks the best checkpoint.
  config.early_stop_patience = 10  # Stop after this many evaluations without improvement.
  # At an epoch's end, save (latest and a new best state) only when this many seconds
  # have passed since the last save (0 = every epoch). The last epoch, early stopping
  # and SIGTERM always save; a crash loses at most this long plus an epoch.
  config.checkpoint_every_secs = 30.0
  config.checkpoint_every_steps = 0  # Also save the latest state every this many steps (0 = per epoch only).
  config.log_every_steps = 50  # Progress-bar loss refresh (a host sync) every this many steps.
  # GPU: deterministic XLA kernels (XLA_FLAGS=--xla_gpu_deterministic_ops=true, set by
  # train.py), so the same config and seed give the same numbers; False gives ~26%
  # shorter epochs on an H200, but two runs drift apart. No effect on CPU/TPU.
  config.deterministic = True
  config.mesh_model_axis = 1  # Devices on the 'model' axis (shards the item table); 1 = pure data parallel.
  return config
