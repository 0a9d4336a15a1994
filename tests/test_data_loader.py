"""The loader: sharding and replication over real mpirun grids, reading, prefetch, augmentations."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from benchmarks.loader import synthetic
from hpcbnn.data import Loader, augmentation, epoch_order
from hpcbnn.data.augment import crop, shift_rotate
from hpcbnn.data.convert import convert_digits
from hpcbnn.data.reader import ReaderError, shared_memory_free
from hpcbnn.errors import UsageError
from hpcbnn.parallel.grid import ProcessGrid
from tests.mpi import run_mpi

PROGRAM = "tests/programs/data_shards.py"
N_TRAIN, BATCH = 1257, 64
STEPS, DROPPED = N_TRAIN // BATCH, N_TRAIN % BATCH
RUNS = {"p1": (1, ["sample", "data", "hybrid"]), "p2": (2, ["sample", "data", "hybrid:1"]),
        "p4": (4, ["sample", "data", "hybrid:2"])}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each run starts from an empty cache, so its ranks also create the default data set together."""
    results = {}
    for name, (p, layouts) in RUNS.items():
        work = tmp_path_factory.mktemp(name)
        out = work / "records.json"
        r = run_mpi(p, [PROGRAM, str(out), *layouts], timeout=240, env={"HPCBNN_CACHE": str(work / "cache")})
        assert r.returncode == 0, r.output[-3000:]
        assert sorted(os.listdir(work / "cache" / "data")) == ["digits-rotated.h5", "digits.h5"]  # no temporary files
        results[name] = json.loads(out.read_text())["records"]
    return results


def layouts() -> list[tuple[str, str]]:
    return [(run, layout) for run, (_, ls) in RUNS.items() for layout in ls]


def global_batches(ranks: list[dict], key: str) -> list[list]:
    """The global batches put back together: data groups in order, from sample rank 0 of each."""
    heads = sorted((r for r in ranks if r["sample_rank"] == 0), key=lambda r: r["data_rank"])
    return [sum((h["batches"][t][key] for h in heads), []) for t in range(len(heads[0]["batches"]))]


@pytest.mark.mpi
@pytest.mark.parametrize("run, layout", layouts())
def test_data_groups_share_each_epoch_once(shards: dict, run: str, layout: str) -> None:
    for epoch in (0, 1):
        ranks = shards[run][f"{layout}/stream/{epoch}"]
        seen = [i for batch in global_batches(ranks, "index") for i in batch]
        assert len(seen) == len(set(seen)) == STEPS * BATCH  # no duplicates, only the remainder dropped
        assert set(seen) <= set(range(N_TRAIN))
        for r in ranks:
            per = BATCH // r["D"]
            assert r["rows"] == [r["data_rank"] * per, (r["data_rank"] + 1) * per]
            assert r["steps"] == len(r["batches"]) == STEPS
            assert all(len(b["index"]) == per for b in r["batches"])


@pytest.mark.mpi
@pytest.mark.parametrize("run, layout", layouts())
def test_sample_group_gets_identical_batches(shards: dict, run: str, layout: str) -> None:
    for case in ("stream/0", "stream/1", "pad/0", "ordered/0"):
        ranks = shards[run][f"{layout}/{case}"]
        for r in ranks:
            head = next(h for h in ranks if h["data_rank"] == r["data_rank"] and h["sample_rank"] == 0)
            assert r["batches"] == head["batches"]
        if len({r["data_rank"] for r in ranks}) > 1:
            first = {r["data_rank"]: r["batches"][0]["index"] for r in ranks}
            assert first[0] != first[1]


@pytest.mark.mpi
@pytest.mark.parametrize("run, layout", layouts())
def test_global_batches_do_not_depend_on_the_grid(shards: dict, run: str, layout: str) -> None:
    """Exactness rests on this: every grid sees the single-process global batches, row by row
    (and as each run is a separate job, the order is also deterministic across runs)."""
    for case in ("stream/0", "stream/1", "preload/0", "pad/0", "ordered/0"):
        for key in ("index", "x", "y", "valid"):
            assert global_batches(shards[run][f"{layout}/{case}"], key) == \
                global_batches(shards["p1"][f"sample/{case}"], key), (case, key)


