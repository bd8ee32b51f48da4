"""FID/KID (t2i/eval/fid.py, features.py, image_source.py; pipelines/fid.py): agreement with clean-fid and with independent formulas, offline, on CPU.

No real Inception weights here: the `inception:PATH` plumbing is proven with a tiny scripted stand-in
saved as TorchScript (it refuses anything but 299×299 input, like clean-fid's wrapper).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO, sample_members, write_tar
from t2i.eval import fid as fidlib
from t2i.eval.features import RandomConvExtractor, build_extractor, compute_features
from t2i.eval.image_source import ImageSource
from t2i.data.shapes import iter_samples
from t2i.data.writers import write_shapes_shards
from t2i import cli
from t2i.errors import EvalError

N = 40
CLEANFID_INCEPTION = "/tmp/inception-2015-12-05.pt"  # clean-fid's hard-coded download target: must stay untouched


def write_pngs(folder, n, seed, nested):
    """Shapes PNGs; nested = GenEval layout <dir>/<00000>/samples/<0000>.png."""
    for i, (_, image, _, _) in enumerate(iter_samples(n, seed, 64)):
        path = folder / f"{i // 4:05d}" / "samples" / f"{i % 4:04d}.png" if nested else folder / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    a = write_pngs(root / "a", N, seed=0, nested=True)
    b = write_pngs(root / "b", N, seed=1, nested=False)
    write_shapes_shards(root / "shards_a", N, samples_per_shard=16, seed=0, size=64, progress=False)
    ex = RandomConvExtractor()
    feats = {k: compute_features(ImageSource(folder=str(d)), ex, batch_size=16, progress=False)
             for k, d in (("a", a), ("b", b))}
    return {"root": root, "a": a, "b": b, "shards_a": root / "shards_a", "ex": ex, **{f"f{k}": v for k, v in feats.items()}}


@pytest.fixture(autouse=True, scope="module")
def no_download_target_written():
    before = os.path.exists(CLEANFID_INCEPTION)
    yield
    assert os.path.exists(CLEANFID_INCEPTION) == before, "something touched clean-fid's /tmp Inception path"


def quiet_fid(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fidlib.SmallSampleWarning)
        return fidlib.fid(a, b)


def _sqrtm_accepts_disp() -> bool:
    from scipy import linalg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            linalg.sqrtm(np.eye(2), disp=False)
        return True
    except TypeError:
        return False


def eig_fid(f1, f2):
    """Independent Fréchet distance: Tr((Σ₁Σ₂)^½) = Σ √λ(Σ₁Σ₂) (as torch-fidelity computes it)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.real.clip(0)).sum())


