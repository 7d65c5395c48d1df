"""Features of a sample set computed by every process of a torchrun job, gathered in sample order.

    python examples/distributed_features.py OUT.safetensors            # one process
    torchrun --standalone --nproc-per-node 2 examples/distributed_features.py OUT.safetensors

Both write the same file: each sample's noise comes from its index, each process samples and featurises its own
batches, and the feature rows are gathered in index order (docs/guide/scale-out.md).
"""

import sys

from safetensors.torch import save_file

import hasten
from hasten import distributed
from hasten.metrics.features import features

distributed.init_from_env()  # joins the group torchrun describes; nothing in one process
model = hasten.load("mnist-dit", device=distributed.device_for("cpu"))
gen = hasten.generate(model, 40, steps=4, seed=0, batch_size=8, gather=False)  # this process's rows: gen.rows
with distributed.local():  # featurise the rows held here, alone
    feats, _ = features(gen.images01, batch_size=8)
feats = distributed.gather_features(feats)  # every process's rows, in sample order, on every process
if distributed.is_main():
    save_file({"features": feats.contiguous()}, sys.argv[1])
    print(f"{tuple(feats.shape)} features from {distributed.world_size()} process(es) -> {sys.argv[1]}")
distributed.destroy(wait=True)
