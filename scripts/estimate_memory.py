"""Per-device memory of the FAME train and eval steps for a huge catalogue, from XLA.

Builds the model for `--num_items` items on a ('data', 'model') mesh of fake CPU
devices, compiles the sharded train step and the ranking step for abstract
inputs (nothing is allocated) and prints the compiled programs' memory analysis
per device, as JSON.

  python scripts/estimate_memory.py --num_items 10000000 --devices 8 --model_axis 8
"""

import argparse
import json
import os
import sys


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_items", type=int, default=10_000_000)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--model_axis", type=int, default=8, help="devices on the 'model' axis")
  parser.add_argument("--rows", type=int, default=32, help="packed rows per training batch")
  parser.add_argument("--eval_batch", type=int, default=256)
  parser.add_argument("--loss_chunk", type=int, default=65536)
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from configs import default
  from fame_jax import data as data_lib
  from fame_jax import evaluation
  from fame_jax import train_lib

  config = default.get_config()
  config.mesh_model_axis = args.model_axis
  config.loss_chunk_size = args.loss_chunk
  config.eval_chunk_size = args.loss_chunk
  config.eval_batch_size = args.eval_batch
  dataset = data_lib.Dataset("estimate", [np.arange(1, 6, dtype=np.int32)], args.num_items)
  exp = train_lib.Experiment.from_config(config, dataset)
  length = config.data.max_len
  state = exp.abstract_state()
  batch = {k: jax.ShapeDtypeStruct((args.rows, length), jnp.int32)
           for k in ("items", "targets", "segments", "positions")}
  train = exp.jit_train_step().lower(state, batch, jax.random.key(0)).compile()
  eval_batch = {"items": jax.ShapeDtypeStruct((args.eval_batch, length), jnp.int32),
                "lengths": jax.ShapeDtypeStruct((args.eval_batch,), jnp.int32),
                "targets": jax.ShapeDtypeStruct((args.eval_batch,), jnp.int32),
                "exclude": jax.ShapeDtypeStruct((args.eval_batch, length), jnp.int32)}
  rank = exp.make_eval_fn().lower(state.params, eval_batch).compile()

  def analysis(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    gib = lambda b: round(b / 2**30, 3)
    return {"arguments_gib": gib(m.argument_size_in_bytes), "outputs_gib": gib(m.output_size_in_bytes),
            "temporaries_gib": gib(m.temp_size_in_bytes), "aliased_gib": gib(m.alias_size_in_bytes),
            "peak_estimate_gib": gib(m.argument_size_in_bytes + m.output_size_in_bytes
                                     + m.temp_size_in_bytes - m.alias_size_in_bytes)}

  params_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  result = {
      "num_items": args.num_items, "devices": args.devices, "mesh": dict(exp.mesh.shape),
      "hidden_size": config.model.hidden_size, "loss_chunk_size": args.loss_chunk,
      "train_rows": args.rows, "max_len": length, "eval_batch": args.eval_batch,
      "params_total_gib": round(params_bytes / 2**30, 3),
      "train_step_per_device": analysis(train), "eval_step_per_device": analysis(rank),
  }
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
