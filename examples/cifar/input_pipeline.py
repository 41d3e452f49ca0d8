"""Input pipeline: CIFAR-10/100 and the offline digits set as uint8 arrays, batching, augmentation.

Where the data comes from (first match wins), for ``cifar10`` / ``cifar100``:

1. ``train.npz`` and ``test.npz`` in the data folder, each with ``images`` (uint8, NHWC) and
   ``labels``;
2. the official Python archive's extracted folder (``cifar-10-batches-py/`` or
   ``cifar-100-python/``) in the data folder, or the data folder itself;
3. the official archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) in the data
   folder, or the data folder given as that file;
4. otherwise, a download of the official archive into the data folder, checked by MD5.

The official files are pickles. Each one is checked against the MD5 of the official file (the
archive, and every batch file in it or in its extracted folder, as torchvision lists them) before
it is read, and is decoded by :class:`_BatchUnpickler`, which builds dicts, lists, bytes, ints and
NumPy arrays and refuses every other global, so a crafted file cannot run code. A copy that is not
the official file (a re-packed archive) is read only with ``allow_unverified=True``
(``--allow-unverified-data``), and then still through the same unpickler. Nothing is written
until the data is found or downloaded and checked.

The data folder is ``--data-dir`` if given, else ``$OPTAX_GC_DATA/<dataset>``, else
``~/.cache/optax_gc/<dataset>``. ``digits`` needs no files: it is scikit-learn's bundled 8x8
digits (1,797 real images), scaled to 24x24 and zero-padded to 32x32 RGB.

Everything here is plain NumPy on the host except :func:`augment` and :func:`normalize`, which run
on the device inside the jitted training step, and :func:`shard_batch`, which places a global batch
on a :class:`jax.sharding.Mesh`.
"""

