import datasets
import numpy as np
import pytest
import torch
from helpers import LABELS, make_dataset_dict, make_images
from PIL import Image
from transformers import ConvNextImageProcessorPil, ViTImageProcessorPil

from kdcache import KdcacheError
from kdcache.data import ImagePipeline, ViewRecipe, find_image_column, find_label_column, load_image_dataset


@pytest.mark.parametrize(
    "processor",
    [
        ViTImageProcessorPil(size={"height": 24, "width": 24}),
        ConvNextImageProcessorPil(size={"shortest_edge": 24}, crop_pct=0.875),
        ViTImageProcessorPil(size={"height": 20, "width": 28}, do_normalize=False),
    ],
)
def test_pipeline_equals_the_processor_bit_for_bit(processor):
    images, _ = make_images(7, seed=3)
    expected = processor(images, return_tensors="pt")["pixel_values"]
    pixels = ImagePipeline(processor).pixels(images)
    assert pixels.dtype == np.uint8
    assert torch.equal(ImagePipeline(processor).normalize(torch.from_numpy(pixels)), expected)


def test_dataset_formats_load_alike(tmp_path):
    reference = make_dataset_dict({"train": 6, "test": 3})
    reference.save_to_disk(str(tmp_path / "saved"))
    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    for name, split in reference.items():
        split.to_parquet(str(parquet / f"{name}-00000-of-00001.parquet"))
    for name, split in reference.items():  # an image folder: one sub-folder per class
        for row in range(len(split)):
            folder = tmp_path / "folder" / name / LABELS[split[row]["labels"]]
            folder.mkdir(parents=True, exist_ok=True)
            split[row]["image"].save(folder / f"{row}.png")
    for source in ("saved", "parquet", "folder"):
        loaded = load_image_dataset(str(tmp_path / source))
        assert sorted(loaded) == ["test", "train"] and len(loaded["train"]) == 6
        image_column, label_column = find_image_column(loaded["train"]), find_label_column(loaded)
        assert loaded["train"].features[label_column].names == LABELS
        assert isinstance(loaded["train"][0][image_column], Image.Image)


def test_a_single_split_on_disk_becomes_train(tmp_path):
    make_dataset_dict({"train": 4})["train"].save_to_disk(str(tmp_path / "one"))
    assert list(load_image_dataset(str(tmp_path / "one"))) == ["train"]


def test_columns_are_found_by_type_when_names_differ():
    split = make_dataset_dict({"train": 3})["train"].rename_columns({"image": "photo", "labels": "disease"})
    assert find_image_column(split) == "photo" and find_label_column({"train": split}) == "disease"
    with pytest.raises(KdcacheError, match="no class names"):
        find_label_column({"train": split.cast_column("disease", datasets.Value("int64"))}, label_column="disease")
    with pytest.raises(KdcacheError, match="holds .* not images"):
        find_image_column(split.add_column("path", ["a"] * 3), image_column="path")


def test_view_boxes_are_random_resized_crops_seeded_by_row():
    recipe = ViewRecipe((32, 32), resample=2, scale=(0.25, 1.0), seed=7)
    views = recipe.sample(120, 80, key=5, count=200)
    assert views.dtype == np.int32 and views.shape == (200, 5)
    x0, y0, x1, y1, flip = views.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 120).all() and (y1 <= 80).all()
    area = (x1 - x0) * (y1 - y0) / (120 * 80)
    assert area.min() >= 0.2 and area.max() <= 1.0 and area.std() > 0.1
    assert 0.35 < flip.mean() < 0.65
    assert np.array_equal(views, recipe.sample(120, 80, key=5, count=200)), "same seed and row, same views"
    assert not np.array_equal(views, recipe.sample(120, 80, key=6, count=200))
    assert not np.array_equal(views, ViewRecipe((32, 32), 2, seed=8).sample(120, 80, key=5, count=200))


def test_rendered_view_is_the_crop_resized_and_flipped():
    image = make_images(1, seed=0, size=(60, 50))[0][0]
    recipe = ViewRecipe((16, 24), resample=Image.BILINEAR)
    plain = recipe.render(image, (10, 5, 40, 45, 0))
    mirrored = recipe.render(image, (10, 5, 40, 45, 1))
    assert plain.shape == (3, 16, 24) and plain.dtype == np.uint8
    assert np.array_equal(mirrored, plain[:, :, ::-1])
    expected = np.asarray(image.resize((24, 16), Image.BILINEAR, box=(10, 5, 40, 45))).transpose(2, 0, 1)
    assert np.array_equal(plain, expected)


def test_bad_view_settings_are_refused():
    with pytest.raises(KdcacheError, match="view settings"):
        ViewRecipe((32, 32), 2, scale=(0.0, 1.0))
    with pytest.raises(KdcacheError, match="view settings"):
        ViewRecipe((32, 32), 2, scale=(0.5, 0.4))
    with pytest.raises(KdcacheError, match="view settings"):
        ViewRecipe((32, 32), 2, mix_alpha=-1.0)


