"""Teacher ensembles: several caches of the same rows and views, trained from as one teacher whose probabilities at
the temperature T are the teachers' probabilities at T, averaged (kdcache.format.ensemble.ensemble_teacher_logits says why
probabilities and not logits, and why every loss then distils from that average exactly).

`open_ensemble` checks that the caches can be joined (the same rows of the same splits, the same views, the same
pixels for the student, the same classes), each refusal one line naming the cache and what differs, and gives the
first cache's splits with their teacher logits replaced by the ensemble's: everything downstream (clean rows, views,
mixed views, the collator, the losses) then runs unchanged. The student's pixels, image processor and view recipe
are the first cache's, which the checks make the same as every other's.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import KdcacheError
from kdcache.format.columns import LABELS, LOGITS, MIX_PARTNERS, MIX_VIEWS, MIX_WEIGHTS, PIXELS, VIEWS, teacher_outputs
from kdcache.format.manifest import Manifest
from kdcache.format.reader import load_cache, logit_columns, rebuilt_logits

ROWS_PER_COMPARISON = 256  # pixel rows compared at a time: a few MB read, whatever the split's size


@dataclass
class Ensemble:
    """The caches of a teacher ensemble, in the order given, and the normalised weights of their teachers."""

    paths: list[Path]
    manifests: list[Manifest]
    weights: list[float]

    @property
    def fingerprints(self) -> list[str]:
        return [manifest.fingerprint for manifest in self.manifests]

    @property
    def teachers(self) -> list[str]:
        return [manifest.teacher["name_or_path"] for manifest in self.manifests]

    def recipe(self) -> dict:
        """What the summary and model card record of the ensemble, in the caches' order."""
        return {
            "teacher": self.teachers,
            "teacher_weights": self.weights,
            "teacher_weights_sha256": [manifest.teacher["weights_sha256"] for manifest in self.manifests],
            "cache": [str(path) for path in self.paths],
            "cache_fingerprint": self.fingerprints,
        }


def normalised_weights(weights, count: int) -> list[float]:
    """The teachers' weights summing to 1 (equal when None); kdcache.options.check_teacher_weights checked them."""
    weights = [1.0] * count if weights is None else [float(weight) for weight in weights]
    return [weight / sum(weights) for weight in weights]


def open_ensemble(
    paths, first_cached, first_manifest: Manifest, splits, weights, temperature: float, share=None, verify=True
):
    """The ensemble of the caches at `paths` (the first already loaded as `first_cached`, `first_manifest`), checked
    on `splits` (those the run reads), and the first cache's DatasetDict with those splits' teacher logits replaced
    by the ensemble's at `temperature`. `share`: this process's share of each cache's files to hash (load_cache);
    `verify=False`: none, the caller has verified them."""

    paths = [Path(path) for path in paths]
    caches, manifests = [first_cached], [first_manifest]
    for path in paths[1:]:
        cached, manifest = load_cache(path, verify=verify, share=share)
        check_same_inputs(paths[0], first_cached, first_manifest, path, cached, manifest, splits)
        caches.append(cached)
        manifests.append(manifest)
    ensemble = Ensemble(paths, manifests, normalised_weights(weights, len(paths)))
    import datasets

    joined = datasets.DatasetDict(first_cached)  # a new dict of the same splits: the caches on disk are only read
    classes = len(first_manifest.label_names)
    for split in splits:
        member_logits = [
            rebuilt_logits(cached[split].with_format("numpy", columns=logit_columns(cached[split]))[:], classes)
            for cached in caches
        ]
        logits = ensemble_teacher_logits(member_logits, ensemble.weights, temperature).float().numpy()
        joined[split] = with_teacher_logits(first_cached[split], logits)
    return joined, ensemble


def with_teacher_logits(split, logits: np.ndarray):
    """`split` with its teacher's outputs replaced by `logits` (float32, (rows, classes) or (rows, views, classes),
    as a cache of every logit stores them), held in memory beside the other columns, which stay memory-mapped on
    disk. The first teacher's other outputs (kdcache.format.columns.teacher_outputs) go too: they are not the
    ensemble's."""
    import datasets

    shape = logits.shape[1:]
    feature = (
        datasets.List(datasets.Value("float32"), length=shape[0])
        if len(shape) == 1
        else datasets.Array2D(shape=shape, dtype="float32")
    )
    column = datasets.Dataset.from_dict({LOGITS: logits}, features=datasets.Features({LOGITS: feature}))
    return datasets.concatenate_datasets([split.remove_columns(teacher_outputs(split.column_names)), column], axis=1)