import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

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
  """Where the official CIFAR Python archive lives, what is inside it, and the official MD5s."""

  url: str
  md5: str  # of the archive
  archive: str  # file name of the archive
  folder: str  # top folder inside the archive
  train_members: tuple[str, ...]
  test_members: tuple[str, ...]
  meta_member: str  # class names; not read, but checked when present
  member_md5: dict[str, str]  # MD5 of each official file in ``folder``
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
        meta_member="batches.meta",
        member_md5={  # As torchvision's datasets/cifar.py lists them.
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
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
        meta_member="meta",
        member_md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
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
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
    allow_unverified: bool = False,
) -> Dataset:
  """Loads ``cifar10``, ``cifar100`` or ``digits`` (see the module docstring for the search order).

  Args:
    name: the dataset.
    data_dir: the folder (or archive) to read; see :func:`default_data_dir`. Ignored for digits.
    download: whether to fetch the official archive when nothing is on disk.
    allow_unverified: read CIFAR archives and batch files that are not the official ones (their
      MD5 differs) instead of raising; they are still decoded without running code.

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
    train, test, source = load_cifar(name, folder, download=download,
                                     allow_unverified=allow_unverified)
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


def load_cifar(
    name: str, folder: Path, *, download: bool = True, allow_unverified: bool = False
) -> tuple[Split, Split, str]:
  """Reads CIFAR from ``folder`` (npz, extracted archive or tarball), downloading if allowed.

  Args:
    name: ``cifar10`` or ``cifar100``.
    folder: the data folder, or the archive itself.
    download: whether to fetch the official archive when nothing is on disk.
    allow_unverified: see :func:`load_dataset`.

  Returns:
    ``(train, test, description of the source)``; the description says ``unverified`` when a file
    read was not the official one.
  """
  src = CIFAR_SOURCES[name]
  folder = Path(folder)
  if folder.is_file():  # --data-dir given as the archive itself.
    return _read_tarball(folder, src, allow_unverified)
  if (folder / "train.npz").is_file() and (folder / "test.npz").is_file():
    return _read_npz(folder / "train.npz"), _read_npz(folder / "test.npz"), str(folder / "*.npz")
  for candidate in (folder / src.folder, folder):
    if (candidate / src.train_members[0]).is_file():
      train, test, official = _read_batches(lambda m, c=candidate: _read_file(c / m), src,
                                            allow_unverified)
      return train, test, _describe(candidate, official)
  tarball = folder / src.archive
  if not tarball.is_file():
    if not download:
      raise DataError(_missing_message(name, folder, "downloads are off"))
    download_archive(src.url, tarball, src.md5, missing_hint=_missing_message(name, folder, ""))
  return _read_tarball(tarball, src, allow_unverified)


def _missing_message(name: str, folder: Path, reason: str) -> str:
  src = CIFAR_SOURCES[name]
  return (
      f"{name} not found in {folder}{f' ({reason})' if reason else ''}: put {src.archive}, its "
      f"extracted {src.folder}/ folder, or train.npz+test.npz there, or pass --data-dir "
      f"(or set OPTAX_GC_DATA); `--dataset digits` needs no files."
  )


def download_archive(url: str, dest: Path, md5: str, *, missing_hint: str = "") -> None:
  """Downloads ``url`` to ``dest`` with a progress bar and checks its MD5; atomic on success.

  The bytes go to an anonymous temporary file first: ``dest`` and its folder are created only
  once the download is complete and its checksum matches, so a failure leaves nothing behind.

  Raises:
    DataError: the download failed (e.g. offline; the message then ends with ``missing_hint``),
      the checksum does not match, or ``dest`` cannot be written.
  """
  digest = hashlib.md5()
  with tempfile.TemporaryFile(dir=dest.parent if dest.parent.is_dir() else None) as tmp:
    try:
      with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
          while chunk := response.read(1 << 20):
            tmp.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
      raise DataError(
          f"could not download {url} ({_one_line(e)}). {missing_hint}".strip()) from None
    if digest.hexdigest() != md5:
      raise DataError(
          f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; try again."
      )
    tmp.seek(0)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # Processes may download at once.
    try:
      dest.parent.mkdir(parents=True, exist_ok=True)
      with open(part, "wb") as out:
        shutil.copyfileobj(tmp, out)
      part.replace(dest)
    except OSError as e:
      with contextlib.suppress(OSError):
        part.unlink(missing_ok=True)
      raise DataError(f"could not save the download as {dest} ({_one_line(e)}); pass a writable "
                      "--data-dir.") from None


def _read_npz(path: Path) -> Split:
  try:
    with np.load(path, allow_pickle=False) as z:  # Never unpickle: object arrays are refused.
      return Split(np.asarray(z["images"]), np.asarray(z["labels"]).astype(np.int32))
  except KeyError:
    raise DataError(f"{path} must hold arrays 'images' (uint8 NHWC) and 'labels'.") from None
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    if isinstance(e, ValueError) and "pickle" in str(e):  # NumPy's advice would be to unpickle.
      raise DataError(f"{path} holds pickled (object) data, which is never loaded; save plain "
                      "arrays: uint8 images and integer labels.") from None
    raise DataError(
        f"{path} is corrupt or not an .npz file ({_one_line(e)}); replace it.") from None


def _read_file(path: Path) -> tuple[str, bytes | None]:
  """``(path as text, its bytes)``, or ``None`` for the bytes when there is no such file."""
  if not path.is_file():
    return str(path), None
  try:
    return str(path), path.read_bytes()
  except OSError as e:
    raise DataError(f"cannot read {path} ({_one_line(e)}).") from None


def _read_tarball(path: Path, src: CifarSource, allow_unverified: bool) -> tuple[Split, Split, str]:
  """Checks the archive's MD5, then reads its batch files as :func:`_read_batches` does."""
  _, raw = _read_file(path)  # Read once: the bytes checked are the bytes decoded.
  official = _check_md5(raw, src.md5, str(path), allow_unverified)
  try:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
      names = set(tar.getnames())

      def read(member: str) -> tuple[str, bytes | None]:
        name = f"{src.folder}/{member}"
        f = tar.extractfile(name) if name in names else None
        return f"{path}:{name}", None if f is None else f.read()

      train, test, members_official = _read_batches(read, src, allow_unverified)
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path} is corrupt ({_one_line(e)}); delete it and retry.") from None
  return train, test, _describe(path, official and members_official)


