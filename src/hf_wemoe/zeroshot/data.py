"""Task datasets: parse a dataset reference, load it, find its image and label columns, feed it to a model.

Images are decoded lazily, one item at a time, so a large test split is never decoded in memory at once.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hf_wemoe.errors import SourceError, WEMoEError
from hf_wemoe.io.hub import hub_unreachable, is_connection_error, offline, with_retries
from hf_wemoe.utils.formatting import first_line

__all__ = [
    "DATASET_REF_HELP",
    "DEFAULT_SPLIT",
    "DatasetRef",
    "ImageClassificationDataset",
    "TaskData",
    "check_label_range",
    "collate_images",
    "load_task_dataset",
    "make_dataloader",
    "parse_dataset_ref",
]

DEFAULT_SPLIT = "test"

DATASET_REF_HELP = """\
Dataset reference: a Hub dataset or a local path.
  Hub:   REPO[@REVISION][:CONFIG][#SPLIT]
         e.g. tanganke/sun397, ylecun/mnist#train, ufldl-stanford/svhn:cropped_digits#test,
              tanganke/gtsrb@<commit-sha>#test, tanganke/eurosat#test[:500]
  Local: PATH[#SPLIT], where PATH is a folder written by Dataset(Dict).save_to_disk, an image folder
         (one subfolder per class, optionally inside train/ test/ split folders), a folder of parquet
         files, or a single .parquet file.
SPLIT defaults to 'test' (or to the only split when there is just one); it accepts slices such as
test[:1000] or test[10%:20%]. A Hub revision is a branch, tag or commit sha.
The image column is the Image() feature column (or one named image/img/pixel_values) and the label column
the ClassLabel column (or one named label/labels/target); override them with --image-column/--label-column."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SPLIT = re.compile(r"^[A-Za-z0-9_.-]+(\[[^\]]*\])?$")
_IMAGE_NAMES = ("image", "img", "pixel_values", "images", "picture", "photo")
_LABEL_NAMES = ("label", "labels", "target", "targets", "class", "fine_label", "label_id")


@dataclass(frozen=True)
class DatasetRef:
    """Where a task's data comes from: a Hub dataset (``repo``, ``config``, ``revision``) or a local ``path``.

    ``split`` is None for "the default": ``test``, or the only split of a single-split source.
    ``str(ref)`` gives back the reference syntax, and ``parse_dataset_ref(str(ref)) == ref``.
    """

    repo: str | None = None
    path: str | None = None
    config: str | None = None
    revision: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        if (self.repo is None) == (self.path is None):
            raise ValueError("a DatasetRef needs exactly one of repo and path")
        if self.path is not None and (self.config is not None or self.revision is not None):
            raise ValueError("a local DatasetRef takes no config or revision")

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def name(self) -> str:
        """Short name: the repo id or the path."""
        return self.repo if self.repo is not None else str(self.path)

    def __str__(self) -> str:
        text = self.name
        if self.revision:
            text += f"@{self.revision}"
        if self.config:
            text += f":{self.config}"
        if self.split:
            text += f"#{self.split}"
        return text


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~", ".")) or "\\" in text or text.lower().endswith((".parquet", ".arrow"))


def _check_split(split: str, text: str) -> str:
    if not _SPLIT.match(split):
        raise WEMoEError(
            f"invalid split {split!r} in dataset reference {text!r}; expected a name such as test, or a slice "
            "such as test[:1000]"
        )
    return split


def parse_dataset_ref(text: str) -> DatasetRef:
    """Parse ``REPO[@REVISION][:CONFIG][#SPLIT]`` or ``PATH[#SPLIT]`` (see :data:`DATASET_REF_HELP`).

    An existing path wins over a Hub id; a string that looks like a path (starts with ``/``, ``.`` or ``~``,
    or ends with ``.parquet``) is local even when it does not exist, so loading it reports a missing path.
    """
    raw = text.strip()
    if not raw:
        raise WEMoEError("empty dataset reference; give a Hub id such as tanganke/eurosat or a local path")
    if Path(raw).expanduser().exists():
        return DatasetRef(path=raw)
    base, hash_sign, split = raw.rpartition("#")
    if not hash_sign:
        base, split = raw, ""
    if hash_sign and not split:
        raise WEMoEError(f"empty split after '#' in dataset reference {raw!r}; write e.g. {base}#test")
    split_or_none = _check_split(split, raw) if split else None
    if Path(base).expanduser().exists() or _looks_like_path(base):
        return DatasetRef(path=base, split=split_or_none)

    # Hub id: ':' cannot occur in a repo id or a git ref, so the config is everything after the first ':'.
    repo_rev, colon, config = base.partition(":")
    repo, at, revision = repo_rev.partition("@")
    if colon and not config:
        raise WEMoEError(f"empty config after ':' in dataset reference {raw!r}")
    if at and not revision:
        raise WEMoEError(f"empty revision after '@' in dataset reference {raw!r}")
    if not _REPO_ID.match(repo) or repo.endswith((".", "-")):
        raise WEMoEError(
            f"{raw!r} is neither an existing path nor a Hub dataset reference "
            "REPO[@REVISION][:CONFIG][#SPLIT] (e.g. ufldl-stanford/svhn:cropped_digits#test)"
        )
    return DatasetRef(repo=repo, config=config or None, revision=revision or None, split=split_or_none)


@dataclass
class TaskData:
    """A loaded split and what was found in it."""

    dataset: Any  # datasets.Dataset
    ref: DatasetRef
    split: str
    image_column: str
    label_column: str | None
    classnames: list[str] | None

    @property
    def num_classes(self) -> int | None:
        return len(self.classnames) if self.classnames is not None else None

    @property
    def name(self) -> str:
        """The reference with its resolved split, for messages and reports."""
        return str(replace(self.ref, split=self.split))

    def __len__(self) -> int:
        return len(self.dataset)


# ---------------------------------------------------------------------------------------------------------
# loading


def _split_base(split: str) -> str:
    return split.split("[", 1)[0]


def _slice(dataset: Any, split: str, where: str) -> Any:
    """Apply a ``name[from:to]`` slice (datasets' split syntax) to an already loaded split."""
    if "[" not in split:
        return dataset
    import datasets

    try:
        (instruction,) = datasets.ReadInstruction.from_spec(split).to_absolute(
            {_split_base(split): len(dataset)}
        )
    except (ValueError, AssertionError) as exc:
        raise WEMoEError(f"invalid split slice {split!r} for {where}: {exc}") from exc
    # An empty range is selected by an empty list: datasets rejects an empty contiguous range at the end.
    rows = range(instruction.from_, instruction.to)
    return dataset.select(rows if len(rows) else [])


def _pick_split(splits: dict[str, Any], requested: str | None, where: str) -> tuple[Any, str]:
    """Choose a split of a DatasetDict-like mapping (the default when ``requested`` is None)."""
    names = list(splits)
    if requested is None:
        if DEFAULT_SPLIT in splits:
            return splits[DEFAULT_SPLIT], DEFAULT_SPLIT
        if len(names) == 1:
            return splits[names[0]], names[0]
        raise WEMoEError(
            f"{where} has no '{DEFAULT_SPLIT}' split (splits: {', '.join(names)}); choose one with "
            f"#SPLIT, e.g. {where}#{names[0]}"
        )
    base = _split_base(requested)
    if base not in splits:
        raise WEMoEError(
            f"split {base!r} not found in {where} (splits: {', '.join(names)}); choose one with #SPLIT"
        )
    return _slice(splits[base], requested, where), requested


def _load_local(ref: DatasetRef, cache_dir: str | None) -> tuple[Any, str]:
    import datasets

    path = Path(ref.path).expanduser()
    if not path.exists():
        raise SourceError(f"dataset path not found: {ref.path}")
    try:
        if path.is_file():
            if path.suffix.lower() == ".parquet":
                loaded = datasets.load_dataset("parquet", data_files=str(path), cache_dir=cache_dir)
            elif path.suffix.lower() == ".arrow":
                loaded = {"train": datasets.Dataset.from_file(str(path))}
            else:
                raise SourceError(
                    f"unsupported dataset file {ref.path}; give a .parquet file, a save_to_disk folder, "
                    "an image folder or a folder of parquet files"
                )
        elif (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            # A saved single Dataset is one split, named by its recorded split if it has one.
            single = datasets.load_from_disk(str(path))
            name = str(single.split) if single.split is not None else _split_base(ref.split or DEFAULT_SPLIT)
            loaded = {name: single}
        else:
            # datasets infers the builder (parquet, imagefolder, ...) and the splits from the file layout.
            loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
    except WEMoEError:
        raise
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise SourceError(f"cannot load dataset from {ref.path}: {first_line(exc)}") from exc
    return _pick_split(dict(loaded), ref.split, ref.path)


def _hub_split_names(ref: DatasetRef) -> list[str] | None:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(ref.repo, ref.config, revision=ref.revision))
    except Exception:  # only used to improve an error message; the original error is raised anyway
        return None


def _check_hub_reachable(ref: DatasetRef, where: str) -> None:
    """Fail in one line, in bounded time, when the Hub does not answer.

    datasets retries every file of an unreachable Hub for minutes; one bounded request first avoids that. Only
    reachability is checked here: an answer of any kind (even "not found") lets `load_dataset` report the rest.
    """
    from huggingface_hub import HfApi  # imported when needed, like `datasets`: the CLI starts faster
    from huggingface_hub.errors import HfHubHTTPError

    if offline():
        return
    try:
        with_retries(
            lambda: HfApi().dataset_info(ref.repo, revision=ref.revision), f"find dataset repo '{ref.repo}'"
        )
    except HfHubHTTPError:
        pass  # the Hub answered
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 -- only a Hub that cannot be reached is reported here
        if is_connection_error(exc):
            raise hub_unreachable(exc, f"load dataset {where}") from exc


def _load_hub(ref: DatasetRef, cache_dir: str | None) -> tuple[Any, str]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError

    def load(split: str) -> Any:
        return datasets.load_dataset(
            ref.repo, ref.config, split=split, revision=ref.revision, cache_dir=cache_dir
        )

    where = str(replace(ref, split=None))
    split = ref.split or DEFAULT_SPLIT
    _check_hub_reachable(ref, where)
    try:
        try:
            return load(split), split
        except ValueError as exc:
            if "split" not in str(exc).lower():
                raise
            names = _hub_split_names(ref)
            if ref.split is None and names is not None and len(names) == 1:
                return load(names[0]), names[0]
            listing = f"splits: {', '.join(names)}" if names else first_line(exc)
            raise WEMoEError(
                f"split {_split_base(split)!r} not found in {where} ({listing}); choose one with #SPLIT"
            ) from exc
    except WEMoEError:
        raise
    except DatasetNotFoundError as exc:
        # datasets raises this for an unknown revision of an existing dataset too.
        if ref.revision and "revision" in str(exc).lower():
            what = f"unknown revision {ref.revision!r} of Hub dataset {ref.repo!r}"
        else:
            what = f"unknown Hub dataset {ref.repo!r} (and no local path of that name)"
        raise SourceError(f"{what}: {first_line(exc)}") from exc
    except (HfHubHTTPError, ConnectionError) as exc:
        raise SourceError(f"cannot get Hub dataset {where}: {first_line(exc)}") from exc
    except (ValueError, FileNotFoundError) as exc:
        raise SourceError(f"cannot load Hub dataset {where}: {first_line(exc)}") from exc
    except Exception as exc:
        if is_connection_error(exc):  # timeouts and transport errors of the HTTP client
            raise hub_unreachable(exc, f"load dataset {where}") from exc
        raise


def _find_column(
    features: dict[str, Any],
    override: str | None,
    kind: type,
    names: tuple[str, ...],
    option: str,
    where: str,
) -> str | None:
    columns = list(features)
    if override is not None:
        if override not in features:
            raise WEMoEError(
                f"{option} {override!r} is not a column of {where} (columns: {', '.join(columns)})"
            )
        return override
    typed = [c for c in columns if isinstance(features[c], kind)]
    lowered = {c.lower(): c for c in columns}
    named = [lowered[n] for n in names if n in lowered]
    # A column that has the right feature type and a conventional name wins, then type, then name.
    for candidates in ([c for c in named if c in typed], typed, named):
        if candidates:
            return candidates[0]
    return None


def load_task_dataset(
    ref: DatasetRef | str,
    image_column: str | None = None,
    label_column: str | None = None,
    *,
    cache_dir: str | None = None,
) -> TaskData:
    """Load one split of a task dataset and detect its image column, label column and class names.

    ``classnames`` come from the label column's ``ClassLabel`` feature and are None without one (supply them
    with a class-names file then). The image column is cast to ``Image()`` when it holds paths or bytes.
    """
    import datasets

    if isinstance(ref, str):
        ref = parse_dataset_ref(ref)
    dataset, split = _load_local(ref, cache_dir) if ref.is_local else _load_hub(ref, cache_dir)
    where = str(replace(ref, split=split))
    features = dataset.features
    image = _find_column(features, image_column, datasets.Image, _IMAGE_NAMES, "--image-column", where)
    if image is None:
        raise WEMoEError(
            f"no image column in {where} (columns: {', '.join(features)}); name it with --image-column"
        )
    if len(dataset) == 0:
        raise WEMoEError(f"{where} is empty; choose another split with #SPLIT")
    if not isinstance(features[image], datasets.Image):
        # Paths or bytes become an Image() column; decoding the first row catches a column of something else.
        try:
            dataset = dataset.cast_column(image, datasets.Image())
            dataset[0][image].load()
        except (ValueError, TypeError, OSError, AttributeError) as exc:
            raise WEMoEError(
                f"column {image!r} of {where} holds {features[image]}, not images ({first_line(exc)}); name the "
                "image column with --image-column"
            ) from exc
    label = _find_column(features, label_column, datasets.ClassLabel, _LABEL_NAMES, "--label-column", where)
    if label is not None and label == image:
        label = None
    if label is not None and features[label] == datasets.Value("string"):
        # Text labels become a ClassLabel (names sorted), so they give integer targets and class names.
        dataset = dataset.class_encode_column(label)
    classnames = None
    if label is not None and isinstance(dataset.features[label], datasets.ClassLabel):
        classnames = list(dataset.features[label].names)
    return TaskData(
        dataset=dataset,
        ref=ref,
        split=split,
        image_column=image,
        label_column=label,
        classnames=classnames,
    )


def check_label_range(task: str, data: TaskData, num_classes: int) -> None:
    """Raise `WEMoEError` unless every label of `data` is a class index in ``[0, num_classes)``.

    Read from the label column alone (no image is decoded). Datasets mark unlabelled rows with -1, and integer
    labels may outnumber the class names given: both would score against classes the head does not have.
    """
    import pyarrow.compute as pc

    column = data.dataset.with_format("arrow")[data.label_column]
    where = f"task {task!r}: the labels of {data.name} (column {data.label_column!r})"
    if column.null_count:
        raise WEMoEError(f"{where} are missing in {column.null_count} rows; every row needs a label")
    if len(column) == 0:
        return
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low < 0 or high >= num_classes:
        advice = (
            "negative labels mark unlabelled rows: evaluate on a labelled split (train with --no-evaluate)"
            if low < 0
            else "give one class name per label with --classnames, or name the label column with --label-column"
        )
        raise WEMoEError(
            f"{where} range over {low}..{high}, but the head has {num_classes} classes (labels "
            f"0..{num_classes - 1}); {advice}"
        )


# ---------------------------------------------------------------------------------------------------------
# torch side


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Map-style torch dataset over a :class:`TaskData`: decodes one image per item, converts it to RGB and runs
    the image processor.

    Items are ``{"pixel_values": FloatTensor(C, H, W)}`` plus ``"labels"`` (int64 scalar) when the task has a
    label column and ``with_labels`` is true.
    """

    def __init__(self, data: TaskData, image_processor: Any, *, with_labels: bool = True) -> None:
        import datasets

        self.name = data.name
        self.image_processor = image_processor
        self.label_column = data.label_column if with_labels else None
        columns = [data.image_column] + ([self.label_column] if self.label_column else [])
        # decode=False: this class decodes itself, so an undecodable image can be named by index.
        self._rows = data.dataset.select_columns(columns).cast_column(
            data.image_column, datasets.Image(decode=False)
        )
        self._image_column = data.image_column

    def __len__(self) -> int:
        return len(self._rows)

    def load_image(self, index: int) -> Any:
        """The RGB PIL image of item ``index``."""
        from PIL import Image

        value = self._rows[index][self._image_column]
        try:
            if value is None:
                raise ValueError("missing image")
            source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
            if source is None:
                raise ValueError("neither bytes nor a path")
            with Image.open(source) as image:
                return image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise WEMoEError(
                f"cannot decode image {index} of dataset {self.name}: {first_line(exc)}"
            ) from exc

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixel_values = self.image_processor(images=self.load_image(index), return_tensors="pt")[
            "pixel_values"
        ]
        item = {"pixel_values": pixel_values[0].float()}
        if self.label_column is not None:
            item["labels"] = torch.tensor(self._rows[index][self.label_column], dtype=torch.long)
        return item


def collate_images(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items of :class:`ImageClassificationDataset` into a batch."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def make_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader with :func:`collate_images` and, when shuffling, a seeded generator (reproducible order)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_images,
        persistent_workers=num_workers > 0,
    )