def check_same_inputs(first_path, first_cached, first: Manifest, path, cached, manifest: Manifest, splits) -> None:
    """Refuse a cache whose teacher did not see what the first cache's did, on the splits the run reads: other
    classes, other rows, other views (count, recipe, boxes, mixing), or other pixels (another resize or crop)."""
    same_as = f"cache '{first_path}'"
    if manifest.label_names != first.label_names:
        raise KdcacheError(
            f"cache '{path}' scores the classes {', '.join(manifest.label_names)} and {same_as} "
            f"{', '.join(first.label_names)}; an ensemble's caches must be made from the same dataset"
        )
    for split in splits:
        if split not in cached:
            raise KdcacheError(
                f"cache '{path}' has no split '{split}', which {same_as} has and this run reads; "
                f"cache it (kdcache teacher-logits --splits ...) or pass one cache"
            )
        mine, theirs = manifest.split(split), first.split(split)
        if (mine["fingerprint"], mine["num_rows"]) != (theirs["fingerprint"], theirs["num_rows"]):
            raise KdcacheError(
                f"cache '{path}' split '{split}' was made from other rows than {same_as} (fingerprint "
                f"{mine['fingerprint']}, {mine['num_rows']} rows; the first's {theirs['fingerprint']}, "
                f"{theirs['num_rows']} rows); make every cache of an ensemble from the same dataset"
            )
        if mine["views"] != theirs["views"]:
            raise KdcacheError(
                f"cache '{path}' has {mine['views']} views per image of split '{split}' and {same_as} "
                f"{theirs['views']}; make every cache of an ensemble with the same --views and --view-splits"
            )
        if mine["views"] > 1 and manifest["views"]["recipe"] != first["views"]["recipe"]:
            recipe, first_recipe = manifest["views"]["recipe"], first["views"]["recipe"]
            differences = [
                f"{name} {recipe.get(name)} vs {first_recipe.get(name)}"
                for name in sorted(set(recipe) | set(first_recipe))
                if recipe.get(name) != first_recipe.get(name)
            ]
            raise KdcacheError(
                f"cache '{path}' draws the views of split '{split}' otherwise than {same_as} "
                f"({'; '.join(differences)}); make every cache of an ensemble with the same --views, "
                "--view-scale, --view-seed, --mix-alpha and --source-size, and teachers of the same input size"
            )
        _check_same_columns(first_path, first_cached[split], path, cached[split], split, mine["views"] > 1)


def _check_same_columns(first_path, first_split, path, split, split_name: str, with_views: bool) -> None:
    """The stored inputs themselves, beyond what the manifests say: the labels, and the student's pixels (clean
    rows) or the views' boxes and mixing (view rows), read a slice at a time."""
    columns = [LABELS] + ([VIEWS, MIX_PARTNERS, MIX_VIEWS, MIX_WEIGHTS] if with_views else [PIXELS])
    columns = [column for column in columns if column in first_split.column_names]
    what = {LABELS: "labels", PIXELS: "pixels"}
    for column in columns:
        if column not in split.column_names:
            raise KdcacheError(
                f"cache '{path}' split '{split_name}' has no {column} column, which cache '{first_path}' has: "
                "its views are not mixed the same way; make every cache of an ensemble with the same --mix-alpha"
            )
    # only the compared columns, each slice read once: a view split's source images are not read at all
    mine = split.select_columns(columns).with_format("numpy")
    theirs = first_split.select_columns(columns).with_format("numpy")
    for start in range(0, len(split), ROWS_PER_COMPARISON):
        stop = min(len(split), start + ROWS_PER_COMPARISON)
        mine_rows, their_rows = mine[start:stop], theirs[start:stop]
        for column in columns:
            if not np.array_equal(mine_rows[column], their_rows[column]):
                fix = (
                    "its teacher's image processor resizes or crops otherwise: ensemble teachers of the same input "
                    "geometry"
                    if column == PIXELS
                    else "make every cache of an ensemble from the same dataset, with the same view settings"
                )
                raise KdcacheError(
                    f"cache '{path}' split '{split_name}' holds other {what.get(column, column)} than cache "
                    f"'{first_path}' (rows {start} to {stop - 1}); {fix}"
                )


def ensemble_teacher_logits(member_logits, weights=None, temperature: float = 1.0) -> torch.Tensor:
    """The logits of a teacher ensemble whose probabilities at T are the members' probabilities at T, averaged:

        z = T * log(sum_i w_i softmax(z_i / T)) + sum_i w_i * T * logsumexp(z_i / T)

    so that softmax(z / T) = sum_i w_i softmax(z_i / T). The second term is a constant per row, which no softmax
    sees: it keeps z on the members' scale and makes an ensemble of identical members give back their logits.
    `member_logits`: one (..., classes) tensor or array per teacher, on the same rows; `weights`: one per teacher,
    normalised to sum 1 (None: equal). Computed in float64 (log-sum-exp throughout: no probability underflows to
    log 0), returned in float64.

    The probabilities are averaged, not the logits: a mean of logits is the normalised geometric mean of the
    probabilities, which puts almost no mass on a class that any one teacher rules out, while the members' mean
    keeps what each teacher knows. Every loss in LOSSES reads the teacher only through softmax(teacher / T) (kd's
    KL, dkd's target and non-target distributions, dist's correlations), so each then distils from the average
    exactly; logit standardisation z-scores the logits themselves, which an average of probabilities does not
    have, so train-student refuses it for ensembles.
    """
    members = torch.stack([torch.as_tensor(logits).double() for logits in member_logits]) / temperature
    weights = (
        torch.ones(len(members), dtype=torch.float64)
        if weights is None
        else torch.tensor(weights, dtype=torch.float64)
    )
    weights = (weights / weights.sum()).reshape(-1, *([1] * (members.ndim - 1)))
    mean_log_probs = torch.logsumexp(members.log_softmax(dim=-1) + weights.log(), dim=0)
    shift = (weights * torch.logsumexp(members, dim=-1, keepdim=True)).sum(dim=0)
    return temperature * (mean_log_probs + shift)
