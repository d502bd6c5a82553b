"""Image sources: every fixture is written in the exact on-disk format of the real dataset, at a tiny size."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from collafuse.data.celeba import read_celeba
from collafuse.data.cifar10 import read_cifar10
from collafuse.data.common import DataError, ImageSet, holdout, load_image
from collafuse.data.idx import IDX_FILES, read_idx_folder
from collafuse.data.image_folder import read_image_folder
from collafuse.data.sklearn_digits import sklearn_digits
from collafuse.data.sources import load_source
from conftest import write_idx

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()


def _banded(width: int, height: int) -> Image.Image:
    """Green image whose outer bands along the longer side are red (first) and blue (last): a center crop to a
    square removes exactly those bands."""
    a = np.zeros((height, width, 3), dtype=np.uint8)
    a[:, :] = (0, 255, 0)
    band = abs(width - height) // 2
    if height > width:
        a[:band], a[height - band:] = (255, 0, 0), (0, 0, 255)
    else:
        a[:, :band], a[:, width - band:] = (255, 0, 0), (0, 0, 255)
    return Image.fromarray(a)


# ------------------------------------------------------------------------------------------------ load_image


@pytest.mark.parametrize("width,height", [(20, 30), (64, 48), (8, 8)])
def test_load_image_center_crops_resizes_and_converts(tmp_path, width, height):
    path = tmp_path / "x.png"
    _banded(width, height).save(path)
    rgb = load_image(path, 8, 3)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert (rgb == (0, 255, 0)).all()  # the red and blue bands were cropped away, nothing bled in
    gray = load_image(path, 8, 1)
    green_luma = np.asarray(Image.new("RGB", (1, 1), (0, 255, 0)).convert("L"))[0, 0]  # ITU-R 601-2
    assert gray.shape == (8, 8, 1) and (gray == green_luma).all()


def test_grayscale_files_become_rgb_and_16_bit_is_scaled(tmp_path):
    Image.fromarray(np.full((10, 10), 77, dtype=np.uint8)).save(tmp_path / "g.png")
    assert (load_image(tmp_path / "g.png", 4, 3) == 77).all()
    Image.fromarray(np.full((10, 10), 257 * 200, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert (load_image(tmp_path / "g16.png", 4, 1) == 200).all()  # not clipped to 255


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="bad.png"):
        load_image(tmp_path / "bad.png", 8, 3)
    with pytest.raises(DataError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg", 8, 3)
    with pytest.raises(DataError, match="data.channels = 2 is invalid"):
        load_image(tmp_path / "bad.png", 8, 2)


# ---------------------------------------------------------------------------------------------- image folders


def _class_folder(root, corrupt: bool = True):
    """root/cat: 3 images (20x30, 64x48, 33x33), root/dog: 2 images + a nested one; one garbage .png in dog."""
    rng = np.random.default_rng(0)
    sizes = {"cat": [(20, 30), (64, 48), (33, 33)], "dog": [(30, 20), (48, 64)]}
    for cls, dims in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(dims):
            ext = ".JPG" if i == 1 else ".png"  # upper-case extensions count too
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}{ext}")
    (root / "dog" / "puppies").mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "dog" / "puppies" / "p.jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "._0.png").write_bytes(b"macOS resource fork")  # hidden litter: ignored, not "corrupt"
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(os.urandom(64))


def test_image_folder_classes_mixed_sizes_and_a_corrupt_file(tmp_path):
    _class_folder(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 of 7 unreadable .*dog/broken.png") as record:
        s = read_image_folder(tmp_path, 16, 3, max_bad_fraction=0.2)
    assert len([w for w in record if "skipped" in str(w.message)]) == 1
    assert s.images.shape == (6, 16, 16, 3) and s.images.dtype == np.uint8
    assert s.class_names == ["cat", "dog"]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1] and s.labels.dtype == np.int64
    assert s.skipped == 1
    assert [os.path.relpath(p, tmp_path) for p in s.paths] == [
        "cat/0.png", "cat/1.JPG", "cat/2.png", "dog/0.png", "dog/1.JPG", "dog/puppies/p.jpeg"]
    with pytest.warns(UserWarning, match="skipped 1 of 7"):
        gray = read_image_folder(tmp_path, 16, 1, max_bad_fraction=0.2)
        again = read_image_folder(tmp_path, 16, 3, max_bad_fraction=0.2)
    assert gray.images.shape == (6, 16, 16, 1)
    assert np.array_equal(again.images, s.images)  # deterministic


def test_too_many_corrupt_files_stop_with_the_threshold_key(tmp_path):
    _class_folder(tmp_path)
    with pytest.raises(DataError, match=r"1 of 7 image files .* data.max_bad_fraction = 0.05") as e:
        read_image_folder(tmp_path, 16, 3)
    assert "\n" not in str(e.value)


def test_folder_with_images_at_the_top_is_unlabelled(tmp_path):
    _class_folder(tmp_path, corrupt=False)
    Image.new("RGB", (9, 9)).save(tmp_path / "loose.png")
    s = read_image_folder(tmp_path, 8, 3)
    assert s.class_names == ["all"] and s.labels.tolist() == [0] * 7 and s.skipped == 0


@pytest.mark.parametrize("make", ["missing", "empty", "no_images"])
def test_empty_or_missing_folder_shows_the_layout(tmp_path, make):
    root = tmp_path / "data"
    if make != "missing":
        root.mkdir()
    if make == "no_images":
        (root / "a").mkdir()
        (root / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"root/<class>/\*\*/\*\.png\|jpg\|jpeg"):
        read_image_folder(root, 8, 3)


# ------------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_official_split_resized(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (12, 28, 28)), "train_y": np.arange(12) % 4,
              "test_x": rng.integers(0, 256, (5, 28, 28)), "test_y": np.arange(5) % 4}
    for key, name in IDX_FILES.items():
        write_idx(tmp_path / f"{name}.gz", arrays[key])
        if not gz:  # the plain (gunzipped) files are read just the same
            import gzip
            (tmp_path / name).write_bytes(gzip.decompress((tmp_path / f"{name}.gz").read_bytes()))
            (tmp_path / f"{name}.gz").unlink()
    native = read_idx_folder(tmp_path, 28, 1)
    assert native.train.images.shape == (12, 28, 28, 1) and native.test.images.shape == (5, 28, 28, 1)
    assert np.array_equal(native.train.images[..., 0], arrays["train_x"])  # untouched at the native size
    assert native.train.labels.tolist() == arrays["train_y"].tolist()
    assert native.train.class_names == ["0", "1", "2", "3"]
    small = read_idx_folder(tmp_path, 14, 3)
    assert small.train.images.shape == (12, 14, 14, 3)
    assert np.array_equal(small.train.images[..., 0], small.train.images[..., 2])  # gray replicated


def test_idx_folder_missing_files_lists_the_four_names(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as e:
        read_idx_folder(tmp_path, 28, 1)
    assert all(name in str(e.value) for name in IDX_FILES.values())


# -------------------------------------------------------------------------------------------------- CIFAR-10


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> the official rows of 3072: R plane, G plane, B plane."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


class _Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle did for the official files: bytes as (SHORT_)BINSTRING opcodes and
    numpy 1.x's module name ``numpy.core.multiarray`` (see ``_dump``)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj, path, protocol: int | str) -> None:
    if protocol == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)


def _write_cifar(root, protocol: int | str = "py2", per_batch: int = 2) -> dict:
    """The official python-version layout: dicts with bytes keys, rows of 3072 uint8, label lists."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    truth = {"train_x": [], "train_y": [], "test_x": None, "test_y": None}
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(files):
        n = 3 if name == "test_batch" else per_batch
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": f"batch {k}".encode(), b"labels": y, b"data": _cifar_rows(x),
                 b"filenames": [f"img{k}_{i}.png".encode() for i in range(n)]}
        _dump(batch, root / name, protocol)
        if name == "test_batch":
            truth["test_x"], truth["test_y"] = x, y
        else:
            truth["train_x"].append(x)
            truth["train_y"] += y
    _dump({b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, root / "batches.meta", protocol)
    truth["train_x"] = np.concatenate(truth["train_x"])
    return truth


@pytest.mark.parametrize("protocol", ["py2", 2, 5])  # the official files; re-pickled from Python 3
def test_cifar10_reads_the_python_version(tmp_path, protocol):
    truth = _write_cifar(tmp_path, protocol)
    if protocol == "py2":
        raw = (tmp_path / "data_batch_1").read_bytes()
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    s = read_cifar10(tmp_path, 32, 3)
    assert np.array_equal(s.train.images, truth["train_x"]) and np.array_equal(s.test.images, truth["test_x"])
    assert s.train.labels.tolist() == truth["train_y"] and s.test.labels.tolist() == truth["test_y"]
    assert s.train.class_names[:2] == ["airplane", "automobile"] and len(s.train.class_names) == 10
    small = read_cifar10(tmp_path, 16, 1)
    assert small.train.images.shape == (10, 16, 16, 1) and small.test.images.shape == (3, 16, 16, 1)


def test_cifar10_accepts_the_unpacked_subfolder_and_shows_the_layout_when_missing(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert len(read_cifar10(tmp_path, 32, 3).train.labels) == 10
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"lacks data_batch_1.*root/data_batch_1 \.\. data_batch_5"):
        read_cifar10(tmp_path, 32, 3)


class _Exploit:
    """A pickle payload: unpickling it with plain pickle.load would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Exploit(f"touch {marker}"), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match=r"refused to load .*data_batch_3.*system' is not allowed"):
        read_cifar10(tmp_path, 32, 3)
    assert not marker.exists()
    with open(tmp_path / "data_batch_3", "rb") as f:  # the payload is live: a plain pickle.load runs it
        pickle.load(f)
    assert marker.exists()
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02garbage")  # truncated / garbage pickle: also a DataError
    with pytest.raises(DataError, match="data_batch_3"):
        read_cifar10(tmp_path, 32, 3)


# ---------------------------------------------------------------------------------------------------- CelebA


def _write_celeba(root, partition=(0, 0, 0, 1, 2, 2), drop_image: str | None = None):
    """Official layout: img_align_celeba/NNNNNN.jpg (tiny 18x22 stand-ins for 178x218), the attribute list with
    its count and 40 names, and the partition list."""
    rng = np.random.default_rng(2)
    (root / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, len(partition) + 1)]
    attrs = rng.choice([-1, 1], size=(len(names), 40))
    for name in names:
        if name != drop_image:
            Image.fromarray(rng.integers(0, 256, (22, 18, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
    lines = [str(len(names)), " ".join(CELEBA_ATTRIBUTES) + " "]  # the official line 2 ends with a space
    lines += [f"{n} " + " ".join(f"{v:2d}" for v in row) for n, row in zip(names, attrs)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partition)))
    return names, attrs


def test_celeba_official_partition_and_attributes(tmp_path):
    names, attrs = _write_celeba(tmp_path)
    s = read_celeba(tmp_path, 8, 3)
    assert s.train.images.shape == (3, 8, 8, 3) and s.test.images.shape == (2, 8, 8, 3)  # validation (1) left out
    assert [os.path.basename(p) for p in s.test.paths] == names[4:]
    assert s.train.attribute_names == CELEBA_ATTRIBUTES
    assert s.train.attributes.dtype == bool and np.array_equal(s.train.attributes, attrs[:3] == 1)
    assert s.train.class_names == ["all"] and s.train.labels.tolist() == [0, 0, 0]
    limited = read_celeba(tmp_path, 8, 1, limit=2)
    assert limited.train.images.shape == (2, 8, 8, 1) and len(limited.test.labels) == 2


def test_celeba_missing_image_is_skipped_and_missing_lists_show_the_layout(tmp_path):
    _write_celeba(tmp_path / "a", drop_image="000002.jpg")
    with pytest.warns(UserWarning, match="skipped 1 of 3 .*000002.jpg"):
        s = read_celeba(tmp_path / "a", 8, 3, max_bad_fraction=0.5)
    assert s.train.skipped == 1 and len(s.train.labels) == 2 and s.train.attributes.shape == (2, 40)
    with pytest.raises(DataError, match="data.max_bad_fraction"):
        read_celeba(tmp_path / "a", 8, 3)
    _write_celeba(tmp_path / "b")
    (tmp_path / "b" / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match=r"lacks list_eval_partition.txt .*root/img_align_celeba/\*\.jpg"):
        read_celeba(tmp_path / "b", 8, 3)


def test_celeba_malformed_attribute_line_is_named(tmp_path):
    _write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0]  # one value short
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"list_attr_celeba.txt:4: expected a file name and 40 values"):
        read_celeba(tmp_path, 8, 3)


# ---------------------------------------------------------------------------------------- holdout, load_source


def test_holdout_is_deterministic_stratified_and_disjoint():
    labels = np.repeat([0, 1, 2], [10, 5, 1])
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(2, axis=1).repeat(2, axis=2)
    s = ImageSet(images, labels, ["a", "b", "c"], paths=[f"f{i}" for i in range(len(labels))], skipped=2)
    a, b, c = holdout(s, 0.2, 0), holdout(s, 0.2, 0), holdout(s, 0.2, 1)
    assert np.array_equal(a.test.images, b.test.images) and a.test.paths == b.test.paths
    assert not np.array_equal(a.test.images, c.test.images)
    assert np.bincount(a.test.labels, minlength=3).tolist() == [2, 1, 0]  # 20% of each class; a lone image trains
    train_ids, test_ids = a.train.images[:, 0, 0, 0].tolist(), a.test.images[:, 0, 0, 0].tolist()
    assert sorted(train_ids + test_ids) == list(range(16)) and train_ids == sorted(train_ids)
    assert a.test.paths == [f"f{i}" for i in test_ids]
    assert (a.train.skipped, a.test.skipped) == (2, 0)
    with pytest.raises(DataError, match=r"data.test_fraction = 1.0 is invalid \(allowed: a number in \[0, 1\)\)"):
        holdout(s, 1.0, 0)


def test_load_source_unknown_kind_is_one_line():
    with pytest.raises(DataError, match=r"^data.dataset = 'svhn' is invalid \(allowed: 'idx', 'image-folder', "):
        load_source("svhn", "/nowhere", 32, 3)


def test_load_source_image_folder_holds_out_per_class(tmp_path):
    _class_folder(tmp_path, corrupt=False)
    s = load_source("image-folder", tmp_path, 8, 3, test_fraction=0.34, seed=3)
    assert len(s.train.labels) + len(s.test.labels) == 6
    assert sorted(set(s.test.labels.tolist())) == [0, 1] and sorted(set(s.train.labels.tolist())) == [0, 1]


def test_bundled_sklearn_digits():
    pytest.importorskip("sklearn")
    s = sklearn_digits(16, 1)
    assert s.train.images.shape[1:] == (16, 16, 1) and s.train.images.dtype == np.uint8
    assert len(s.train.labels) + len(s.test.labels) == 1797 and s.train.class_names == [str(d) for d in range(10)]
    assert s.train.images.max() == 255  # 0..16 was scaled to 0..255
    assert set(s.test.labels.tolist()) == set(range(10))


def test_bundled_lfw_subset():
    pytest.importorskip("skimage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # offline: no download attempt, no warning about one
        s = load_source("lfw-subset", "", 32, 3, test_fraction=0.25)
    assert s.train.images.shape == (150, 32, 32, 3) and s.test.images.shape == (50, 32, 32, 3)
    assert s.train.class_names == ["face", "non-face"] and np.bincount(s.test.labels).tolist() == [25, 25]
