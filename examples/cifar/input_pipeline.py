"""Input pipeline: CIFAR-10/100 and the offline digits set as uint8 arrays, batching, augmentation.

Where the data comes from (first match wins), for ``cifar10`` / ``cifar100``:

1. ``train.npz`` and ``test.npz`` in the data folder, each with ``images`` (uint8, NHWC) and
   ``labels``;
2. the official Python archive's extracted folder (``cifar-10-batches-py/`` or
   ``cifar-100-python/``) in the data folder, or the data folder itself;
3. the official archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) in the data
   folder, or the data folder given as that file;
4. otherwise, a download of the official archive into the data folder, checked by MD5.

The data folder is ``--data-dir`` if given, else ``$OPTAX_GC_DATA/<dataset>``, else
``~/.cache/optax_gc/<dataset>``. ``digits`` needs no files: it is scikit-learn's bundled 8x8
digits (1,797 real images), scaled to 24x24 and zero-padded to 32x32 RGB.

Everything here is plain NumPy on the host except :func:`augment` and :func:`normalize`, which run
on the device inside the jitted training step, and :func:`shard_batch`, which places a global batch
on a :class:`jax.sharding.Mesh`.
"""

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

__all__ = [
    "DataError", "Split", "Dataset", "Batch", "CifarSource", "CIFAR_SOURCES", "DATASETS",
    "default_data_dir", "load_dataset", "load_digits", "load_cifar", "download_archive",
    "stratified_subset", "train_batches", "eval_batches", "shard_batch", "augment", "normalize",
]

DATASETS = ("cifar10", "cifar100", "digits")


class DataError(RuntimeError):
  """Raised, with a one-line message saying what to do, when data is missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: ``images`` uint8 ``(N, H, W, 3)`` and ``labels`` int32 ``(N,)``."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Both splits, the class count, and the per-channel mean/std of train pixels in [0, 1]."""

  name: str
  train: Split
  test: Split
  num_classes: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  source: str


class Batch(NamedTuple):
  """A batch as the jitted steps see it; ``mask`` is 0 for padding rows of a partial batch."""

  images: jax.Array  # uint8 (B, H, W, 3)
  labels: jax.Array  # int32 (B,)
  mask: jax.Array  # float32 (B,)


@dataclasses.dataclass(frozen=True)
class CifarSource:
  """Where the official CIFAR Python archive lives and what is inside it."""

  url: str
  md5: str
  archive: str  # file name of the archive
  folder: str  # top folder inside the archive
  train_members: tuple[str, ...]
  test_members: tuple[str, ...]
  label_key: bytes
  num_classes: int


CIFAR_SOURCES: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_members=("train",),
        test_members=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}


# ----------------------------------------------------------------------------------------------
# Loading.


