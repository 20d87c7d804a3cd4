"""The compact logit codec: a cache may store only the K largest teacher logits (and fp16); every reader rebuilds
float32 logits over all classes from them."""

import torch


def compress_logits(logits: torch.Tensor, top_k: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """The teacher's logits (..., classes) as a compact cache stores them: {"values"} (every logit, in `dtype`), or
    with top_k=K {"values", "indices", "tail"}: the K largest logits in `dtype` (descending), their class indices
    (int16 up to 32,767 classes), and one float32 `tail` per row: the log-mean-exp of the other logits, which
    `expand_logits` gives to every class outside the top K.

    The tail rule is TinyViT's (Wu et al. 2022, its saved sparse soft labels): at T=1 each top-K class keeps its
    probability exactly and the rest of the mass is spread evenly over the other classes. Stored as a logit rather
    than a probability, so that the loss's temperature still acts on the rebuilt logits."""
    logits = logits.float()
    if top_k is None:
        return {"values": logits.to(dtype)}
    values, indices = logits.topk(top_k, dim=-1)
    index = index_dtype(logits.shape[-1])
    return {"values": values.to(dtype), "indices": indices.to(index), "tail": tail_logit(logits, indices)}


def index_dtype(classes: int) -> torch.dtype:
    """The dtype a top-K cache stores class indices in: int16 up to 32,767 classes, else int32."""
    return torch.int16 if classes <= torch.iinfo(torch.int16).max else torch.int32


def tail_logit(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The log-mean-exp of the logits outside `indices` (..., K): the one logit that keeps their total probability
    at T=1 when every one of them is given it."""
    rest = logits.float().scatter(-1, indices.long(), float("-inf"))
    return torch.logsumexp(rest, dim=-1) - torch.log(torch.tensor(float(logits.shape[-1] - indices.shape[-1])))


def expand_logits(
    values: torch.Tensor, indices: torch.Tensor | None = None, tail: torch.Tensor | None = None, classes: int = 0
) -> torch.Tensor:
    """float32 logits (..., classes) rebuilt from what `compress_logits` stored: the values themselves, or the top K
    at their indices and the tail's logit everywhere else."""
    values = values.float()
    if indices is None:
        return values
    full = tail.float().unsqueeze(-1).expand(*values.shape[:-1], classes).clone()
    return full.scatter(-1, indices.long(), values)
