"""Dataset references, loading local datasets in every supported layout, columns, and the torch side."""

from __future__ import annotations

import functools
import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from hf_wemoe.errors import SourceError, WEMoEError
from hf_wemoe.zeroshot import data as data_module
from hf_wemoe.zeroshot.data import (
    DATASET_REF_HELP,
    DatasetRef,
    ImageClassificationDataset,
    collate_images,
    load_task_dataset,
    make_dataloader,
    parse_dataset_ref,
)

CLASSES = ["cat", "dog"]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _png(seed: int, size: int = 12, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _labelled(n: int, offset: int = 0) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png(offset + i), "path": None} for i in range(n)],
            "label": [i % 2 for i in range(n)],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Tiny datasets in every local layout."""
    root = tmp_path_factory.mktemp("datasets")
    datasets.DatasetDict({"train": _labelled(4), "test": _labelled(5, offset=100)}).save_to_disk(
        root / "dict"
    )
    datasets.DatasetDict({"train": _labelled(2), "validation": _labelled(3)}).save_to_disk(root / "no_test")
    _labelled(3).save_to_disk(root / "single")
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(2 + c):
                (folder / f"{i}.png").write_bytes(_png(i + 10 * c))
    flat = root / "flat_images"
    for c, name in enumerate(CLASSES):
        (flat / name).mkdir(parents=True)
        for i in range(2):
            (flat / name / f"{i}.png").write_bytes(_png(50 + i + 10 * c))
    # Parquet without HF metadata: image bytes in an 'img' struct column, an integer 'target'.
    plain = datasets.Dataset.from_dict(
        {
            "img": [{"bytes": _png(i), "path": None} for i in range(4)],
            "target": [0, 1, 1, 0],
            "note": list("abcd"),
        }
    )
    (root / "parquet").mkdir()
    plain.to_parquet(str(root / "parquet" / "test-00000-of-00001.parquet"))
    _labelled(3).to_parquet(str(root / "one.parquet"))
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(root / "text_only")
    datasets.Dataset.from_dict(
        {"picture": [{"bytes": _png(1), "path": None}] * 3, "kind": ["b", "a", "b"]},
        features=datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")}),
    ).save_to_disk(root / "string_labels")
    modes = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": _png(i, mode=m), "path": None} for i, m in enumerate(["L", "RGBA", "P", "RGB"])
            ]
        },
        features=datasets.Features({"image": datasets.Image()}),
    )
    modes.save_to_disk(root / "modes")
    corrupt = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": _png(0), "path": None}, {"bytes": b"not an image", "path": None}],
            "label": [0, 1],
        },
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}),
    )
    corrupt.save_to_disk(root / "corrupt")
    return root


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """load_task_dataset with a private cache: the Arrow files datasets writes stay out of the user's cache."""
    cache_dir = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    return functools.partial(load_task_dataset, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


# ---------------------------------------------------------------------------------------------------------
# references


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tanganke/sun397", DatasetRef(repo="tanganke/sun397")),
        ("ylecun/mnist#train", DatasetRef(repo="ylecun/mnist", split="train")),
        (
            "ufldl-stanford/svhn:cropped_digits#test",
            DatasetRef(repo="ufldl-stanford/svhn", config="cropped_digits", split="test"),
        ),
        (f"tanganke/gtsrb@{SHA}#test", DatasetRef(repo="tanganke/gtsrb", revision=SHA, split="test")),
        (
            "org/data.set_v2@refs/pr/3:cfg-1#test[:10%]",
            DatasetRef(repo="org/data.set_v2", revision="refs/pr/3", config="cfg-1", split="test[:10%]"),
        ),
        ("mnist", DatasetRef(repo="mnist")),
        ("tanganke/eurosat#test[100:200]", DatasetRef(repo="tanganke/eurosat", split="test[100:200]")),
        ("./data/missing#validation", DatasetRef(path="./data/missing", split="validation")),
        ("/abs/path/file.parquet", DatasetRef(path="/abs/path/file.parquet")),
    ],
)
def test_parse_and_round_trip(text, expected):
    ref = parse_dataset_ref(text)
    assert ref == expected
    assert str(ref) == text
    assert parse_dataset_ref(str(ref)) == ref
    assert ref.is_local == (expected.path is not None)