def default_data_dir(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
  """``data_dir``, else ``$OPTAX_GC_DATA/<dataset>``, else ``~/.cache/optax_gc/<dataset>``."""
  if data_dir is not None:
    return Path(data_dir).expanduser()
  if root := os.environ.get("OPTAX_GC_DATA"):
    return Path(root).expanduser() / dataset
  return Path.home() / ".cache" / "optax_gc" / dataset


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Dataset:
  """Loads ``cifar10``, ``cifar100`` or ``digits`` (see the module docstring for the search order).

  Args:
    name: the dataset.
    data_dir: the folder (or archive) to read; see :func:`default_data_dir`. Ignored for digits.
    download: whether to fetch the official archive when nothing is on disk.

  Returns:
    The :class:`Dataset`, with mean/std computed from its training images.

  Raises:
    DataError: the data is missing (and cannot be downloaded) or unreadable.
  """
  if name == "digits":
    train, test = load_digits()
    num_classes, source = 10, "scikit-learn digits (bundled)"
  elif name in CIFAR_SOURCES:
    folder = default_data_dir(name, data_dir)
    train, test, source = load_cifar(name, folder, download=download)
    num_classes = CIFAR_SOURCES[name].num_classes
  else:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {DATASETS}.")
  for split_name, split in (("train", train), ("test", test)):
    _check_split(split, num_classes, f"{name} {split_name} ({source})")
  mean, std = _channel_mean_std(train.images)
  return Dataset(name, train, test, num_classes, mean, std, source)


def _channel_mean_std(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of ``images / 255``, from histograms of the uint8 values."""
  channels = images.shape[-1]
  counts = np.zeros((channels, 256))
  for chunk in np.array_split(images, max(1, len(images) // 4096)):  # Bounded memory.
    flat = chunk.reshape(-1, channels)
    for c in range(channels):
      counts[c] += np.bincount(flat[:, c], minlength=256)
  values = np.arange(256) / 255.0
  mean = counts @ values / counts.sum(1)
  std = np.sqrt(counts @ values**2 / counts.sum(1) - mean**2)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_digits() -> tuple[Split, Split]:
  """scikit-learn's 1,797 8x8 digits as 32x32 RGB uint8 (3x nearest-neighbour, 4-pixel border).

  The split is stratified and fixed: 1,437 train and 360 test images.
  """
  from sklearn.datasets import load_digits as sk_load_digits  # Imported late: only needed here.
  from sklearn.model_selection import train_test_split

  digits = sk_load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..255
  images = images.repeat(3, axis=1).repeat(3, axis=2)  # (N, 24, 24)
  images = np.pad(images, ((0, 0), (4, 4), (4, 4)))  # (N, 32, 32)
  images = np.repeat(images[..., None], 3, axis=-1)  # RGB
  labels = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      images, labels, test_size=0.2, stratify=labels, random_state=0
  )
  return Split(x_tr, y_tr), Split(x_te, y_te)


def load_cifar(name: str, folder: Path, *, download: bool = True) -> tuple[Split, Split, str]:
  """Reads CIFAR from ``folder`` (npz, extracted archive or tarball), downloading if allowed.

  Returns:
    ``(train, test, description of the source)``.
  """
  src = CIFAR_SOURCES[name]
  folder = Path(folder)
  if folder.is_file():  # --data-dir given as the archive itself.
    return (*_read_tarball(folder, src), str(folder))
  if (folder / "train.npz").is_file() and (folder / "test.npz").is_file():
    return _read_npz(folder / "train.npz"), _read_npz(folder / "test.npz"), str(folder / "*.npz")
  for candidate in (folder / src.folder, folder):
    if (candidate / src.train_members[0]).is_file():
      train = _concat([_unpickle_file(candidate / m, src) for m in src.train_members])
      test = _concat([_unpickle_file(candidate / m, src) for m in src.test_members])
      return train, test, str(candidate)
  tarball = folder / src.archive
  if not tarball.is_file():
    if not download:
      raise DataError(_missing_message(name, folder, "downloads are off"))
    download_archive(src.url, tarball, src.md5, missing_hint=_missing_message(name, folder, ""))
  return (*_read_tarball(tarball, src), str(tarball))


def _missing_message(name: str, folder: Path, reason: str) -> str:
  src = CIFAR_SOURCES[name]
  return (
      f"{name} not found in {folder}{f' ({reason})' if reason else ''}: put {src.archive}, its "
      f"extracted {src.folder}/ folder, or train.npz+test.npz there, or pass --data-dir "
      f"(or set OPTAX_GC_DATA); `--dataset digits` needs no files."
  )


def download_archive(url: str, dest: Path, md5: str, *, missing_hint: str = "") -> None:
  """Downloads ``url`` to ``dest`` with a progress bar and checks its MD5; atomic on success.

  Raises:
    DataError: the download failed (e.g. offline; the message then ends with ``missing_hint``)
      or the checksum does not match.
  """
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # Processes may download at once.
  digest = hashlib.md5()
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
      total = int(response.headers.get("Content-Length") or 0) or None
      with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
        while chunk := response.read(1 << 20):
          out.write(chunk)
          digest.update(chunk)
          bar.update(len(chunk))
  except (urllib.error.URLError, OSError, TimeoutError) as e:
    part.unlink(missing_ok=True)
    raise DataError(f"could not download {url} ({e}). {missing_hint}".strip()) from None
  if digest.hexdigest() != md5:
    part.unlink(missing_ok=True)
    raise DataError(
        f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; try again."
    )
  part.replace(dest)


def _read_npz(path: Path) -> Split:
  try:
    with np.load(path) as z:
      return Split(np.asarray(z["images"]), np.asarray(z["labels"]).astype(np.int32))
  except KeyError:
    raise DataError(f"{path} must hold arrays 'images' (uint8 NHWC) and 'labels'.") from None
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise DataError(f"{path} is corrupt or not an .npz file ({e}); replace it.") from None


def _read_tarball(path: Path, src: CifarSource) -> tuple[Split, Split]:
  try:
    with tarfile.open(path, "r:gz") as tar:

      def read(member: str) -> Split:
        f = tar.extractfile(f"{src.folder}/{member}")
        if f is None:
          raise KeyError(member)
        return _unpickle(f.read(), src, f"{path}:{member}")

      train = _concat([read(m) for m in src.train_members])
      test = _concat([read(m) for m in src.test_members])
  except KeyError as e:
    raise DataError(
        f"{path} is not the official {src.archive}: member {src.folder}/{e.args[0]} is missing."
    ) from None
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path} is corrupt ({e}); delete it and retry.") from None
  return train, test


def _unpickle_file(path: Path, src: CifarSource) -> Split:
  try:
    return _unpickle(path.read_bytes(), src, str(path))
  except OSError as e:
    raise DataError(f"cannot read {path} ({e}).") from None


def _unpickle(raw: bytes, src: CifarSource, where: str) -> Split:
  """Decodes one official batch: ``b'data'`` (N, 3072) CHW-flattened uint8 plus labels."""
  try:
    d = pickle.load(io.BytesIO(raw), encoding="bytes")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[src.label_key], dtype=np.int32)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError) as e:
    raise DataError(f"{where} is corrupt or not a CIFAR batch ({e!r}); replace it.") from None
  return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)


def _concat(splits: list[Split]) -> Split:
  return Split(
      np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits])
  )


def _check_split(split: Split, num_classes: int, what: str) -> None:
  x, y = split.images, split.labels
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
    raise DataError(f"{what}: images must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}.")
  if y.shape != (len(x),) or len(x) == 0:
    raise DataError(f"{what}: need one label per image, got {y.shape} for {len(x)} images.")
  if y.min() < 0 or y.max() >= num_classes:
    raise DataError(f"{what}: labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}.")


# ----------------------------------------------------------------------------------------------
# Subsets and batching (host side, NumPy).


def stratified_subset(split: Split, n: int, seed: int = 0) -> Split:
  """``n`` examples with the class proportions of ``split`` (rows may be sorted by class).

  Each class gets ``floor(n * share)`` examples, the remainder going to the classes with the
  largest fractional parts; within a class the examples are drawn at random from ``seed``.
  """
  if not 0 < n <= len(split):
    raise ValueError(f"train subset must be in [1, {len(split)}], got {n}.")
  classes, counts = np.unique(split.labels, return_counts=True)
  exact = n * counts / len(split)
  quota = np.floor(exact).astype(int)
  quota[np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]] += 1
  rng = np.random.default_rng(seed)
  picked = [
      rng.choice(np.flatnonzero(split.labels == c), q, replace=False)
      for c, q in zip(classes, quota, strict=True)
  ]
  idx = np.sort(np.concatenate(picked))
  return Split(split.images[idx], split.labels[idx])


def _padded(order: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts ``order`` into full batches; the last is topped up by cycling ``order`` (mask 0)."""
  steps = -(-len(order) // batch_size)
  idx = np.resize(order, steps * batch_size).reshape(steps, batch_size)
  mask = (np.arange(steps * batch_size) < len(order)).astype(np.float32)
  return idx, mask.reshape(steps, batch_size)


def train_batches(n: int, batch_size: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """Row indices ``(steps, batch_size)`` and masks for one epoch, shuffled by ``(seed, epoch)``.

  Every example is seen once per epoch. The last batch keeps the full shape (so nothing is
  recompiled): it is topped up with examples from the start of the epoch, whose mask is 0.
  """
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return _padded(order, batch_size)


def eval_batches(n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Row indices and masks covering ``n`` examples in order, in full-shape batches."""
  return _padded(np.arange(n), batch_size)


def shard_batch(mesh: Mesh, split: Split, idx: np.ndarray, mask: np.ndarray) -> Batch:
  """Gathers rows ``idx`` of ``split`` and shards them along the mesh's ``data`` axis.

  With several processes (``jax.distributed``), each process passes the same global ``idx`` and
  reads only the rows its own devices hold, wherever the mesh puts them.
  """
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  if jax.process_count() == 1:  # One transfer call for the three arrays.
    return Batch(*jax.device_put((split.images[idx], split.labels[idx], mask), sharding))
  return Batch(*(
      jax.make_array_from_callback((len(idx), *a.shape[1:]), sharding,
                                   lambda index, a=a: a[idx[index[0]]])
      for a in (split.images, split.labels)
  ), jax.make_array_from_callback(mask.shape, sharding, lambda index: mask[index[0]]))


# ----------------------------------------------------------------------------------------------
# On-device preprocessing (called inside the jitted steps).


def augment(images: jax.Array, key: jax.Array, *, flip: bool = True, pad: int = 4) -> jax.Array:
  """Random crop (zero padding ``pad``) and, if ``flip``, random horizontal flip of uint8 NHWC."""
  b, h, w, c = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))
  images = crop(padded, offsets)
  if not flip:
    return images
  flipped = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
  return jnp.where(flipped, images[:, :, ::-1, :], images)


def normalize(images: jax.Array, mean_std: jax.Array) -> jax.Array:
  """uint8 images to float32 with per-channel ``(x / 255 - mean) / std``; ``mean_std`` is (2, C)."""
  return (images.astype(jnp.float32) / 255.0 - mean_std[0]) / mean_std[1]