def mmd2_unbiased(x, y):
    """Unbiased MMD² with k(x, y) = (x·y/d + 1)³ over all samples (equal sizes), written out directly."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    off_diagonal = (kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))
    return off_diagonal / (m * (m - 1)) - 2 * kxy.sum() / m**2


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


def test_folder_fid_equals_clean_fids_compute_fid_with_the_same_extractor(data, monkeypatch):
    # Honest comparison: clean-fid's "clean" mode would resize to 299 before a custom extractor, which our
    # 64-px random-conv never sees; custom_fn_resize returns the image itself as float32 (so clean-fid's ToTensor
    # does not rescale), so both paths feed the same 64×64 [0, 255] tensors to the same extractor. What is
    # compared: file discovery (recursive), decoding, batching, the extractor call, mean/cov and the distance.
    from cleanfid import fid as cf

    if not _sqrtm_accepts_disp():  # SciPy >= 1.18: let clean-fid's own frechet_distance run, sqrtm adapted
        from scipy import linalg
        monkeypatch.setattr(cf, "linalg", types.SimpleNamespace(sqrtm=lambda a, disp=True: (linalg.sqrtm(a), 0.0)))
    ex = data["ex"]

    def same_input(image):
        return image.astype(np.float32)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`disp` argument", category=DeprecationWarning)  # scipy 1.17
        theirs = cf.compute_fid(str(data["a"]), str(data["b"]), mode="clean", custom_feat_extractor=ex,
                                custom_fn_resize=same_input, device=torch.device("cpu"), num_workers=0,
                                batch_size=16, verbose=False, use_dataparallel=False)
    ours = quiet_fid(data["fa"], data["fb"])
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert 0.05 < ours < 5  # two samples of the same distribution: small, but not zero at N=40
    their_feats = cf.get_folder_features(str(data["a"]), ex, num_workers=0, batch_size=7, device=torch.device("cpu"),
                                         mode="clean", custom_fn_resize=same_input, verbose=False)
    assert np.array_equal(their_feats, data["fa"])


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(data):
    # not exactly 0: sqrtm of a singular (rank 39, 256-d) product; the error is ~3e-7 of Tr(Σ₁ + Σ₂)
    trace = np.trace(np.cov(data["fa"].astype(np.float64), rowvar=False))
    assert abs(quiet_fid(data["fa"], data["fa"])) < 1e-6 * 2 * trace
    # rel 1e-6: with N < dim the product is singular, and SciPy 1.18's sqrtm gave a 1e-8 asymmetry there
    assert quiet_fid(data["fa"], data["fb"]) == pytest.approx(quiet_fid(data["fb"], data["fa"]), rel=1e-6)


def test_fid_matches_an_eigenvalue_implementation_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((600, 16))
    f2 = rng.standard_normal((500, 16)) @ (np.eye(16) + 0.3 * rng.standard_normal((16, 16))) + 0.5
    value = fidlib.fid(f1, f2)
    assert value == pytest.approx(eig_fid(f1, f2), rel=1e-9)
    assert fidlib.fid(f1, f2 + 1) > value


def test_fid_still_works_when_scipy_sqrtm_has_lost_disp(monkeypatch):
    # SciPy 1.18 removed sqrtm's `disp`, which clean-fid 0.1.35 passes (the GPU machine's SciPy raised TypeError)
    from cleanfid import fid as cf
    from scipy import linalg

    def sqrtm_without_disp(a):
        return linalg.sqrtm(a)

    monkeypatch.setattr(cf, "linalg", types.SimpleNamespace(sqrtm=sqrtm_without_disp))
    rng = np.random.default_rng(3)
    f1, f2 = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) * 1.5 + 0.2
    assert fidlib.fid(f1, f2) == pytest.approx(eig_fid(f1, f2), rel=1e-9)


def test_small_sets_warn_and_fewer_than_two_images_fail(data):
    with pytest.warns(fidlib.SmallSampleWarning, match="singular"):
        fidlib.fid(data["fa"], data["fb"])
    with pytest.raises(EvalError, match="at least 2"):
        fidlib.fid(data["fa"][:1], data["fb"])
    with pytest.raises(EvalError, match="at least 2"):
        fidlib.kid(data["fa"][:1], data["fb"])


def test_features_of_different_extractors_are_refused(data, tmp_path):
    ref = tmp_path / "ref.npz"
    fidlib.save_reference(ref, data["fa"], {"extractor": data["ex"].name, "spec": data["ex"].spec})
    with pytest.raises(EvalError, match="not comparable"):
        fidlib.load_reference(ref, extractor="inception-clean:0123456789ab")
    other = fidlib.Stats.from_features(data["fb"], {"extractor": "random-conv-v1:seed=1:res=64"})
    with pytest.raises(EvalError, match="cannot compare"):
        fidlib.fid(other, fidlib.load_reference(ref))
    with pytest.raises(EvalError, match="not comparable"):
        fidlib.score_folder(data["b"], ref, extractor="random-conv:1", progress=False)


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------


def test_kid_is_seeded_restores_numpy_state_and_equals_the_direct_unbiased_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((80, 8)), rng.standard_normal((80, 8)) + 0.5
    np.random.seed(123)
    state = np.random.get_state()
    a = fidlib.kid(x, y, num_subsets=10, max_subset_size=30, seed=0)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global numpy RNG left as it was
    assert fidlib.kid(x, y, num_subsets=10, max_subset_size=30, seed=0) == a
    assert fidlib.kid(x, y, num_subsets=10, max_subset_size=30, seed=1) != a
    # one subset covering every sample is a permutation of all of them: exactly the full unbiased estimate
    assert fidlib.kid(x, y, num_subsets=1, max_subset_size=1000) == pytest.approx(mmd2_unbiased(x, y), rel=1e-10)


def test_kid_of_two_samples_of_one_distribution_is_near_zero():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same = fidlib.kid(x, y, num_subsets=20, max_subset_size=200)
    shifted = fidlib.kid(x, y + 0.5, num_subsets=20, max_subset_size=200)
    assert abs(same) < 0.02 and shifted > 0.2


# ----------------------------------------------------------------------------------------------
# Sources, reference files
# ----------------------------------------------------------------------------------------------


def test_reference_round_trips_through_npz(data, tmp_path):
    ref = tmp_path / "sub" / "ref.npz"
    saved = fidlib.save_reference(ref, data["fa"], {"extractor": data["ex"].name, "source": "test", "resolution": 64})
    loaded = fidlib.load_reference(ref, extractor=data["ex"])
    assert np.array_equal(loaded.mu, saved.mu) and np.array_equal(loaded.sigma, saved.sigma)
    assert np.array_equal(loaded.feats, data["fa"])
    assert np.allclose(loaded.sigma, np.cov(data["fa"].astype(np.float64), rowvar=False))  # N−1, as clean-fid
    assert loaded.meta["n"] == N and loaded.meta["dim"] == 256 and loaded.meta["source"] == "test"
    assert loaded.meta["created"] and loaded.extractor == data["ex"].name
    assert sorted(p.name for p in ref.parent.iterdir()) == ["ref.npz"]  # no temp file left behind
    assert quiet_fid(loaded, data["fb"]) == quiet_fid(data["fa"], data["fb"])
    with pytest.raises(EvalError, match="not found"):
        fidlib.load_reference(tmp_path / "missing.npz")


def test_shard_source_gives_the_same_images_and_features_as_the_folder_source(data):
    shards = ImageSource(shards=str(data["shards_a"]), resolution=64)
    folder = ImageSource(folder=str(data["a"]))
    images_s, images_f = list(shards), list(folder)
    assert len(images_s) == len(images_f) == N
    assert all(np.array_equal(s, f) for s, f in zip(images_s, images_f))
    feats = compute_features(shards, data["ex"], batch_size=9, progress=False)
    assert np.array_equal(feats, data["fa"])
    assert shards.counts == {"good": N, "image": 0, "read": 0}
    first = ImageSource(shards=str(data["shards_a"]), resolution=64, max_images=5)
    assert np.array_equal(compute_features(first, data["ex"], progress=False), data["fa"][:5])


def test_bad_shard_samples_are_skipped_and_counted(tmp_path):
    members = sample_members("k0", (255, 0, 0)) + [("k1.png", b"not a png"), ("k1.txt", b"broken")]
    members += sample_members("k2", (0, 0, 255)) + [("k3.txt", b"caption only")]
    source = ImageSource(shards=str(write_tar(tmp_path / "s-000000.tar", members)), resolution=8)
    images = list(source)
    assert [im[0, 0].tolist() for im in images] == [[255, 0, 0], [0, 0, 255]] and images[0].shape == (8, 8, 3)
    assert source.counts == {"good": 2, "image": 2, "read": 0}


# ----------------------------------------------------------------------------------------------
# inception:PATH, with a stand-in TorchScript file
# ----------------------------------------------------------------------------------------------


class FakeInceptionLayers(torch.nn.Module):
    """Stand-in for the NVIDIA archive's `layers`: [N,3,299,299] normalised -> [N,2048,1,1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("fake inception: expected 299x299 input")
        pooled = F.adaptive_avg_pool2d(x, (26, 26)).flatten(1)  # 3·26·26 = 2028 spatial features
        return torch.cat([pooled, torch.zeros(x.shape[0], 20)], dim=1).view(-1, 2048, 1, 1)


class FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = FakeInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


def test_inception_path_loads_a_local_torchscript_file_and_resizes_like_clean_fid(data, tmp_path):
    from cleanfid import fid as cf
    from cleanfid.resize import build_resizer

    path = tmp_path / "fake-inception.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit")  # TorchScript is deprecated in recent torch
        torch.jit.save(torch.jit.script(FakeInception()), str(path))
    ex = build_extractor(f"inception:{path}")
    assert ex.name.startswith("inception-clean:") and ex.dim == 2048

    subset = ImageSource(folder=str(data["a"]), max_images=6)
    ours = compute_features(subset, ex, batch_size=4, progress=False)
    assert ours.shape == (6, 2048)
    # clean-fid's own pipeline (ResizeDataset with the "clean" resize, then the model) on the same files
    first6 = tmp_path / "first6"
    for i, f in enumerate(subset.files()):
        (first6 / f"{i:02d}").mkdir(parents=True)
        os.link(f, first6 / f"{i:02d}" / "x.png")
    theirs = cf.get_folder_features(str(first6), ex.model, num_workers=0, batch_size=4, device=torch.device("cpu"),
                                    mode="clean", verbose=False)
    assert np.array_equal(ours, theirs)
    # and by hand: PIL bicubic on float32 to 299, (x − 128)/128, layers
    image = np.asarray(Image.open(subset.files()[0]).convert("RGB"))
    x = torch.from_numpy(build_resizer("clean")(image).transpose(2, 0, 1).copy())[None]
    assert torch.allclose(torch.from_numpy(ours[:1]), FakeInceptionLayers()((x - 128) / 128).view(1, 2048))


