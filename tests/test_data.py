import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ConvNextImageProcessorPil, ViTImageProcessorPil

from conftest import LABELS, make_dataset_dict, make_images
from kdcache import KdcacheError
from kdcache.data import ImagePipeline, ViewRecipe, find_columns, load_image_dataset


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
        image_column, label_column = find_columns(loaded["train"])
        assert loaded["train"].features[label_column].names == LABELS
        assert isinstance(loaded["train"][0][image_column], Image.Image)


def test_a_single_split_on_disk_becomes_train(tmp_path):
    make_dataset_dict({"train": 4})["train"].save_to_disk(str(tmp_path / "one"))
    assert list(load_image_dataset(str(tmp_path / "one"))) == ["train"]


def test_columns_are_found_by_type_when_names_differ():
    split = make_dataset_dict({"train": 3})["train"].rename_columns({"image": "photo", "labels": "disease"})
    assert find_columns(split) == ("photo", "disease")
    with pytest.raises(KdcacheError, match="no class names"):
        find_columns(split.cast_column("disease", datasets.Value("int64")), label_column="disease")
    with pytest.raises(KdcacheError, match="holds .* not images"):
        find_columns(split.add_column("path", ["a"] * 3), image_column="path")


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


def test_an_empty_split_saved_with_save_to_disk_loads_empty(tmp_path):
    source = make_dataset_dict({"train": 4, "test": 2})
    source["test"] = source["test"].select([])
    source.save_to_disk(str(tmp_path / "saved"))
    loaded = load_image_dataset(str(tmp_path / "saved"))  # datasets.load_from_disk raises IndexError on this folder
    assert sorted(loaded) == ["test", "train"] and len(loaded["train"]) == 4 and len(loaded["test"]) == 0
    assert loaded["test"].features == source["test"].features
    source["test"].save_to_disk(str(tmp_path / "one-empty"))
    assert len(load_image_dataset(str(tmp_path / "one-empty"))["train"]) == 0