@pytest.mark.mpi
def test_order_is_new_each_epoch(shards: dict) -> None:
    epoch0 = global_batches(shards["p1"]["sample/stream/0"], "index")
    epoch1 = global_batches(shards["p1"]["sample/stream/1"], "index")
    assert epoch0[0] != epoch1[0]
    assert sorted(sum(epoch0, [])) != sorted(sum(epoch1, []))  # a different remainder is dropped
    assert global_batches(shards["p1"]["sample/preload/0"], "x") == global_batches(shards["p1"]["sample/stream/0"], "x")


@pytest.mark.mpi
def test_last_batch_is_filled_from_the_start_of_the_epoch(shards: dict) -> None:
    for run, layout in layouts():
        ranks = shards[run][f"{layout}/pad/0"]
        assert all(r["steps"] == len(r["batches"]) == STEPS + 1 for r in ranks)
        index, valid = global_batches(ranks, "index"), global_batches(ranks, "valid")
        flat, ok = sum(index, []), sum(valid, [])
        assert sorted(i for i, v in zip(flat, ok) if v) == list(range(N_TRAIN))
        assert ok == [True] * N_TRAIN + [False] * (BATCH - DROPPED)
        assert flat[N_TRAIN:] == flat[:BATCH - DROPPED]


@pytest.mark.mpi
def test_without_shuffle_the_order_is_the_file_order(shards: dict) -> None:
    flat = sum(global_batches(shards["p4"]["hybrid:2/ordered/0"], "index"), [])
    assert flat[:N_TRAIN] == list(range(N_TRAIN))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_digits(tmp_path_factory.mktemp("digits") / "digits.h5")


@pytest.fixture(scope="module")
def grid() -> ProcessGrid:
    return ProcessGrid(device="cpu")


