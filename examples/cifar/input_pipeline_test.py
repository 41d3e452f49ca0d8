"""Tests for the input pipeline: every data format, the errors, subsets, batching, augmentation."""

import hashlib
import io
import os
import pickle
import pickletools
import shlex
import struct
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.cifar import input_pipeline as ip

# ----------------------------------------------------------------------------------------------
# Tiny fake CIFAR archives in the official pickle format (never downloaded).
#
# The official files are not on this machine (no network); the fakes are written the way Python 2's
# cPickle wrote them: protocol 2, every str a byte string, arrays through numpy.core.multiarray.

N_PER_BATCH = 6


class _Py2Pickler(pickle._Pickler):
  """Pickles as Python 2's cPickle did: protocol 2, str and bytes as (byte) BINSTRINGs."""

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_py2_str(self, obj: str | bytes) -> None:
    raw = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(raw) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
    self.memoize(obj)

  dispatch[str] = dispatch[bytes] = _save_py2_str


def _py2_pickle(obj: object) -> bytes:
  out = io.BytesIO()
  _Py2Pickler(out, protocol=2).dump(obj)
  # NumPy 1, which wrote the official files, named the reconstructor numpy.core.multiarray.
  return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _fake_batch(seed: int, n: int, name: str) -> dict[bytes, object]:
  src = ip.CIFAR_SOURCES[name]
  rng = np.random.default_rng(seed)
  labels = [int(x) for x in rng.integers(0, src.num_classes, n)]
  batch = {b"batch_label": f"batch {seed}".encode(), src.label_key: labels,
           b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
           b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}
  if name == "cifar100":
    batch[b"coarse_labels"] = [x // 5 for x in labels]
  return batch


def _fake_members(name: str) -> dict[str, dict[bytes, object]]:
  """The official files' contents: every batch, and the meta file last."""
  src = ip.CIFAR_SOURCES[name]
  members = src.train_members + src.test_members
  files = {m: _fake_batch(i, N_PER_BATCH, name) for i, m in enumerate(members)}
  names_key = b"label_names" if name == "cifar10" else b"fine_label_names"
  files[src.meta_member] = {names_key: [f"class{i}".encode() for i in range(src.num_classes)]}
  return files


def _fake_files(name: str) -> dict[str, bytes]:
  return {m: _py2_pickle(batch) for m, batch in _fake_members(name).items()}


def _write_folder(root: Path, name: str, replace: dict[str, bytes] | None = None) -> Path:
  folder = root / ip.CIFAR_SOURCES[name].folder
  folder.mkdir(parents=True)
  for member, raw in (_fake_files(name) | (replace or {})).items():
    (folder / member).write_bytes(raw)
  return folder


def _write_tarball(root: Path, name: str, replace: dict[str, bytes] | None = None) -> Path:
  src = ip.CIFAR_SOURCES[name]
  root.mkdir(parents=True, exist_ok=True)
  path = root / src.archive
  with tarfile.open(path, "w:gz") as tar:
    for member, raw in (_fake_files(name) | (replace or {})).items():
      info = tarfile.TarInfo(f"{src.folder}/{member}")
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))
  return path


def _md5(raw: bytes) -> str:
  return hashlib.md5(raw).hexdigest()


def _make_official(monkeypatch, name: str, archive: Path | None = None) -> None:
  """Makes the fakes (and ``archive``) the official files: the pipeline expects their MD5s."""
  src = ip.CIFAR_SOURCES[name]
  member_md5 = {m: _md5(raw) for m, raw in _fake_files(name).items()}
  assert member_md5.keys() == src.member_md5.keys()
  md5 = src.md5 if archive is None else _md5(archive.read_bytes())
  monkeypatch.setitem(ip.CIFAR_SOURCES, name,
                      ip.dataclasses.replace(src, md5=md5, member_md5=member_md5))


def _expected(name: str) -> tuple[np.ndarray, np.ndarray]:
  """Train images/labels the fake archive must decode to (CHW-flattened -> HWC)."""
  src = ip.CIFAR_SOURCES[name]
  batches = _fake_members(name)
  data = np.concatenate([batches[m][b"data"] for m in src.train_members])
  labels = np.concatenate([batches[m][src.label_key] for m in src.train_members])
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _write_layout(tmp_path: Path, name: str, layout: str,
                  replace: dict[str, bytes] | None = None) -> Path:
  """Writes the fake files in ``layout``; returns what to pass as ``--data-dir``."""
  if layout == "folder":  # The extracted folder inside the data folder.
    _write_folder(tmp_path, name, replace)
    return tmp_path
  if layout == "folder_itself":  # The extracted folder given as the data folder.
    return _write_folder(tmp_path, name, replace)
  if layout == "tarball":  # The archive inside the data folder.
    _write_tarball(tmp_path, name, replace)
    return tmp_path
  assert layout == "tarball_path"  # The archive given as the data folder.
  return _write_tarball(tmp_path, name, replace)


