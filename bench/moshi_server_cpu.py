"""Run Kyutai's ``python -m moshi.server`` on a CPU, for bench/vs_moshi_server.py.

The installed package is not modified. Before its module runs, this launcher:

- makes ``torch.cuda.synchronize`` a no-op: moshi.server's warm-up calls it unconditionally,
  which fails on a machine without CUDA;
- with ``--lm-dtype float32`` (what jmoshi-server uses on CPU), loads the LM in float32:
  moshi.server's own flags only offer bfloat16 or float16, which would make the comparison
  one of dtypes rather than of servers;
- with ``--torch-threads N``, sets torch's CPU thread count (moshi.server steps the model on
  its event loop thread, the main thread).

Every other argument goes to moshi.server unchanged:

    python bench/moshi_server_cpu.py --lm-dtype float32 -- --moshi-weight ... --device cpu --static none
"""

from __future__ import annotations

import argparse
import runpy
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    torch.cuda.synchronize = lambda *a, **k: None
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.lm_dtype:
        from moshi.models import loaders

        dtype = getattr(torch, args.lm_dtype)
        original = loaders.CheckpointInfo.get_moshi

        def get_moshi(self, *a, **kw):
            kw["dtype"] = dtype
            return original(self, *a, **kw)

        loaders.CheckpointInfo.get_moshi = get_moshi
    rest = args.server_args[1:] if args.server_args[:1] == ["--"] else args.server_args
    sys.argv = ["moshi.server", *rest]
    runpy.run_module("moshi.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