def test_missing_inception_file_says_where_to_get_it(tmp_path):
    with pytest.raises(EvalError, match="nvlabs-fi-cdn.nvidia.com.*inception:"):
        build_extractor(f"inception:{tmp_path / 'nope.pt'}")


# ----------------------------------------------------------------------------------------------
# Distributed extraction
# ----------------------------------------------------------------------------------------------


RANK_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch.distributed as dist
    from t2i.eval.features import RandomConvExtractor, compute_features
    from t2i.eval.image_source import ImageSource
    rank, world, port, folder, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    source = ImageSource(folder=folder, max_images=33)
    feats = compute_features(source, RandomConvExtractor(), batch_size=5, progress=False)
    if rank == 0:
        np.save(out, feats)
        print(source.counts)
    dist.destroy_process_group()
""")


def test_two_ranks_gather_exactly_the_single_process_features(data, tmp_path):
    folder = tmp_path / "with_bad"
    folder.mkdir()
    for i, f in enumerate(sorted(data["a"].rglob("*.png"))):
        os.link(f, folder / f"{i:03d}.png")
    (folder / "010b.png").write_bytes(b"corrupt")  # a bad file inside the first 33 entries
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(port), str(folder), str(tmp_path / "f.npy")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    single = ImageSource(folder=str(folder), max_images=33)
    expected = compute_features(single, data["ex"], batch_size=16, progress=False)
    assert single.counts == {"good": 32, "image": 1, "read": 0}
    assert np.array_equal(np.load(tmp_path / "f.npy"), expected)  # bit-identical, across processes
    assert "'good': 32, 'image': 1" in outs[0][0]


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_ref_then_score_writes_the_json_result(data, tmp_path, capsys):
    ref, out = tmp_path / "ref.npz", tmp_path / "res" / "fid.json"
    assert cli.main(["fid", "ref", "--shards", str(data["shards_a"]), "--resolution", "64", "--out", str(ref),
                         "--no-progress", "--device", "cpu"]) == 0
    assert cli.main(["fid", "score", "--images", str(data["b"]), "--ref", str(ref), "--out", str(out),
                         "--no-progress", "--kid-subset-size", "20"]) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "KID" in printed and "random-conv-v1:seed=0:res=64" in printed
    result = json.loads(out.read_text())
    assert result["n_images"] == result["n_reference"] == N and result["resolution"] == 64
    assert result["extractor"] == data["ex"].name and result["reference"]["source"].startswith("shards:")
    assert result["fid"] == pytest.approx(quiet_fid(data["fb"], data["fa"]), rel=1e-9)
    assert result["kid"] == pytest.approx(fidlib.kid(data["fb"], data["fa"], max_subset_size=20), rel=1e-12)
    assert any("singular" in w for w in result["warnings"])


def test_cli_fails_with_exit_2_and_a_clear_message(data, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert cli.main(["fid", "score", "--images", str(data["b"]), "--ref", str(ref), "--no-progress"]) == 2
    assert "reference statistics not found" in capsys.readouterr().err
    assert cli.main(["fid", "ref", "--folder", str(data["a"]), "--out", str(ref), "--no-progress",
                         "--extractor", f"inception:{tmp_path / 'inception-2015-12-05.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "nvlabs-fi-cdn.nvidia.com" in err and "inception:/path/to/inception-2015-12-05.pt" in err
    assert cli.main(["fid", "ref", "--folder", str(data["a"]), "--out", str(ref), "--no-progress"]) == 0
    assert cli.main(["fid", "score", "--images", str(data["b"]), "--ref", str(ref), "--no-progress",
                         "--extractor", "random-conv:1"]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert cli.main(["fid", "score", "--images", str(tmp_path / "nowhere"), "--ref", str(ref), "--no-progress"]) == 2


# ----------------------------------------------------------------------------------------------
# Sizes: a reference is made at one (width, height); other sizes are a resolution mismatch
# ----------------------------------------------------------------------------------------------


def test_sizes_compare_as_width_height_and_old_int_metas_still_read():
    old = {"resolution": 64}                                             # every reference made before WxH sizes
    assert fidlib.check_resolution(old, 64) == fidlib.check_resolution(old, (64, 64)) == []
    assert fidlib.check_resolution(old, "64x64") == [] and fidlib.reference_size(old) == (64, 64)
    with pytest.raises(EvalError, match=r"^images at 96x64 px but reference was made at 64 px: the crop and scale "
                                        r"differ.*or pass --allow-resolution-mismatch$"):
        fidlib.check_resolution(old, (96, 64))
    [note] = fidlib.check_resolution(old, (96, 64), allow=True)
    assert note.startswith("resolution mismatch allowed (--allow-resolution-mismatch): images at 96x64 px")
    for recorded in ("96x64", [96, 64]):                                 # as written to JSON
        assert fidlib.check_resolution({"resolution": recorded}, (96, 64)) == []
        assert fidlib.reference_size({"resolution": recorded}) == (96, 64)
        with pytest.raises(EvalError, match="images at 64x96 px but reference was made at 96x64 px"):
            fidlib.check_resolution({"resolution": recorded}, (64, 96))  # the transpose is another size
        with pytest.raises(EvalError, match="images at 96 px but reference was made at 96x64 px"):
            fidlib.check_resolution({"resolution": recorded}, 96)
    with pytest.raises(EvalError, match="images at 96x64 px but reference was made at native size"):
        fidlib.check_resolution({"resolution": None}, (96, 64))
    assert fidlib.reference_differences({"source": "s", "resolution": 16}, {"source": "s", "resolution": 16}) == []
    assert fidlib.reference_differences({"source": "s", "resolution": "32x16"},
                                        {"source": "s", "resolution": "32x16"}) == []
    assert fidlib.reference_differences({"source": "s", "resolution": 16}, {"source": "s", "resolution": "32x16"}) == [
        "resolution: recorded 16, requested '32x16'"]


def wide_pngs(folder, n, seed, size=(64, 32)):
    """Shapes images cover-cropped to `size` (width, height), as PNGs."""
    from t2i.data.decode import resize_cover_crop

    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, image, _, _) in enumerate(iter_samples(n, seed, 64)):
        resize_cover_crop(image, size).save(folder / f"{i:05d}.png")
    return folder


def test_a_reference_at_width_x_height_cover_crops_shards_and_scores_samples_of_that_size_only(data, tmp_path,
                                                                                              capsys):
    from t2i.data.decode import resize_cover_crop
    from t2i.data.shapes import iter_samples as shapes

    source = ImageSource(shards=str(data["shards_a"]), resolution="64x32", max_images=3)
    images = list(source)
    assert source.resolution == (64, 32) and [im.shape for im in images] == [(32, 64, 3)] * 3
    expected = [np.asarray(resize_cover_crop(im, (64, 32))) for _, im, _, _ in shapes(3, 0, 64)]
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))
    assert ImageSource(shards=str(data["shards_a"]), resolution=(64, 64)).resolution == 64  # the square, as before

    wide_ref, square_ref = tmp_path / "wide.npz", tmp_path / "square.npz"
    assert cli.main(["fid", "ref", "--shards", str(data["shards_a"]), "--resolution", "64x32", "--out", str(wide_ref),
                     "--no-progress", "--device", "cpu"]) == 0
    assert "resolution  64x32" in capsys.readouterr().out
    meta = fidlib.load_reference(wide_ref).meta
    assert meta["resolution"] == "64x32" and fidlib.reference_size(meta) == (64, 32)
    assert cli.main(["fid", "ref", "--shards", str(data["shards_a"]), "--resolution", "64", "--out", str(square_ref),
                     "--no-progress", "--device", "cpu"]) == 0
    assert fidlib.load_reference(square_ref).meta["resolution"] == 64    # a square: an int, as always

    samples = wide_pngs(tmp_path / "samples", 12, seed=1)
    result = fidlib.score_folder(samples, wide_ref, progress=False)      # default: the reference's size
    assert (result["resolution"], result["width"], result["height"]) == ("64x32", 64, 32)
    assert not any("mismatch" in w for w in result["warnings"]) and result["n_images"] == 12
    capsys.readouterr()
    assert cli.main(["fid", "score", "--images", str(samples), "--ref", str(square_ref), "--resolution", "64x32",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"t2i fid: EvalError: images at 64x32 px but reference {square_ref} "
                                               f"was made at 64 px")
    allowed = fidlib.score_folder(samples, square_ref, resolution=(64, 32), allow_resolution_mismatch=True,
                                  progress=False)
    assert allowed["warnings"][0].startswith("resolution mismatch allowed") and allowed["resolution"] == "64x32"
    square = fidlib.score_folder(samples, square_ref, progress=False)    # old behaviour: cropped to the square
    assert (square["resolution"], square["width"], square["height"]) == (64, 64, 64)


def test_eval_refuses_a_square_reference_for_width_x_height_samples_before_sampling(data, tmp_path):
    import argparse

    from pipelines.evaluate import add_arguments, check_fid_arguments

    ref = tmp_path / "square.npz"
    fidlib.make_reference(ImageSource(folder=str(data["a"]), resolution=64), data["ex"], ref, progress=False)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = lambda *extra: p.parse_args(["--ckpt", "a=x", "--out", str(tmp_path / "o"), "--fid-ref", str(ref),  # noqa: E731
                                        *extra])
    check_fid_arguments(args("--resolution", "64"))
    check_fid_arguments(args("--resolution", "64x64"))
    with pytest.raises(EvalError, match=rf"images at 64x32 px but --fid-ref {ref} was made at 64 px"):
        check_fid_arguments(args("--resolution", "64x32"))
    check_fid_arguments(args("--resolution", "64x32", "--allow-resolution-mismatch"))
