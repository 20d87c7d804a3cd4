"""The cache format every stage reads: the manifest, the reader, the compact-logit codec, teacher ensembles."""