def _describe(where: Path, official: bool) -> str:
  return str(where) if official else f"{where} (unverified: not the official files)"


def _read_batches(
    read: Callable[[str], tuple[str, bytes | None]], src: CifarSource, allow_unverified: bool
) -> tuple[Split, Split, bool]:
  """Checks each official file's MD5, then decodes the batches.

  Args:
    read: ``member -> (its name in messages, its bytes or None when absent)``.
    src: the dataset's official files.
    allow_unverified: see :func:`load_dataset`.

  Returns:
    ``(train, test, whether every file read was the official one)``.
  """
  official = True

  def check(member: str) -> tuple[str, bytes | None]:
    nonlocal official
    name, raw = read(member)
    if raw is not None:
      official &= _check_md5(raw, src.member_md5[member], name, allow_unverified)
    return name, raw

  def decode(member: str) -> Split:
    name, raw = check(member)
    if raw is None:
      raise DataError(f"{name} is missing; the official {src.folder}/ holds "
                      f"{', '.join(src.member_md5)}.")
    return _unpickle(raw, src, name)

  check(src.meta_member)  # Checked when present, never decoded: the class names are not used.
  train = _concat([decode(m) for m in src.train_members])
  test = _concat([decode(m) for m in src.test_members])
  return train, test, official


def _check_md5(raw: bytes, expected: str, where: str, allow_unverified: bool) -> bool:
  """Whether ``raw`` is the official file; a mismatch raises unless ``allow_unverified``."""
  found = hashlib.md5(raw).hexdigest()
  if found != expected and not allow_unverified:
    raise DataError(
        f"{where} is not the official file: md5 {found}, expected {expected}. Replace it with the "
        "official file, or pass --allow-unverified-data to read this copy (no code in it runs)."
    )
  return found == expected


try:  # NumPy 2 names the array reconstructor numpy._core...; the official files, numpy.core....
  from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # NumPy 1.
  from numpy.core.multiarray import _reconstruct as _np_reconstruct


class _BatchUnpickler(pickle.Unpickler):
  """Decodes an official CIFAR batch file without running code from it.

  The official files (pickled by Python 2's cPickle) hold dicts, lists, byte strings and ints,
  which pickle's opcodes build directly, and NumPy arrays, which name three globals:
  ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``.
  :meth:`find_class` maps those names (and NumPy 2's ``numpy._core`` spelling) to the objects
  themselves, importing nothing, and refuses every other global before anything is called.
  """

  _GLOBALS: ClassVar[dict[tuple[str, str], Any]] = {
      ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
  }

  def __init__(self, raw: bytes, where: str):
    super().__init__(io.BytesIO(raw), encoding="bytes")  # Python 2 str -> bytes.
    self._where = where

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._GLOBALS[module, name]
    except KeyError:
      raise DataError(
          f"{self._where} is not a CIFAR batch: it names the global "
          f"{_one_line(repr(f'{module}.{name}'))}, which was refused (nothing in the file was "
          "run); replace it with the official file."
      ) from None


def _unpickle(raw: bytes, src: CifarSource, where: str) -> Split:
  """Decodes one official batch: ``b'data'`` (N, 3072) CHW-flattened uint8 plus labels."""
  try:
    d = _BatchUnpickler(raw, where).load()
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[src.label_key], dtype=np.int32)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError,
          AttributeError, MemoryError, OverflowError) as e:
    raise DataError(f"{where} is corrupt or not a CIFAR batch ({_one_line(repr(e))}); "
                    "replace it.") from None
  return Split(images, labels)


def _one_line(text: object, limit: int = 200) -> str:
  """``str(text)`` on one line, cut at ``limit`` characters (it may quote a file's contents)."""
  line = " ".join(str(text).split())
  return line if len(line) <= limit else line[: limit - 3] + "..."


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