def test_batches_are_the_normalised_rows_of_the_file(digits: Path, grid: ProcessGrid) -> None:
    with h5py.File(digits, "r") as f:
        x, y = f["val/x"][:], f["val/y"][:]
        mean, std = f.attrs["mean"], f.attrs["std"]
    with Loader(digits, "val", grid, batch_size=50, seed=3, preload=False) as loader:
        assert len(loader) == 3 and not loader.preloaded
        for batch in loader.epoch(2):
            i = batch.index.numpy()
            assert batch.x.dtype == torch.float32 and batch.y.dtype == torch.int64
            np.testing.assert_allclose(batch.x.numpy(), (x[i] - mean[0]) / std[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(batch.y.numpy(), y[i])
            np.testing.assert_array_equal(i, loader.order(2)[batch.step])


def test_small_splits_are_preloaded_by_default(digits: Path, grid: ProcessGrid) -> None:
    with Loader(digits, "test", grid, batch_size=60) as loader:
        assert loader.preloaded
        preloaded = [b.x for b in loader.epoch(0)]
    with Loader(digits, "test", grid, batch_size=60, preload=False) as loader:
        assert [torch.equal(a, b.x) for a, b in zip(preloaded, loader.epoch(0))] == [True] * 6


def test_fewer_examples_than_one_batch_is_a_usage_error(digits: Path, grid: ProcessGrid) -> None:
    with pytest.raises(UsageError, match=r"'val' has 180 examples, fewer than one global batch of 256"):
        Loader(digits, "val", grid, batch_size=256)
    assert len(Loader(digits, "val", grid, batch_size=256, drop_last=False)) == 1


def test_stopping_early_stops_the_prefetch_thread(digits: Path, grid: ProcessGrid) -> None:
    before = threading.active_count()
    with Loader(digits, "train", grid, batch_size=16, prefetch=3, preload=False) as loader:
        batches = loader.epoch(0)
        assert [next(batches).step for _ in range(3)] == [0, 1, 2]
        assert threading.active_count() == before + 1
        batches.close()
        assert threading.active_count() == before


def test_a_damaged_chunk_fails_the_epoch_with_the_file_named(tmp_path: Path, grid: ProcessGrid) -> None:
    path = convert_digits(tmp_path / "d.h5")
    with h5py.File(path, "r") as f:
        offset = f["train/x"].id.get_chunk_info(3).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\xff\x00\xff")
    loader = Loader(path, "train", grid, batch_size=64, shuffle=False, verify=False, preload=False)
    with pytest.raises(UsageError, match=rf"{path}: cannot read /train/x .*damaged"):
        list(loader.epoch(0))


def test_a_forked_child_opens_the_file_itself(digits: Path, grid: ProcessGrid) -> None:
    loader = Loader(digits, "train", grid, batch_size=32, prefetch=0, preload=False)
    first = next(iter(loader.epoch(0)))
    pid = os.fork()
    if pid == 0:
        again = next(iter(loader.epoch(0)))
        os._exit(0 if torch.equal(again.x, first.x) and loader.source.pid == os.getpid() else 1)
    assert os.waitpid(pid, 0)[1] == 0


def in_process(loader: Loader, epoch: int) -> list:
    """The epoch as the loader read it in this process before the reader process existed."""
    with Loader(loader.info.path, loader.info.split, loader.grid, batch_size=loader.batch_size, seed=loader.seed,
                shuffle=loader.shuffle, drop_last=loader.drop_last, prefetch=0, preload=False) as reference:
        return list(reference.epoch(epoch))


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert a.step == b.step and a.rows == b.rows
        for key in ("x", "y", "index", "valid"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (a.step, key)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """uint8 3x32x32 images: the reader normalises another stored dtype than the float32 digits."""
    return synthetic(tmp_path_factory.mktemp("images") / "images.h5", 700)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("data, batch_size, drop_last, shuffle, prefetch",
                         [("digits", 64, True, True, 2), ("digits", 50, False, True, 1),
                          ("digits", 100, False, False, 3), ("images", 96, False, True, 2)])
def test_the_reader_process_yields_the_in_process_batches(request: pytest.FixtureRequest, grid: ProcessGrid, data: str,
                                                          batch_size: int, drop_last: bool, shuffle: bool,
                                                          prefetch: int) -> None:
    with Loader(request.getfixturevalue(data), "train", grid, batch_size=batch_size, seed=5, shuffle=shuffle, drop_last=drop_last,
                prefetch=prefetch, preload=False) as loader:
        for epoch in (0, 1, 2):  # one reader process serves every epoch
            assert_same_batches(list(loader.epoch(epoch)), in_process(loader, epoch))
            assert loader.reader is not None and loader.reader.process.poll() is None
        if not drop_last:
            assert not bool(list(loader.epoch(0))[-1].valid.all())  # fill-up rows were compared too


@pytest.mark.timeout(120)
def test_stopping_mid_epoch_leaves_the_reader_ready_for_the_next(digits: Path, grid: ProcessGrid) -> None:
    with Loader(digits, "train", grid, batch_size=32, seed=1, prefetch=2, preload=False) as loader:
        batches = loader.epoch(0)
        assert [next(batches).step for _ in range(3)] == [0, 1, 2]
        batches.close()
        abandoned = loader.epoch(1)
        next(abandoned)
        assert_same_batches(list(loader.epoch(2)), in_process(loader, 2))  # supersedes the unfinished epoch 1
        with pytest.raises(ReaderError, match="superseded"):
            list(abandoned)


@pytest.mark.timeout(60)
def test_a_killed_reader_process_fails_the_epoch_instead_of_hanging(digits: Path, grid: ProcessGrid) -> None:
    loader = Loader(digits, "train", grid, batch_size=16, prefetch=2, preload=False)
    batches = loader.epoch(0)
    next(batches)
    assert loader.reader is not None
    os.kill(loader.reader.process.pid, signal.SIGKILL)
    with pytest.raises(ReaderError, match=rf"reader process of /train/x of {digits} exited with code -9"):
        list(batches)
    loader.close()


@pytest.mark.timeout(60)
def test_close_stops_the_reader_and_unlinks_its_shared_memory(digits: Path, grid: ProcessGrid) -> None:
    loader = Loader(digits, "train", grid, batch_size=16, prefetch=2, preload=False)
    next(loader.epoch(0))
    assert loader.reader is not None
    shm = Path("/dev/shm") / loader.reader.memory.name
    assert shm.exists() and loader.reader.process.poll() is None
    loader.close()
    assert not shm.exists() and loader.reader.process.returncode == 0


@pytest.mark.timeout(60)
def test_interpreter_exit_stops_the_reader_and_unlinks_its_shared_memory(digits: Path) -> None:
    program = ("from hpcbnn.data import Loader; from hpcbnn.parallel.grid import ProcessGrid\n"
               f"loader = Loader({str(digits)!r}, 'train', ProcessGrid(device='cpu'), batch_size=16, preload=False)\n"
               "next(loader.epoch(0)); print(loader.reader.memory.name, loader.reader.process.pid)")
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    name, pid = r.stdout.split()
    assert not (Path("/dev/shm") / name).exists()
    assert not Path(f"/proc/{pid}").exists()


@pytest.mark.timeout(60)
def test_the_reader_process_loads_neither_mpi_nor_torch(digits: Path, grid: ProcessGrid) -> None:
    """Under mpirun a child that loads mpi4py may initialise MPI as a second copy of its rank."""
    import mpi4py.MPI  # noqa: F401 - this process has MPI, as a training process does

    with Loader(digits, "train", grid, batch_size=16, preload=False) as loader:
        next(loader.epoch(0))
        assert loader.reader is not None
        mine, its = (Path(f"/proc/{pid}/maps").read_text() for pid in (os.getpid(), loader.reader.process.pid))
        assert "mpi4py" in mine and "libtorch" in mine
        assert "mpi4py" not in its and "libtorch" not in its


@pytest.mark.timeout(60)
def test_the_reader_process_retries_a_read_while_the_file_is_briefly_gone(digits: Path, tmp_path: Path,
                                                                          grid: ProcessGrid, capfd) -> None:
    path, away = tmp_path / "data.h5", tmp_path / "elsewhere.h5"
    path.write_bytes(digits.read_bytes())
    loader = Loader(path, "train", grid, batch_size=32, preload=False, prefetch=2)
    os.replace(path, away)
    announced = []

    def put_back_after_a_failure() -> None:
        while not any("failed" in err for err in announced):
            announced.append(capfd.readouterr().err)
            time.sleep(0.05)
        os.replace(away, path)

    helper = threading.Thread(target=put_back_after_a_failure)
    helper.start()
    batch = next(loader.epoch(0))  # the reader process opens the file at its first read
    helper.join()
    assert f"rank 0 on {socket.gethostname()}: reading /train/x of {path} failed" in "".join(announced)
    assert torch.equal(batch.x, in_process(loader, 0)[0].x)
    loader.close()


@pytest.mark.timeout(60)
def test_without_room_in_dev_shm_the_loader_reads_in_this_process(digits: Path, grid: ProcessGrid, capfd) -> None:
    batch = 32  # a prefetch whose slots exceed /dev/shm's free space (sparse: nothing is allocated)
    deep = shared_memory_free() // (4 * batch * 64) + 1  # digits are 1x8x8
    with Loader(digits, "train", grid, batch_size=batch, prefetch=deep, preload=False) as loader:
        assert_same_batches(list(loader.epoch(0)), in_process(loader, 0))
        assert loader.reader is None and not loader.reader_process
    assert "/dev/shm has" in capfd.readouterr().err


def test_the_preload_limit_decides_between_preloading_and_streaming(digits: Path, grid: ProcessGrid) -> None:
    info = Loader(digits, "train", grid, batch_size=32, preload=False).info
    split = info.n * info.x_dtype.itemsize * int(np.prod(info.input_shape))
    assert Loader(digits, "train", grid, batch_size=32, preload_limit=split).preloaded
    assert not Loader(digits, "train", grid, batch_size=32, preload_limit=split - 1).preloaded


@pytest.mark.timeout(300)
def test_the_loader_benchmark_reports_the_stall_as_json() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.loader", "--n", "800", "--batch", "32", "--steps", "16",
                        "--compute_ms", "2"], capture_output=True, text=True, timeout=280,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["file_mib"] == pytest.approx(4 * result["preload_limit_mib"], rel=0.01)
    assert result["target"] == 0.05
    assert set(result["stall"]) == {"stream", "stream+prefetch", "reader", "preload", "preload+prefetch"}
    assert all(0 <= s["2"] < 1 for s in result["stall"].values())


def test_epoch_order_cuts_a_seeded_permutation() -> None:
    order = epoch_order(10, 4, seed=1, epoch=0)
    assert order.shape == (2, 4) and len(set(order.ravel())) == 8
    np.testing.assert_array_equal(order, epoch_order(10, 4, seed=1, epoch=0))
    assert not np.array_equal(order, epoch_order(10, 4, seed=1, epoch=1))
    assert not np.array_equal(order, epoch_order(10, 4, seed=2, epoch=0))
    padded = epoch_order(10, 4, seed=1, epoch=0, drop_last=False)
    assert padded.shape == (3, 4) and sorted(padded.ravel()[:10]) == list(range(10))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["flip", "crop", "cifar", "shift-rotate"])
def test_augmenting_a_shard_equals_augmenting_the_global_batch(name: str) -> None:
    aug = augmentation(name)
    x = torch.randn(12, 3, 8, 8)
    whole = aug(x, generator(5), slice(0, 12), 12)
    parts = [aug(x[s:s + 4], generator(5), slice(s, s + 4), 12) for s in (0, 4, 8)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole, x)
    assert not torch.equal(whole, aug(x, generator(6), slice(0, 12), 12))


def test_flip_mirrors_some_rows_and_keeps_the_others() -> None:
    x = torch.randn(64, 2, 4, 5)
    out = augmentation("flip")(x, generator(0), slice(0, 64), 64)
    flipped = [torch.equal(o, r.flip(-1)) for o, r in zip(out, x)]
    kept = [torch.equal(o, r) for o, r in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_crop_cuts_each_image_at_its_own_offset() -> None:
    x = torch.randn(5, 3, 6, 7)
    offsets = torch.tensor([[0, 0], [4, 4], [8, 8], [1, 7], [6, 2]])
    out = crop(x, offsets, 4)
    for img, o, (top, left) in zip(x, out, offsets.tolist()):
        padded = torch.zeros(3, 14, 15)
        padded[:, 4:10, 4:11] = img
        assert torch.equal(o, padded[:, top:top + 6, left:left + 7])


def test_shift_rotate_moves_pixels_and_turns_images() -> None:
    x = torch.randn(3, 2, 8, 8)
    assert torch.allclose(shift_rotate(x, torch.zeros(3), torch.zeros(3, 2)), x, atol=1e-6)
    turned = shift_rotate(x, torch.full((3,), math.pi / 2), torch.zeros(3, 2))
    assert torch.allclose(turned, x.rot90(1, (2, 3)), atol=1e-5)  # a quarter turn counter-clockwise
    moved = shift_rotate(x, torch.zeros(3), torch.tensor([[0.125, 0.0]] * 3))  # one pixel right
    assert torch.allclose(moved[..., 1:], x[..., :-1], atol=1e-6) and moved[..., 0].abs().max() == 0


def test_augmentations_reject_what_they_cannot_do() -> None:
    with pytest.raises(UsageError, match="unknown augmentation 'rotate'"):
        augmentation("rotate")
    with pytest.raises(UsageError, match=r"needs image inputs \[C, H, W\].*\[64\]"):
        augmentation("cifar")(torch.randn(4, 64), generator(0), slice(0, 4), 4)
    x = torch.randn(4, 64)
    assert augmentation("none")(x, generator(0), slice(0, 4), 4) is x
