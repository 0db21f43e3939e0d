from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import shared_data

from datamodules.derm import DermDataModule, ImageTextDataset, read_image_text_csv, read_isic
from datamodules.synthetic.derm import CLASS_NAMES, DEMO_CSV, generate_derm_demo
from datamodules.tables import check_images, split_table
from mmclin.errors import DataError

DERM1M_COLUMNS = ["filename", "caption", "truncated_caption", "disease_label", "hierarchical_disease_label",
                  "skin_concept", "body_location", "source", "label"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return generate_derm_demo(tmp_path_factory.mktemp("demo") / "derm", lesions_per_class=4, image_size=64, seed=3)


def test_demo_is_derm1m_layout_and_reproducible(small_demo, tmp_path):
    table = pd.read_csv(small_demo / DEMO_CSV)
    assert set(DERM1M_COLUMNS) <= set(table.columns)
    assert len(table) == 7 * 4 * 2 and sorted(table["label"].unique()) == sorted(CLASS_NAMES)
    assert all((small_demo / f).is_file() for f in table["filename"])
    # every caption names its class, and the lesion's two views share one lesion id
    assert all(label in caption for label, caption in zip(table["label"], table["caption"]))
    assert table.groupby("lesion_id")["label"].nunique().eq(1).all()
    again = pd.read_csv(generate_derm_demo(tmp_path / "again", lesions_per_class=4, image_size=64, seed=3) / DEMO_CSV)
    pd.testing.assert_frame_equal(table, again)


def test_isic_sample_labels_and_missing_images():
    root = shared_data("derm_isic_sample")
    table = read_isic(root / "ISIC_2019_Training_GroundTruth_rows.csv", root, image_dir="full_res",
                      metadata_csv="ISIC_2019_Training_Metadata_rows.csv")
    assert len(table) == 29
    labels = dict(zip(table["path"].str.extract(r"(ISIC_\d+)")[0], table["label"]))
    assert labels["ISIC_0000000"] == "melanocytic nevus" and labels["ISIC_0000002"] == "melanoma"
    assert labels["ISIC_0000004"] == "melanoma" and labels["ISIC_0000003"] == "melanocytic nevus"
    assert all("{}" not in c and label in c for c, label in zip(table["caption"], table["label"]))
    with pytest.raises(DataError, match=r"line 7: image '.*ISIC_0000006.jpg' not found"):
        check_images(table, "gt.csv", on_missing="error")
    kept, skipped = check_images(table, "gt.csv", on_missing="skip")
    assert len(kept) == 5 and len(skipped) == 24 and skipped["line"].iloc[0] == 7


def test_isic_sample_through_the_datamodule():
    root = shared_data("derm_isic_sample")
    data = DermDataModule(root=str(root), format="isic", csv="ISIC_2019_Training_GroundTruth_rows.csv",
                          image_dir="full_res", on_missing="skip", val_fraction=0.2, test_fraction=0.2, image_size=32)
    data.setup("fit")
    assert sum(len(d) for d in data.datasets.values()) == 5 and len(data.skipped) == 24
    assert data.classnames == ["melanocytic nevus", "melanoma"]
    item = data.datasets["train"][0]
    assert item["image"].shape == (3, 32, 32) and item["label"] in (0, 1)


def test_csv_without_configured_columns_names_them(tmp_path):
    (tmp_path / "pairs.csv").write_text("path,text\na.jpg,a mole\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['filepath', 'title'\].*\['path', 'text'\]"):
        read_image_text_csv(tmp_path / "pairs.csv", tmp_path)


def test_empty_caption_names_the_line(tmp_path):
    (tmp_path / "pairs.csv").write_text("filepath,title\na.jpg,a mole\nb.jpg,  \n")
    with pytest.raises(DataError, match=r"empty caption in column 'title' at line\(s\) \[3\]"):
        read_image_text_csv(tmp_path / "pairs.csv", tmp_path)


def test_label_outside_class_list_is_rejected(small_demo):
    data = DermDataModule(root=str(small_demo), classes=["melanoma", "melanocytic nevus"])
    with pytest.raises(DataError, match=r"line \d+: label '.*' is not in classes"):
        data.read_table()


def test_corrupt_image_is_named(small_demo, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    table = pd.DataFrame({"path": [str(bad)], "caption": ["x"], "label": [""], "group": [""], "split": ["train"],
                          "line": [5]})
    dataset = ImageTextDataset(table, [], transform=lambda im: im, tokenizer=None, source="pairs.csv")
    with pytest.raises(DataError, match=r"pairs.csv line 5: cannot read image '.*bad.jpg'"):
        dataset[0]
    kept, skipped = check_images(table, "pairs.csv", on_missing="skip", verify=True)
    assert kept.empty and "cannot be decoded" in skipped["problem"].iloc[0]


def test_group_split_keeps_lesions_together(small_demo):
    data = DermDataModule(root=str(small_demo), group_key="lesion_id", val_fraction=0.25, test_fraction=0.25, seed=1)
    table = data.read_table()
    lesion = table["path"].str.extract(r"(\w+_\d+)_\d\.jpg")[0]
    sides = lesion.groupby(table["split"].values).apply(set)
    assert sides["train"].isdisjoint(sides["val"]) and sides["train"].isdisjoint(sides["test"])
    assert sides["val"].isdisjoint(sides["test"])
    counts = table["split"].value_counts()
    assert counts["val"] == counts["test"] == 14 and counts["train"] == 28
    # an explicit split column wins, with common spellings accepted
    given = table.assign(split=["validation" if i % 2 else "training" for i in range(len(table))])
    assert set(split_table(given, 0.1, 0.1, 0)["split"]) == {"train", "val"}


def test_tokens_and_labels_reach_the_batch(small_demo):
    from open_clip import get_tokenizer, image_transform

    table = DermDataModule(root=str(small_demo)).read_table()
    dataset = ImageTextDataset(table, CLASS_NAMES, image_transform(32, False), get_tokenizer("ViT-B-32"))
    item = dataset[0]
    assert item["text"].dtype == torch.long and item["text"].shape == (77,)
    assert CLASS_NAMES[item["label"]] == table["label"].iloc[0]


def test_ham10000_metadata_layout(small_demo, tmp_path):
    images = sorted((small_demo / "images").glob("*.jpg"))[:3]
    for im in images:
        (tmp_path / f"{im.stem}.jpg").write_bytes(im.read_bytes())
    dxs = ["mel", "nv", "df"]
    rows = [f"HAM_L{i // 2},{im.stem},{dx},histo,50,male,back" for i, (im, dx) in enumerate(zip(images, dxs))]
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n"
                                                    + "\n".join(rows) + "\n")
    table = read_isic(tmp_path / "HAM10000_metadata.csv", tmp_path, image_dir="")
    assert table["label"].tolist() == ["melanoma", "melanocytic nevus", "dermatofibroma"]
    assert table["group"].tolist() == ["HAM_L0", "HAM_L0", "HAM_L1"]
    (tmp_path / "bad.csv").write_text("lesion_id,image_id,dx\nL1,x,melanoma\n")
    with pytest.raises(DataError, match=r"bad.csv line 2: dx 'melanoma' is not one of"):
        read_isic(tmp_path / "bad.csv", tmp_path)
    (tmp_path / "nolabels.csv").write_text("image,foo\nx,1\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['MEL'\]"):
        read_isic(tmp_path / "nolabels.csv", tmp_path)
