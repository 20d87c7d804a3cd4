"""The default training recipe, chosen by measurement on the beans validation split (BENCHMARKS.md,
"Choosing the defaults"). Kept free of heavy imports so that `kdcache --help` stays instant."""

TRAINING = dict(epochs=30, learning_rate=2e-3, batch_size=32, weight_decay=0.05, warmup_ratio=0.05, scheduler="cosine")