def test_mix_partners_and_weights_depend_on_seed_and_row_alone():
    recipe = ViewRecipe((32, 32), 2, seed=3, mix_alpha=1.0)
    partners, weights = recipe.sample_partners(row=4, rows=10, count=400)
    assert partners.dtype == np.int32 and weights.dtype == np.float32 and partners.shape == weights.shape == (400,)
    assert (partners != 4).all() and partners.min() == 0 and partners.max() == 9, "any other row, never itself"
    assert (weights >= 0.5).all() and (weights <= 1.0).all() and 0.7 < weights.mean() < 0.8  # Beta(1,1) folded
    again = recipe.sample_partners(row=4, rows=10, count=400)
    assert np.array_equal(partners, again[0]) and np.array_equal(weights, again[1])
    assert not np.array_equal(partners, recipe.sample_partners(row=5, rows=10, count=400)[0])
    other_seed = ViewRecipe((32, 32), 2, seed=4, mix_alpha=1.0).sample_partners(row=4, rows=10, count=400)
    assert not np.array_equal(partners, other_seed[0])
    assert not np.array_equal(recipe.sample(50, 40, 4, 1)[0], recipe.sample_partner_view(50, 40, row=4, index=0)), (
        "the partner's view is drawn apart from the row's own views"
    )
    assert np.array_equal(recipe.sample_partner_view(50, 40, 4, 2), recipe.sample_partner_view(50, 40, 4, 2))


def test_sources_are_reduced_never_enlarged_and_round_trip_as_raw_pixels():
    from kdcache.data import from_raw_source, raw_source

    recipe = ViewRecipe((16, 16), Image.BICUBIC, source_size=20)
    image = make_images(1, seed=0, size=(60, 40))[0][0]
    reduced = recipe.reduce(image)
    assert reduced.size == (30, 20) and np.array_equal(
        np.asarray(reduced), np.asarray(image.resize((30, 20), Image.BICUBIC))
    )
    small = make_images(1, seed=1, size=(18, 30))[0][0]
    assert recipe.reduce(small) is small
    data, shape = raw_source(reduced)
    assert shape == [20, 30, 3] and np.array_equal(np.asarray(from_raw_source(data, shape)), np.asarray(reduced))
    assert ViewRecipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()
    assert "mix_alpha" not in ViewRecipe((16, 16), 2).to_dict(), (
        "a recipe without format 3's fields reads as format 2's"
    )


def test_mixed_input_is_the_weighted_sum_of_the_two_inputs():
    pipeline = ImagePipeline(ViTImageProcessorPil(size={"height": 8, "width": 8}))
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=generator) for _ in range(2))
    weights = torch.tensor([1.0, 0.5, 0.75, 0.6])
    mixed = pipeline.mix(a, b, weights)
    assert torch.equal(mixed[0], pipeline.normalize(a)[0])
    expected = weights.view(-1, 1, 1, 1) * pipeline.normalize(a) + (
        1 - weights.view(-1, 1, 1, 1)
    ) * pipeline.normalize(b)
    assert torch.allclose(mixed, expected, atol=1e-6)


def test_an_empty_split_saved_with_save_to_disk_loads_empty(tmp_path):
    source = make_dataset_dict({"train": 4, "test": 2})
    source["test"] = source["test"].select([])
    source.save_to_disk(str(tmp_path / "saved"))
    loaded = load_image_dataset(str(tmp_path / "saved"))  # datasets.load_from_disk raises IndexError on this folder
    assert sorted(loaded) == ["test", "train"] and len(loaded["train"]) == 4 and len(loaded["test"]) == 0
    assert loaded["test"].features == source["test"].features
    source["test"].save_to_disk(str(tmp_path / "one-empty"))
    assert len(load_image_dataset(str(tmp_path / "one-empty"))["train"]) == 0


def test_a_label_column_of_names_is_numbered_by_the_sorted_names_of_every_split(tmp_path):
    """A metadata.csv's or CSV's class names: one numbering for all splits (a class missing from one split keeps its
    number), an empty name a row without a label, and the same folder loads to the same fingerprints each time."""
    images, _ = make_images(5, seed=0)
    splits = {
        "train": {"image": images[:3], "disease": ["rust", "healthy", ""]},
        "validation": {"image": images[3:], "disease": ["angular", "rust"]},
    }
    datasets.DatasetDict({name: datasets.Dataset.from_dict(rows) for name, rows in splits.items()}).save_to_disk(
        str(tmp_path / "d")
    )
    loaded = load_image_dataset(str(tmp_path / "d"), label_column="disease")
    for split in loaded.values():
        assert split.features["disease"] == datasets.ClassLabel(names=["angular", "healthy", "rust"])
    assert list(loaded["train"]["disease"]) == [2, 1, -1] and list(loaded["validation"]["disease"]) == [0, 2]
    assert find_label_column(dict(loaded), "disease") == "disease"
    again = load_image_dataset(str(tmp_path / "d"), label_column="disease")
    assert [split._fingerprint for split in again.values()] == [split._fingerprint for split in loaded.values()]
    # a column of names not asked for, and not named label(s), is left as it is
    assert load_image_dataset(str(tmp_path / "d"))["train"].features["disease"] == datasets.Value("string")
