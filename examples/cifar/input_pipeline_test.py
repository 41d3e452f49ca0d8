"""Tests for the input pipeline: every data format, the errors, subsets, batching, augmentation."""

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.cifar import input_pipeline as ip

# ----------------------------------------------------------------------------------------------
# Tiny fake CIFAR archives in the official pickle format (never downloaded).

N_PER_BATCH = 6


def _fake_batch(seed: int, n: int, num_classes: int, label_key: bytes) -> dict[bytes, object]:
  rng = np.random.default_rng(seed)
  return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
          label_key: [int(x) for x in rng.integers(0, num_classes, n)]}


def _fake_members(name: str) -> dict[str, dict[bytes, object]]:
  src = ip.CIFAR_SOURCES[name]
  members = src.train_members + src.test_members
  return {m: _fake_batch(i, N_PER_BATCH, src.num_classes, src.label_key)
          for i, m in enumerate(members)}


def _write_folder(root: Path, name: str) -> Path:
  folder = root / ip.CIFAR_SOURCES[name].folder
  folder.mkdir(parents=True)
  for member, batch in _fake_members(name).items():
    (folder / member).write_bytes(pickle.dumps(batch))
  return folder


def _write_tarball(root: Path, name: str) -> Path:
  src = ip.CIFAR_SOURCES[name]
  root.mkdir(parents=True, exist_ok=True)
  path = root / src.archive
  with tarfile.open(path, "w:gz") as tar:
    for member, batch in _fake_members(name).items():
      raw = pickle.dumps(batch)
      info = tarfile.TarInfo(f"{src.folder}/{member}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return path


def _expected(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Train images/labels the fake archive must decode to (CHW-flattened -> HWC)."""
  src = ip.CIFAR_SOURCES[name]
  batches = _fake_members(name)
  data = np.concatenate([batches[m][b"data"] for m in src.train_members])
  labels = np.concatenate([batches[m][src.label_key] for m in src.train_members])
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["folder", "folder_itself", "tarball", "tarball_path", "npz"])
def test_every_format_decodes_the_same(tmp_path: Path, name: str, layout: str) -> None:
  if layout == "folder":
    _write_folder(tmp_path, name)
    data_dir = tmp_path
  elif layout == "folder_itself":
    data_dir = _write_folder(tmp_path, name)
  elif layout == "tarball":
    _write_tarball(tmp_path, name)
    data_dir = tmp_path
  elif layout == "tarball_path":
    data_dir = _write_tarball(tmp_path, name)
  else:
    images, labels = _expected(name)
    np.savez(tmp_path / "train.npz", images=images, labels=labels.astype(np.uint8))
    np.savez(tmp_path / "test.npz", images=images[:3], labels=labels[:3].astype(np.uint8))
    data_dir = tmp_path
  data = ip.load_dataset(name, data_dir, download=False)
  images, labels = _expected(name)
  np.testing.assert_array_equal(data.train.images, images)
  np.testing.assert_array_equal(data.train.labels, labels)
  assert data.train.labels.dtype == np.int32
  assert data.num_classes == ip.CIFAR_SOURCES[name].num_classes
  # Pixel (row 0, col 1) of image 0 is byte 1 (red), 1025 (green), 2049 (blue) of the flat row.
  flat = _fake_members(name)[ip.CIFAR_SOURCES[name].train_members[0]][b"data"][0]
  np.testing.assert_array_equal(data.train.images[0, 0, 1], flat[[1, 1025, 2049]])
  assert np.allclose(data.mean, images.reshape(-1, 3).mean(0) / 255)


def test_missing_data_says_how_to_provide_it(tmp_path: Path) -> None:
  with pytest.raises(ip.DataError, match=r"--data-dir.*digits") as e:
    ip.load_dataset("cifar10", tmp_path / "nothing", download=False)
  assert "\n" not in str(e.value)


def test_offline_download_failure_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
  src = ip.CIFAR_SOURCES["cifar10"]
  offline = (tmp_path / "no-such-server" / src.archive).as_uri()
  monkeypatch.setitem(ip.CIFAR_SOURCES, "cifar10", ip.dataclasses.replace(src, url=offline))
  with pytest.raises(ip.DataError, match=r"could not download.*--data-dir") as e:
    ip.load_dataset("cifar10", tmp_path / "cache")
  assert "\n" not in str(e.value)
  assert not list((tmp_path / "cache").glob("*.part"))


def test_download_checks_md5_and_caches(tmp_path: Path, monkeypatch) -> None:
  served = _write_tarball(tmp_path / "server", "cifar10")
  md5 = hashlib.md5(served.read_bytes()).hexdigest()
  src = ip.dataclasses.replace(ip.CIFAR_SOURCES["cifar10"], url=served.as_uri(), md5="0" * 32)
  monkeypatch.setitem(ip.CIFAR_SOURCES, "cifar10", src)
  with pytest.raises(ip.DataError, match="checksum mismatch"):
    ip.load_dataset("cifar10", tmp_path / "cache")
  assert not (tmp_path / "cache" / src.archive).exists()
  monkeypatch.setitem(ip.CIFAR_SOURCES, "cifar10", ip.dataclasses.replace(src, md5=md5))
  data = ip.load_dataset("cifar10", tmp_path / "cache")
  assert (tmp_path / "cache" / src.archive).is_file()
  np.testing.assert_array_equal(data.train.images, _expected("cifar10")[0])


def test_default_data_dir(monkeypatch, tmp_path: Path) -> None:
  monkeypatch.delenv("OPTAX_GC_DATA", raising=False)
  assert ip.default_data_dir("cifar10") == Path.home() / ".cache" / "optax_gc" / "cifar10"
  monkeypatch.setenv("OPTAX_GC_DATA", str(tmp_path))
  assert ip.default_data_dir("cifar100") == tmp_path / "cifar100"
  assert ip.default_data_dir("cifar100", "/x") == Path("/x")


def test_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
  tarball = _write_tarball(tmp_path / "truncated", "cifar10")
  tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
  with pytest.raises(ip.DataError, match="corrupt"):
    ip.load_dataset("cifar10", tarball.parent, download=False)

  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
  with pytest.raises(ip.DataError, match="corrupt"):
    ip.load_dataset("cifar10", tmp_path / "junk", download=False)

  folder = _write_folder(tmp_path / "badpickle", "cifar10")
  (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
  with pytest.raises(ip.DataError, match="data_batch_3 is corrupt"):
    ip.load_dataset("cifar10", folder, download=False)

  (tmp_path / "npz").mkdir()
  (tmp_path / "npz" / "train.npz").write_bytes(b"PK\x03\x04 broken zip")
  np.savez(tmp_path / "npz" / "test.npz", images=np.zeros((1, 32, 32, 3), np.uint8),
           labels=np.zeros(1))
  with pytest.raises(ip.DataError, match="train.npz is corrupt"):
    ip.load_dataset("cifar10", tmp_path / "npz", download=False)

  np.savez(tmp_path / "npz" / "train.npz", x=np.zeros(3))
  with pytest.raises(ip.DataError, match="must hold arrays 'images'"):
    ip.load_dataset("cifar10", tmp_path / "npz", download=False)

  np.savez(tmp_path / "npz" / "train.npz", images=np.zeros((2, 32, 32, 3), np.float32),
           labels=np.zeros(2))
  with pytest.raises(ip.DataError, match="uint8"):
    ip.load_dataset("cifar10", tmp_path / "npz", download=False)


def test_digits_are_32x32_rgb_and_stratified() -> None:
  data = ip.load_dataset("digits")
  assert data.train.images.shape == (1437, 32, 32, 3)
  assert data.test.images.shape == (360, 32, 32, 3)
  assert data.train.images.dtype == np.uint8 and data.train.images.max() == 255
  assert np.all(data.train.images[:, :4] == 0)  # The 4-pixel border the random crop shifts into.
  assert set(np.bincount(data.test.labels)) <= {35, 36, 37}


def test_stratified_subset_on_class_sorted_rows() -> None:
  labels = np.repeat(np.arange(10), 50).astype(np.int32)  # Sorted by class, like the npz.
  split = ip.Split(np.arange(500, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3),
                                                                                np.uint8), labels)
  sub = ip.stratified_subset(split, 103)
  assert len(sub) == 103
  assert sorted(np.bincount(sub.labels)) == [10] * 7 + [11] * 3
  np.testing.assert_array_equal(sub.images, ip.stratified_subset(split, 103).images)
  with pytest.raises(ValueError):
    ip.stratified_subset(split, 501)


def test_train_batches_cover_each_example_once_and_depend_on_seed_and_epoch() -> None:
  idx, mask = ip.train_batches(10, 4, seed=0, epoch=1)
  assert idx.shape == mask.shape == (3, 4)
  assert sorted(idx.ravel()[mask.ravel() == 1]) == list(range(10))
  assert mask.ravel().tolist() == [1] * 10 + [0] * 2
  np.testing.assert_array_equal(idx, ip.train_batches(10, 4, seed=0, epoch=1)[0])
  assert not np.array_equal(idx, ip.train_batches(10, 4, seed=0, epoch=2)[0])
  assert not np.array_equal(idx, ip.train_batches(10, 4, seed=1, epoch=1)[0])
  idx, mask = ip.eval_batches(5, 4)
  assert idx.ravel()[:5].tolist() == list(range(5)) and mask.sum() == 5


def test_augment_crops_within_padding_and_flips() -> None:
  images = jnp.asarray(np.random.default_rng(0).integers(1, 256, (16, 8, 8, 3), dtype=np.uint8))
  out = np.asarray(ip.augment(images, jax.random.key(0), flip=False, pad=2))
  assert out.shape == images.shape and out.dtype == np.uint8
  for x, y in zip(np.asarray(images), out, strict=True):
    padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
    windows = [padded[i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    assert any(np.array_equal(y, w) for w in windows)
  flipped = np.asarray(ip.augment(images, jax.random.key(1), pad=0))
  same = [np.array_equal(a, b) for a, b in zip(flipped, np.asarray(images), strict=True)]
  mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(flipped, np.asarray(images),
                                                            strict=True)]
  assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(mirrored) and any(same)
  np.testing.assert_array_equal(out, ip.augment(images, jax.random.key(0), flip=False, pad=2))


def test_normalize() -> None:
  mean_std = jnp.asarray([[0.5, 0.5, 0.5], [0.25, 0.5, 1.0]])
  out = ip.normalize(jnp.full((1, 1, 1, 3), 255, jnp.uint8), mean_std)
  np.testing.assert_allclose(out.ravel(), [2.0, 1.0, 0.5])
