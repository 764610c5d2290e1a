"""Launched by tests/test_training.py as `torchrun --nproc_per_node 2 tests/ddp_train.py MODEL DATA OUT`."""

import sys

from moe_sieve.training import TrainConfig, train

model, data, out = sys.argv[1:4]
config = TrainConfig(
    model=model,
    data=data,
    out=out,
    batch_size=8,
    micro_batch_size=2,
    max_steps=3,
    logging_steps=1,
    save_steps=3,
    learning_rate=1e-3,
    r=4,
    alpha=8,
    profile_subsample=1.0,
    device="cpu",
)
train(config)
