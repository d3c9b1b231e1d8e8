"""TFDS builder that turns a folder of MNIST-format idx files into ArrayRecord data.

TFDS's stock ``mnist``/``fashion_mnist`` builders need the network and
TensorFlow; this one reads the idx files from ``manual_dir`` and stores raw
uint8 tensors (``tfds.features.Image`` would need TensorFlow to encode PNGs).
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from jaxbp.app.data.idx import expected_file_names, find_dataset_files, read_split

IMAGE_SHAPE = (28, 28)
CLASSES = 10
SPLITS = ("train", "test")


class JaxbpIdx(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST-format idx files -> ``{"image": uint8 (28, 28, 1), "label": int64}``.

    One BuilderConfig per data set name; the files come from ``manual_dir``.
    Not registered in TFDS's global registry: we build it by class, so a
    second import under another module name cannot clash.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="fashion_mnist", description="Fashion-MNIST from idx files"),
        tfds.core.BuilderConfig(name="mnist", description="MNIST from idx files"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put " + ", ".join(
        f"{n}[.gz]" for split in SPLITS for n in expected_file_names(split)
    ) + " in the manual folder."

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            # BYTES: one bytes field per image instead of 784 int64s; measured
            # 3x faster to prepare, and read back with a single np.frombuffer.
            "image": tfds.features.Tensor(
                shape=(*IMAGE_SHAPE, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
            ),
            "label": tfds.features.ClassLabel(num_classes=CLASSES),
        })
        # DatasetInfo directly: dataset_info_from_configs would scan this
        # package's folder for TFDS metadata files we do not ship.
        return tfds.core.DatasetInfo(
            builder=self,
            features=features,
            supervised_keys=("image", "label"),
            # Keep the files' order, so "the first N examples" means what it says.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        folder = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(folder, split) for split in SPLITS}

    def _generate_examples(self, folder, split):
        images, labels = read_split(folder, split, IMAGE_SHAPE, CLASSES)
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image[..., None], "label": int(label)}


def source_key(folder: str) -> str:
    """Short hash of the source folder's path and its files' sizes and mtimes.

    Prepared data lives under a subfolder named by this key, so tiny test
    fixtures and the real data set (or a re-written fixture) never share a cache.
    """
    h = hashlib.sha256(os.path.realpath(folder).encode())
    for path in find_dataset_files(folder):
        st = os.stat(path)
        h.update(f"|{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_folder(name: str, source_dir: str, data_root: str) -> str:
    """The data-root subfolder for data set ``name`` read from ``source_dir``."""
    return os.path.join(data_root, f"{name}-{source_key(source_dir)}")


def open_builder(name: str, folder: str) -> JaxbpIdx:
    """The builder of data set ``name`` whose prepared files go into ``folder``."""
    return JaxbpIdx(config=name, data_dir=folder, file_format="array_record")


def prepare_builder(builder: JaxbpIdx, source_dir: str) -> None:
    """Write the ArrayRecord files unless they exist; never downloads. TFDS's progress bars
    show on a terminal only, as training's do: elsewhere (a log, a pipe) they would bury the
    one line an error after the preparation prints."""
    tfds.display_progress_bar(sys.stderr.isatty())
    config = tfds.download.DownloadConfig(manual_dir=source_dir)
    builder.download_and_prepare(download_config=config, file_format="array_record")


def read_prepared(builder: JaxbpIdx, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All of a prepared split: ``(images uint8 (N, 28, 28, 1), labels int64 (N,))``.

    One batched ``__getitems__`` of the serialized records, then our own parse
    of the tf.train.Example protos: for Fashion-MNIST's 60k training examples
    this takes about 1.2 s, against 5 s through TFDS's per-example decoder and
    14 s reading ``source[i]`` one by one.
    """
    source = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    return parse_records(source.__getitems__(range(len(source))))


def parse_records(records) -> tuple[np.ndarray, np.ndarray]:
    """Serialized examples of :class:`JaxbpIdx` -> ``(images, labels)`` arrays."""
    pixels, labels = [], []
    for record in records:
        feature = tf_example_pb2.Example.FromString(record).features.feature
        pixels.append(feature["image"].bytes_list.value[0])
        labels.append(feature["label"].int64_list.value[0])
    images = np.frombuffer(b"".join(pixels), dtype=np.uint8)
    return images.reshape(len(labels), *IMAGE_SHAPE, 1), np.asarray(labels, dtype=np.int64)
