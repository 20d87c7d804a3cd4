"""The dataset card of a pushed cache (README.md beside kdcache.json): YAML metadata that the Hub indexes (the teacher
and its fingerprint, the source dataset and revision, splits and row counts, views, how the logits are stored, the
source's license when known) with a `configs` section, so that `datasets.load_dataset(REPO)` reads the logits with
plain datasets; and a body saying how to train from it with kdcache and how to read it without."""

from pathlib import Path

from kdcache.format.stores import Address

BODY = """
# {title}

The raw logits of the image classifier {teacher} on {dataset}, cached once by kdcache (`kdcache teacher-logits`)
so that students can be distilled from them without running the teacher again: {rows} rows in {split_count} split(s) ({split_list}){views}. Logits are stored as {logits}, in the
dataset's label order ({labels}).

## Train a student from it with kdcache

```
pip install 'kdcache[remote]'
kdcache train-student {address}
```

The cache is pulled once into kdcache's cache folder, every chunk's sha256 checked against `kdcache.json`, and reused
while this repository holds the same cache (`kdcache pull-cache {address} --output DIR` pulls it into a folder of your
choice; `kdcache info DIR` describes it).

## Read it without kdcache

```python
import datasets

logits = datasets.load_dataset({load_args}){load_note}
row = logits["{first_split}"][0]  # row_index (the row in the source split), labels, teacher_logits, ...
```

Each split is the Arrow files `SPLIT/chunk-NNNNNN.arrow`, in row order; `kdcache.json` (the manifest) records what
made them (the teacher's weights sha256, the source dataset's revision and split fingerprints, the image processor)
and each file's size and sha256. {compact}
"""

COMPACT = (
    "This cache is compact: `teacher_logits` holds the K largest logits of each view (descending), "
    "`teacher_logits_indices` their classes, and `teacher_logits_tail` the log-mean-exp of the other logits, the logit "
    "to give every other class."
)


def dataset_card(manifest: dict, address: Address, source: str | None = None):
    """The huggingface_hub.DatasetCard of the cache described by `manifest`, pushed to `address`; `source` is where
    the dataset's own card (and its license) is read from, when not the manifest's name (a local folder's path)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    teacher, dataset = manifest["teacher"], manifest["dataset"]
    splits, logits = dataset["splits"], manifest["columns"]["teacher_logits"]
    views = manifest.get("views")
    title = f"{teacher['name_or_path']} logits on {dataset['name_or_path']}"
    metadata = DatasetCardData(
        license=_source_license(source or dataset["name_or_path"]),
        pretty_name=title,
        task_categories=["image-classification"],
        tags=["kdcache", "knowledge-distillation", "teacher-logits"],
        source_datasets=[dataset["name_or_path"]] if _is_hub_id(dataset["name_or_path"]) else None,
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"{name}/chunk-*.arrow"} for name in splits],
            }
        ],
        kdcache={
            "format_version": manifest["format_version"],
            "fingerprint": manifest["fingerprint"],
            "teacher": {
                "name_or_path": teacher["name_or_path"],
                "revision": teacher.get("revision"),
                "weights_sha256": teacher["weights_sha256"],
            },
            "dataset": {"name_or_path": dataset["name_or_path"], "revision": dataset.get("revision")},
            "splits": {
                name: {"rows": split["num_rows"], "views": split.get("views", 1)} for name, split in splits.items()
            },
            "views": views["count"] if views else 1,
            "logits": {
                "dtype": logits["dtype"],
                "top_k": logits.get("top_k"),
                "classes": len(manifest["label_names"]),
            },
            "label_names": manifest["label_names"],
        },
    )
    hub = address.on_hub
    body = BODY.format(
        title=title,
        teacher=f"[{teacher['name_or_path']}](https://huggingface.co/{teacher['name_or_path']})"
        if _is_hub_id(teacher["name_or_path"])
        else f"`{teacher['name_or_path']}`",
        dataset=f"`{dataset['name_or_path']}`"
        + (f" (revision {dataset['revision']})" if dataset.get("revision") else ""),
        rows=sum(split["num_rows"] for split in splits.values()),
        split_count=len(splits),
        split_list=", ".join(f"{name}: {split['num_rows']}" for name, split in splits.items()),
        views=f", {views['count']} augmented views per image of {', '.join(views['splits'])}" if views else "",
        logits=f"{logits['dtype']}" + (f", the top {logits['top_k']} per view" if logits.get("top_k") else ""),
        labels=", ".join(manifest["label_names"]),
        address=str(address),
        load_args=f'"{address.repo_id}"' if hub else '"FOLDER"',
        load_note="" if hub else "  # FOLDER: a copy of this one (this card's configs name the files)",
        first_split=next(iter(splits)),
        compact=COMPACT if logits.get("top_k") else "",
    )
    return DatasetCard(f"---\n{metadata.to_yaml()}\n---\n{body}")


def _is_hub_id(name: str) -> bool:
    return name.count("/") <= 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _source_license(name_or_path: str) -> str | None:
    """The license the source dataset's own card declares, when it can be read here (a local folder's README.md, or
    the Hub's card when the Hub is reachable); None otherwise, and the card then says nothing of a license."""
    from huggingface_hub import DatasetCard

    try:
        local = Path(name_or_path) / "README.md"
        card = DatasetCard.load(local if local.exists() else name_or_path, repo_type="dataset")
    except Exception:  # no card, no network: a license unknown is left out, never guessed
        return None
    license = card.data.get("license")
    return license if isinstance(license, str) else None