OFFICIAL_LAYOUTS = ["folder", "folder_itself", "tarball", "tarball_path"]


def test_the_fakes_are_pickled_like_the_official_files() -> None:
  raw = _fake_files("cifar10")["data_batch_1"]
  ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
  assert ops[0] == ("PROTO", 2)
  assert {arg for op, arg in ops if op == "GLOBAL"} == {
      "numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
  assert {op for op, _ in ops} & {"BINUNICODE", "BINBYTES", "SHORT_BINBYTES"} == set()
  assert ("SHORT_BINSTRING", "data") in ops  # A Python 2 str: decoded as bytes, b"data".


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", [*OFFICIAL_LAYOUTS, "npz"])
def test_every_format_decodes_the_same(tmp_path: Path, monkeypatch, name: str,
                                       layout: str) -> None:
  if layout == "npz":
    images, labels = _expected(name)
    np.savez(tmp_path / "train.npz", images=images, labels=labels.astype(np.uint8))
    np.savez(tmp_path / "test.npz", images=images[:3], labels=labels[:3].astype(np.uint8))
    data_dir = tmp_path
  else:
    data_dir = _write_layout(tmp_path, name, layout)
    _make_official(monkeypatch, name, next(tmp_path.glob("*.tar.gz"), None))
  data = ip.load_dataset(name, data_dir, download=False)  # Every MD5 checked and matching.
  assert "unverified" not in data.source
  images, labels = _expected(name)
  np.testing.assert_array_equal(data.train.images, images)
  np.testing.assert_array_equal(data.train.labels, labels)
  assert data.train.labels.dtype == np.int32
  assert data.num_classes == ip.CIFAR_SOURCES[name].num_classes
  # Pixel (row 0, col 1) of image 0 is byte 1 (red), 1025 (green), 2049 (blue) of the flat row.
  flat = _fake_members(name)[ip.CIFAR_SOURCES[name].train_members[0]][b"data"][0]
  np.testing.assert_array_equal(data.train.images[0, 0, 1], flat[[1, 1025, 2049]])
  assert np.allclose(data.mean, images.reshape(-1, 3).mean(0) / 255)


def test_missing_data_says_how_to_provide_it_and_creates_nothing(tmp_path: Path,
                                                                 monkeypatch) -> None:
  with pytest.raises(ip.DataError, match=r"--data-dir.*digits") as e:
    ip.load_dataset("cifar10", tmp_path / "nothing", download=False)
  assert "\n" not in str(e.value)
  # Offline (here: a server that is not there), a named data folder is not created either.
  src = ip.CIFAR_SOURCES["cifar10"]
  offline = (tmp_path / "no-such-server" / src.archive).as_uri()
  monkeypatch.setitem(ip.CIFAR_SOURCES, "cifar10", ip.dataclasses.replace(src, url=offline))
  with pytest.raises(ip.DataError, match=r"could not download.*--data-dir") as e:
    ip.load_dataset("cifar10", tmp_path / "nonexistent" / "cifar10")
  assert "\n" not in str(e.value)
  assert not (tmp_path / "nonexistent").exists()
  assert os.listdir(tmp_path) == []


def test_download_checks_md5_and_caches(tmp_path: Path, monkeypatch) -> None:
  served = _write_tarball(tmp_path / "server", "cifar10")
  src = ip.dataclasses.replace(ip.CIFAR_SOURCES["cifar10"], url=served.as_uri(), md5="0" * 32)
  monkeypatch.setitem(ip.CIFAR_SOURCES, "cifar10", src)
  with pytest.raises(ip.DataError, match="checksum mismatch"):
    ip.load_dataset("cifar10", tmp_path / "cache")
  assert not (tmp_path / "cache").exists()  # Nothing is saved before the checksum matches.
  _make_official(monkeypatch, "cifar10", served)
  data = ip.load_dataset("cifar10", tmp_path / "cache")
  assert [p.name for p in (tmp_path / "cache").iterdir()] == [src.archive]
  assert _md5((tmp_path / "cache" / src.archive).read_bytes()) == _md5(served.read_bytes())
  np.testing.assert_array_equal(data.train.images, _expected("cifar10")[0])


def test_default_data_dir(monkeypatch, tmp_path: Path) -> None:
  monkeypatch.delenv("OPTAX_GC_DATA", raising=False)
  assert ip.default_data_dir("cifar10") == Path.home() / ".cache" / "optax_gc" / "cifar10"
  monkeypatch.setenv("OPTAX_GC_DATA", str(tmp_path))
  assert ip.default_data_dir("cifar100") == tmp_path / "cifar100"
  assert ip.default_data_dir("cifar100", "/x") == Path("/x")


def test_the_official_md5s_are_torchvisions() -> None:
  """The values in torchvision's datasets/cifar.py (tgz_md5, train_list, test_list, meta)."""
  c10, c100 = ip.CIFAR_SOURCES["cifar10"], ip.CIFAR_SOURCES["cifar100"]
  assert (c10.md5, c100.md5) == ("c58f30108f718f92721af3b95e74349a",
                                 "eb9058c3a382ffc7106e4002c42a8d85")
  assert c10.member_md5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
  assert c10.member_md5["batches.meta"] == "5ff9c542aee3614f3951f8cda6e48888"
  assert c100.member_md5["meta"] == "7973b15100ade9c7d40fb424638fde48"
  for src in (c10, c100):
    assert set(src.member_md5) == {*src.train_members, *src.test_members, src.meta_member}


@pytest.mark.parametrize("layout", OFFICIAL_LAYOUTS)
def test_a_copy_that_is_not_official_needs_the_flag(tmp_path: Path, layout: str) -> None:
  data_dir = _write_layout(tmp_path, "cifar10", layout)  # The fakes' MD5s are not the official.
  src = ip.CIFAR_SOURCES["cifar10"]
  if layout.startswith("tarball"):
    bad, expected = tmp_path / src.archive, src.md5
  else:
    bad, expected = tmp_path / src.folder / src.meta_member, src.member_md5[src.meta_member]
  with pytest.raises(ip.DataError) as e:
    ip.load_dataset("cifar10", data_dir, download=False)
  message = str(e.value)
  assert message == (f"{bad} is not the official file: md5 {_md5(bad.read_bytes())}, expected "
                     f"{expected}. Replace it with the official file, or pass "
                     "--allow-unverified-data to read this copy (no code in it runs).")
  data = ip.load_dataset("cifar10", data_dir, download=False, allow_unverified=True)
  assert data.source.endswith("(unverified: not the official files)")
  np.testing.assert_array_equal(data.train.images, _expected("cifar10")[0])


@pytest.mark.parametrize("layout", OFFICIAL_LAYOUTS)
def test_a_truncated_official_file_fails_its_md5(tmp_path: Path, monkeypatch,
                                                 layout: str) -> None:
  raw = _fake_files("cifar10")["data_batch_3"]
  truncated = raw[: len(raw) // 2]
  data_dir = _write_layout(tmp_path, "cifar10", layout, {"data_batch_3": truncated})
  _make_official(monkeypatch, "cifar10")  # Official members; the archive holds a truncated one.
  src = ip.CIFAR_SOURCES["cifar10"]
  if layout.startswith("tarball"):
    where = f"{tmp_path / src.archive}:{src.folder}/data_batch_3"
    # The archive as a whole is checked first; past that (a re-packed archive), each member.
    with pytest.raises(ip.DataError, match=f"{src.archive} is not the official file: md5 "):
      ip.load_dataset("cifar10", data_dir, download=False)
    monkeypatch.setitem(ip.CIFAR_SOURCES, "cifar10", ip.dataclasses.replace(
        src, md5=_md5((tmp_path / src.archive).read_bytes())))
  else:
    where = str(tmp_path / src.folder / "data_batch_3")
  with pytest.raises(ip.DataError) as e:
    ip.load_dataset("cifar10", data_dir, download=False)
  assert str(e.value).startswith(
      f"{where} is not the official file: md5 {_md5(truncated)}, expected {_md5(raw)}. ")
  assert "\n" not in str(e.value)
  # Let through by the flag, it is read and found corrupt.
  with pytest.raises(ip.DataError, match=r"data_batch_3 is corrupt or not a CIFAR batch"):
    ip.load_dataset("cifar10", data_dir, download=False, allow_unverified=True)


def _payload(marker: Path, protocol: int) -> bytes:
  """A batch whose unpickling runs ``touch marker`` through os.system."""

  class Payload:
    def __reduce__(self):
      return os.system, (f"touch {shlex.quote(str(marker))}",)

  batch = {b"data": Payload(), b"labels": [0]}
  return _py2_pickle(batch) if protocol == 2 else pickle.dumps(batch, protocol=protocol)


def test_the_payload_is_live(tmp_path: Path) -> None:
  """What the tests below guard against: a plain ``pickle.loads`` runs the command."""
  pickle.loads(_payload(tmp_path / "marker", 2))  # noqa: S301
  assert (tmp_path / "marker").is_file()


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL, STACK_GLOBAL.
@pytest.mark.parametrize("layout", OFFICIAL_LAYOUTS)
def test_a_malicious_batch_file_runs_nothing(tmp_path: Path, layout: str, protocol: int) -> None:
  marker = tmp_path / "marker"
  data_dir = _write_layout(tmp_path / "data", "cifar10", layout,
                           {"data_batch_2": _payload(marker, protocol)})
  src = ip.CIFAR_SOURCES["cifar10"]
  with pytest.raises(ip.DataError, match="is not the official file: md5 "):  # Without the flag.
    ip.load_dataset("cifar10", data_dir, download=False)
  assert not marker.exists()
  with pytest.raises(ip.DataError) as e:  # With it: the same file, through the unpickler.
    ip.load_dataset("cifar10", data_dir, download=False, allow_unverified=True)
  assert not marker.exists()
  if layout.startswith("tarball"):
    where = f"{tmp_path / 'data' / src.archive}:{src.folder}/data_batch_2"
  else:
    where = str(tmp_path / "data" / src.folder / "data_batch_2")
  assert str(e.value) == (
      f"{where} is not a CIFAR batch: it names the global '{os.system.__module__}.system', which "
      "was refused (nothing in the file was run); replace it with the official file.")


def test_the_command_line_refuses_a_malicious_folder(tmp_path: Path, capsys) -> None:
  from examples.cifar import train  # Late: only this test needs the training code.

  marker = tmp_path / "marker"
  folder = _write_folder(tmp_path / "data", "cifar10", {"data_batch_1": _payload(marker, 2)})
  argv = ["--dataset", "cifar10", "--data-dir", str(folder), "--epochs", "1", "--workdir",
          str(tmp_path / "w")]
  assert train.main(argv) == 1
  assert "batches.meta is not the official file: md5 " in capsys.readouterr().err
  assert train.main([*argv, "--allow-unverified-data"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {folder / 'data_batch_1'} is not a CIFAR")
  assert f"'{os.system.__module__}.system', which was refused" in err
  assert not marker.exists()


def test_npz_files_are_never_unpickled(tmp_path: Path) -> None:
  marker = tmp_path / "marker"
  refused = (f"{tmp_path / 'train.npz'} holds pickled (object) data, which is never loaded; save "
             "plain arrays: uint8 images and integer labels.")
  images = np.empty(2, dtype=object)  # An object array is stored as a pickle inside the .npy.
  images[:] = [np.zeros((32, 32, 3), np.uint8)] * 2
  np.savez(tmp_path / "train.npz", images=images, labels=np.zeros(2))
  np.savez(tmp_path / "test.npz", images=np.zeros((1, 32, 32, 3), np.uint8), labels=np.zeros(1))
  with pytest.raises(ip.DataError) as e:
    ip.load_dataset("cifar10", tmp_path, download=False)
  assert str(e.value) == refused
  (tmp_path / "train.npz").write_bytes(_payload(marker, 2))  # A bare pickle named train.npz.
  with pytest.raises(ip.DataError) as e:
    ip.load_dataset("cifar10", tmp_path, download=False)
  assert str(e.value) == refused
  assert not marker.exists()


def test_the_shared_npz_copy_still_loads(shared_cifar10: Path) -> None:
  data = ip.load_dataset("cifar10", shared_cifar10, download=False)
  assert data.source == str(shared_cifar10 / "*.npz")
  assert data.train.images.shape == (50000, 32, 32, 3) and data.train.images.dtype == np.uint8
  assert data.test.images.shape == (10000, 32, 32, 3)
  assert np.bincount(data.test.labels).tolist() == [1000] * 10


def test_corrupt_files_give_clear_errors(tmp_path: Path) -> None:
  tarball = _write_tarball(tmp_path / "truncated", "cifar10")
  tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
  with pytest.raises(ip.DataError, match="truncated/cifar-10-python.tar.gz is corrupt"):
    ip.load_dataset("cifar10", tarball.parent, download=False, allow_unverified=True)

  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
  with pytest.raises(ip.DataError, match="junk/cifar-10-python.tar.gz is corrupt"):
    ip.load_dataset("cifar10", tmp_path / "junk", download=False, allow_unverified=True)

  folder = _write_folder(tmp_path / "badpickle", "cifar10", {"data_batch_3": b"\x80\x04garbage"})
  with pytest.raises(ip.DataError, match="data_batch_3 is corrupt"):
    ip.load_dataset("cifar10", folder, download=False, allow_unverified=True)

  (folder / "data_batch_3").write_bytes(_fake_files("cifar10")["data_batch_3"])
  (folder / "data_batch_4").unlink()
  with pytest.raises(ip.DataError, match="data_batch_4 is missing; the official "
                                         "cifar-10-batches-py/ holds data_batch_1, "):
    ip.load_dataset("cifar10", folder, download=False, allow_unverified=True)

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