def test_parse_existing_local_paths(root, monkeypatch):
    ref = parse_dataset_ref(str(root / "dict"))
    assert ref == DatasetRef(path=str(root / "dict"))
    assert parse_dataset_ref(f"{root / 'dict'}#train") == DatasetRef(path=str(root / "dict"), split="train")
    # A relative folder that exists wins over the Hub id it resembles.
    monkeypatch.chdir(root)
    assert parse_dataset_ref("images#train") == DatasetRef(path="images", split="train")
    assert parse_dataset_ref("dict").is_local


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty dataset reference"),
        ("   ", "empty dataset reference"),
        ("org/name#", "empty split"),
        ("org/name@#test", "empty revision"),
        ("org/name:#test", "empty config"),
        ("org/name#te st", "invalid split"),
        ("a/b/c", "neither an existing path nor a Hub dataset"),
        ("org/-bad", "neither an existing path nor a Hub dataset"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(WEMoEError, match=message):
        parse_dataset_ref(text)


def test_ref_requires_one_source():
    with pytest.raises(ValueError):
        DatasetRef()
    with pytest.raises(ValueError):
        DatasetRef(repo="a/b", path="x")
    with pytest.raises(ValueError):
        DatasetRef(path="x", config="c")


def test_help_text_documents_the_syntax():
    assert "REPO[@REVISION][:CONFIG][#SPLIT]" in DATASET_REF_HELP
    assert "PATH[#SPLIT]" in DATASET_REF_HELP
    assert "--image-column" in DATASET_REF_HELP


# ---------------------------------------------------------------------------------------------------------
# local loading


def test_save_to_disk_dict_default_and_explicit_split(root, load):
    data = load(str(root / "dict"))
    assert (data.split, len(data), data.image_column, data.label_column) == ("test", 5, "image", "label")
    assert data.classnames == CLASSES and data.num_classes == 2
    assert data.name == f"{root / 'dict'}#test"
    train = load(f"{root / 'dict'}#train")
    assert (train.split, len(train)) == ("train", 4)
    sliced = load(f"{root / 'dict'}#test[1:3]")
    assert len(sliced) == 2
    assert sliced.dataset[0]["image"].tobytes() == data.dataset[1]["image"].tobytes()


def test_split_errors_list_the_splits(root, load):
    with pytest.raises(WEMoEError, match=r"no 'test' split \(splits: train, validation\).*#SPLIT"):
        load(str(root / "no_test"))
    with pytest.raises(WEMoEError, match=r"split 'dev' not found.*\(splits: train, validation\)"):
        load(f"{root / 'no_test'}#dev")


def test_single_saved_dataset(root, load, tmp_path):
    data = load(str(root / "single"))
    assert len(data) == 3 and data.classnames == CLASSES
    assert len(load(f"{root / 'single'}#test[:1]")) == 1
    (arrow,) = (root / "single").glob("*.arrow")
    assert len(load(str(arrow))) == 3
    # A saved split that records its name answers to that name only.
    named = tmp_path / "named"
    split = load(str(root / "one.parquet")).dataset  # loaded by datasets as split 'train'
    assert str(split.split) == "train"
    split.save_to_disk(named)
    assert load(str(named)).split == "train"
    with pytest.raises(WEMoEError, match=r"split 'test' not found .*\(splits: train\)"):
        load(f"{named}#test")


def test_imagefolder_with_split_folders(root, load):
    data = load(str(root / "images"))
    assert data.split == "test" and len(data) == 5
    assert data.classnames == CLASSES and data.label_column == "label"
    assert sorted(data.dataset["label"]) == [0, 0, 1, 1, 1]


def test_imagefolder_with_class_folders_only(root, load):
    # Only one split (datasets names it 'train'): with no split requested, that split is used.
    data = load(str(root / "flat_images"))
    assert data.split == "train" and len(data) == 4 and data.classnames == CLASSES


def test_parquet_folder_and_file_and_column_detection(root, load):
    data = load(str(root / "parquet"))
    # 'img' holds raw image structs: detected by name and cast to Image(); 'target' by name (no ClassLabel).
    assert (data.image_column, data.label_column, data.classnames) == ("img", "target", None)
    assert isinstance(data.dataset.features["img"], datasets.Image)
    assert data.dataset[0]["img"].size == (14, 12)
    single = load(str(root / "one.parquet"))
    assert single.split == "train" and len(single) == 3 and single.classnames == CLASSES


def test_column_overrides(root, load):
    data = load(str(root / "parquet"), label_column="note")
    assert data.label_column == "note"
    # A string label column becomes a ClassLabel with sorted names.
    assert data.classnames == ["a", "b", "c", "d"]
    with pytest.raises(
        WEMoEError, match=r"--image-column 'photo' is not a column.*columns: img, target, note"
    ):
        load(str(root / "parquet"), image_column="photo")
    with pytest.raises(WEMoEError, match="--label-column 'y' is not a column"):
        load(str(root / "parquet"), label_column="y")
    with pytest.raises(WEMoEError, match="'note' .* not images"):
        load(str(root / "parquet"), image_column="note")


def test_string_labels_are_class_encoded(root, load):
    data = load(str(root / "string_labels"), label_column="kind")
    assert data.image_column == "picture" and data.classnames == ["a", "b"]
    assert data.dataset["kind"] == [1, 0, 1]


def test_unlabelled_dataset(root, load):
    data = load(str(root / "modes"))
    assert data.label_column is None and data.classnames is None and data.num_classes is None


def test_missing_image_column(root, load):
    with pytest.raises(WEMoEError) as info:
        load(str(root / "text_only"))
    message = str(info.value)
    assert "no image column" in message and "text, label" in message and "--image-column" in message


def test_empty_split(root, load):
    with pytest.raises(WEMoEError, match="empty; choose another split"):
        load(f"{root / 'dict'}#test[5:]")


def test_missing_path(tmp_path, load):
    with pytest.raises(SourceError, match="dataset path not found"):
        load(str(tmp_path / "nothing_here"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="unsupported dataset file"):
        load(str(tmp_path / "notes.txt"))


# ---------------------------------------------------------------------------------------------------------
# Hub loading (datasets.load_dataset replaced: what matters here is the call and the error mapping)


def test_hub_call_arguments(monkeypatch, root, load):
    calls = []

    def fake_load_dataset(repo, config=None, *, split, revision, cache_dir):
        calls.append((repo, config, split, revision))
        return _labelled(2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load(f"ufldl-stanford/svhn@{SHA}:cropped_digits")
    assert calls == [("ufldl-stanford/svhn", "cropped_digits", "test", SHA)]
    assert data.split == "test" and data.classnames == CLASSES
    assert data.name == f"ufldl-stanford/svhn@{SHA}:cropped_digits#test"


def test_hub_unknown_dataset(monkeypatch, load):
    from datasets.exceptions import DatasetNotFoundError

    def fake_load_dataset(*args, **kwargs):
        raise DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(SourceError, match="unknown Hub dataset 'nobody/nothing'"):
        load("nobody/nothing")


def test_hub_unreachable(monkeypatch, load):
    def fake_load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/x' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(SourceError, match="cannot get Hub dataset org/x: Couldn't reach"):
        load("org/x")


@pytest.mark.parametrize(
    ("ref", "available", "outcome"),
    [
        ("org/x", ["train"], "train"),  # default split, single split available: use it
        ("org/x", ["train", "validation"], r"split 'test' not found in org/x \(splits: train, validation\)"),
        ("org/x#dev", ["train"], r"split 'dev' not found in org/x \(splits: train\)"),
    ],
)
def test_hub_split_fallback_and_errors(monkeypatch, ref, available, outcome, load):
    def fake_load_dataset(repo, config=None, *, split, revision, cache_dir):
        if split not in available:
            raise ValueError(f'Unknown split "{split}". Should be one of {available}.')
        return _labelled(1)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda *a, **k: list(available))
    if "not found" in outcome:
        with pytest.raises(WEMoEError, match=outcome):
            load(ref)
    else:
        assert load(ref).split == outcome


# ---------------------------------------------------------------------------------------------------------
# torch side


def test_torch_dataset_items_match_direct_processing(root, processor, load):
    data = load(str(root / "dict"))
    dataset = ImageClassificationDataset(data, processor)
    assert len(dataset) == 5
    item = dataset[3]
    assert set(item) == {"pixel_values", "labels"}
    assert item["pixel_values"].dtype == torch.float32 and item["pixel_values"].shape == (3, 16, 16)
    assert item["labels"].dtype == torch.long and int(item["labels"]) == 1
    expected = processor(images=data.dataset[3]["image"].convert("RGB"), return_tensors="pt")["pixel_values"][
        0
    ]
    torch.testing.assert_close(item["pixel_values"], expected)
    unlabelled = ImageClassificationDataset(data, processor, with_labels=False)
    assert set(unlabelled[0]) == {"pixel_values"}


def test_torch_dataset_converts_every_mode_to_rgb(root, processor, load):
    dataset = ImageClassificationDataset(load(str(root / "modes")), processor)
    for i in range(len(dataset)):
        assert dataset.load_image(i).mode == "RGB"
        assert dataset[i]["pixel_values"].shape == (3, 16, 16)


def test_corrupt_image_is_named(root, processor, load):
    dataset = ImageClassificationDataset(load(str(root / "corrupt")), processor)
    assert dataset[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(WEMoEError, match=r"cannot decode image 1 of dataset .*corrupt#test"):
        dataset[1]


def test_collate_and_dataloader(root, processor, load):
    dataset = ImageClassificationDataset(load(str(root / "dict")), processor)
    batch = collate_images([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [0, 1]

    def order(seed):
        loader = make_dataloader(dataset, batch_size=2, shuffle=True, seed=seed)
        return [b["pixel_values"].sum().item() for b in loader]

    assert order(0) == order(0)
    batches = list(make_dataloader(dataset, batch_size=2))
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [0, 1, 0, 1, 0]


def test_torch_dataset_does_not_decode_eagerly(root, processor, monkeypatch, load):
    data = load(str(root / "dict"))
    decoded = []
    original = data_module.ImageClassificationDataset.load_image

    def counting(self, index):
        decoded.append(index)
        return original(self, index)

    monkeypatch.setattr(data_module.ImageClassificationDataset, "load_image", counting)
    dataset = ImageClassificationDataset(data, processor)
    assert decoded == []
    assert int(dataset[2]["labels"]) == 0
    assert decoded == [2]


@pytest.mark.slow
def test_hub_dataset_through_a_local_hub(tmp_path):
    """Push a dataset to the local Hub server, then load it by every part of the reference syntax."""
    from hub_server import HubServer, client_env, client_result, run_client

    code = """
        import io, json
        import datasets, numpy as np
        from PIL import Image
        from hf_wemoe.zeroshot.data import load_task_dataset
        from hf_wemoe.errors import WEMoEError

        def png(i):
            buffer = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(buffer, format="PNG")
            return buffer.getvalue()

        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
        def make(n, offset):
            rows = {"image": [{"bytes": png(offset + i), "path": None} for i in range(n)], "label": [i % 2 for i in range(n)]}
            return datasets.Dataset.from_dict(rows, features=features)

        first = datasets.DatasetDict({"train": make(3, 0), "test": make(4, 5)}).push_to_hub("testorg/digits").oid
        make(2, 9).push_to_hub("testorg/digits", config_name="small", split="test")
        make(5, 0).push_to_hub("testorg/digits", split="test")  # a new commit on main: test has 5 rows now
        out = {"first": first}
        for ref in ["testorg/digits", "testorg/digits#train[:2]", f"testorg/digits@{first}#test", "testorg/digits:small"]:
            data = load_task_dataset(ref)
            out[ref] = [data.name, len(data), data.classnames]
        for ref in ["testorg/nothing", "testorg/digits#validation", "testorg/digits@nobranch", "testorg/digits:nocfg"]:
            try:
                load_task_dataset(ref)
                out[ref] = "loaded"
            except WEMoEError as exc:
                out[ref] = str(exc)
        print("@@RESULT@@ " + json.dumps(out))
    """
    with HubServer(tmp_path / "hub") as server:
        out = client_result(run_client(code, client_env(server, tmp_path / "hf_home", disable_xet=True)))
    assert out["testorg/digits"] == ["testorg/digits#test", 5, ["a", "b"]]
    assert out["testorg/digits#train[:2]"][:2] == ["testorg/digits#train[:2]", 2]
    pinned = f"testorg/digits@{out['first']}#test"
    assert out[pinned] == [pinned, 4, ["a", "b"]]  # the first commit, not main
    assert out["testorg/digits:small"][:2] == ["testorg/digits:small#test", 2]
    assert out["testorg/nothing"].startswith("unknown Hub dataset 'testorg/nothing'")
    assert out["testorg/digits#validation"].startswith(
        "split 'validation' not found in testorg/digits (splits: "
    )
    assert out["testorg/digits@nobranch"].startswith(
        "unknown revision 'nobranch' of Hub dataset 'testorg/digits'"
    )
    assert "BuilderConfig 'nocfg' not found" in out["testorg/digits:nocfg"]
