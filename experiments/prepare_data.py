r"""Builds a paper dataset's TFDS array_record files from manually downloaded files (no TensorFlow,
no download).

  python experiments/prepare_data.py --dataset=nyuv2 --manual_dir=/data/nyuv2 \
    [--data_dir=~/tensorflow_datasets]
  python experiments/prepare_data.py --dataset=cityscapes --manual_dir=/data/cityscapes_zips \
    [--data_dir=...]

CelebA uses TFDS's own builder, whose image features need TensorFlow to build:
  pip install tensorflow && tfds build celeb_a --file_format=array_record [--data_dir=...]
See README.md, 'Datasets'.
"""

import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # noqa: E402

from mtl_jax import runtime  # noqa: E402
from mtl_jax.data import tfds_datasets  # noqa: E402
from mtl_jax.data.builders import cityscapes_mtl  # noqa: E402
from mtl_jax.data.builders import nyuv2_mtl  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", None, ["cityscapes", "nyuv2"], "Dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the manually downloaded files.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data directory ('' = TFDS default).")
flags.mark_flags_as_required(["dataset", "manual_dir"])


def main(argv):
  del argv
  if not os.path.isdir(_MANUAL_DIR.value):
    raise FileNotFoundError(
      f"--manual_dir {_MANUAL_DIR.value!r} is not a directory: download the dataset's files "
      "there first (see README.md, 'Datasets')."
    )
  builder_class = {"cityscapes": cityscapes_mtl.CityscapesMtl, "nyuv2": nyuv2_mtl.Nyuv2Mtl}[
    _DATASET.value
  ]
  name = {"cityscapes": tfds_datasets.CITYSCAPES_TFDS_NAME, "nyuv2": tfds_datasets.NYUV2_TFDS_NAME}[
    _DATASET.value
  ]
  config = name.partition("/")[2] or None
  builder = builder_class(
    config=config, data_dir=_DATA_DIR.value or None, file_format="array_record"
  )
  start = time.time()
  print(f"Building {name} from {_MANUAL_DIR.value} into {builder.data_dir} ...", flush=True)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value)
  )
  sizes = {split: info.num_examples for split, info in builder.info.splits.items()}
  print(f"Done in {time.time() - start:.0f} s: {sizes} in {builder.data_dir}", flush=True)


if __name__ == "__main__":
  runtime.run(main)
