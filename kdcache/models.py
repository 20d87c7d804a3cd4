"""Loading classifiers (hub id or local folder) and lining up their label heads with a dataset's labels."""

import hashlib
import re

import torch

from kdcache.errors import KdcacheError, hub_error

# transformers 5 (with `kernels`, which it requires) kernelizes every model from_pretrained loads: on a GPU its layers
# are swapped at model.eval()/train() for kernels fetched from the Hub. That is code from the network at run time, a
# computation other than the one a cache's manifest fingerprints (and than the CPU's), and offline (HF_HUB_OFFLINE=1)
# a ValueError at the first evaluation (seen on an H200, BENCHMARKS.md). kdcache runs the layers as the weights were
# trained: every model it loads is loaded with these.
NO_HUB_KERNELS = {"use_kernels": False}


def load_classifier(
    name_or_path: str,
    what: str = "teacher",
    flag: str = "--teacher",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """An image-classification model in eval mode. Never `ignore_mismatched_sizes`: a silently re-initialised
    head would turn the teacher's logits into noise."""
    from transformers import AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, **NO_HUB_KERNELS
        )
    except Exception as error:
        raise hub_error(what, name_or_path, flag, error) from None
    return model.eval()


def _canonical(name: str) -> str:
    return re.sub(r"[\s\-_]+", "_", str(name).strip().lower())


def align_labels(
    model_id2label: dict,
    dataset_labels: list[str],
    model_name: str = "teacher",
    by_index: bool = False,
) -> list[int]:
    """For each dataset class, the index of the model's output with the same label name.

    Names are compared ignoring case, spaces, '-' and '_'. A head whose classes differ from the dataset's (another
    count, or names that do not map one to one) is refused: distilling from it would teach nonsense.
    """
    id2label = {int(index): name for index, name in model_id2label.items()}
    count = len(id2label)
    if count != len(dataset_labels):
        raise KdcacheError(
            f"the {model_name} has {count} output classes but the dataset has {len(dataset_labels)} "
            f"({', '.join(dataset_labels[:5])}{', ...' if len(dataset_labels) > 5 else ''}); "
            f"fine-tune the {model_name} on this dataset first"
        )
    if by_index:
        return list(range(count))
    by_name = {}
    for index, name in id2label.items():
        by_name.setdefault(_canonical(name), []).append(index)
    mapping, missing = [], []
    for name in dataset_labels:
        matches = by_name.get(_canonical(name), [])
        if len(matches) == 1:
            mapping.append(matches[0])
        else:
            missing.append(name)
    if missing or len(set(mapping)) != count:
        model_names = [id2label[i] for i in sorted(id2label)]
        generic = all(re.fullmatch(r"LABEL_\d+", name) for name in model_names)
        hint = (
            "its config has no label names; if its outputs are in the dataset's label order, pass --match-labels-by-index"
            if generic
            else f"fine-tune the {model_name} on this dataset first, or pass --match-labels-by-index if only the names differ"
        )
        raise KdcacheError(
            f"the {model_name}'s labels ({', '.join(model_names[:5])}) do not match the dataset's "
            f"({', '.join(dataset_labels[:5])}): no match for {', '.join(missing[:5]) or 'some classes'}; {hint}"
        )
    return mapping


def weights_sha256(model) -> str:
    """A hash of the weights as loaded, the same for a hub download and a local copy of it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
