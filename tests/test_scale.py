"""Dataset-scale runs (``medlens run``): kill -9 + resume, 2 Fabric processes, bad items,
configuration checks, and the bounded-memory bootstrap."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medlens.errors import MedlensError

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("medlens")
# Fabric starts the other processes by re-running the command line, so it must be a script, not "-c"
MEDLENS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "medlens"]
RUN = ["run", "medlens.models:phantom_net", "none"]
COMMON = ["--in-channels", "1", "--batch-size", "4", "--shard-size", "4", "--overlays", "worst:2", "--bootstrap", "50"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return env


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory) -> Path:
    from medlens.data.phantoms import make_phantoms, write_phantoms

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, make_phantoms(24, 32, seed=3))
    return folder


def _factory():
    from medlens.models import build_model

    return build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=2).eval()


def _run(inputs, out, **kwargs):
    from medlens.workflows.dataset_run import run_dataset

    options = dict(batch_size=4, shard_size=4, overlays="worst:2", n_boot=50, accelerator="cpu")
    options.update(kwargs)
    return run_dataset(_factory, inputs, out, **options)


def _table(out: Path):
    from medlens.io.store import read_results

    return read_results(out)


def _maps(out: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(out / "maps.zarr"), mode="r")
    return {name: np.asarray(array[:]) for name, array in group.arrays()} | {
        f"{g}/{name}": np.asarray(array[:]) for g, sub in group.groups() for name, array in sub.arrays()}


def _assert_same_run(a: Path, b: Path) -> None:
    import pandas as pd

    pd.testing.assert_frame_equal(_table(a), _table(b))
    maps_a, maps_b = _maps(a), _maps(b)
    assert maps_a.keys() == maps_b.keys() and maps_a
    for name in maps_a:
        assert np.array_equal(maps_a[name], maps_b[name], equal_nan=True), name
    for name in ("summary.csv",):
        assert (a / name).read_text() == (b / name).read_text()


def _partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and (p.name.endswith(".partial") or (p.name.startswith(".") and ".tmp" in p.name))]


@pytest.fixture(scope="module")
def reference(phantom_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    result = _run([phantom_folder], out, deletion_steps=4)
    assert result.done == 24 and result.failed == 0
    return out


def test_outputs_of_a_run(reference):
    import pandas as pd

    table = pd.read_parquet(reference / "results")
    assert len(table) == 24 and set(table["status"]) == {"ok"}
    assert table["iou@10"].notna().all() and table["pointing_game"].notna().all() and table["deletion_auc"].notna().all()
    manifest = __import__("json").loads((reference / "manifest.json").read_text())
    assert manifest["planned"] == 24 and manifest["done"] == 24 and manifest["complete"] and len(manifest["parts"]) == 6
    assert all(len(p["sha256"]) == 64 for p in manifest["parts"].values())
    assert (reference / "summary.html").exists() and len(list((reference / "overlays").glob("*.png"))) == 2
    maps = _maps(reference)
    assert maps["gradcam/32x32"].shape == (24, 1, 32, 32) and maps["gradcam/32x32"].dtype == np.float16


KILLABLE = """
import sys
from tests.test_scale import _run
_run([sys.argv[1]], sys.argv[2], deletion_steps=4, resume=sys.argv[3] == "resume", workers=int(sys.argv[4]))
"""


def test_kill_9_then_resume_equals_uninterrupted(phantom_folder, reference, tmp_path):
    rng = random.Random(7)
    for trial in range(3):
        out = tmp_path / f"killed{trial}"
        args = [sys.executable, "-c", KILLABLE, str(phantom_folder), str(out)]
        proc = subprocess.Popen(args + ["fresh", str(trial % 2)], env=_env(), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (out / "manifest.json").exists() and proc.poll() is None:  # the run has started
            time.sleep(0.01)
        deadline = time.monotonic() + rng.uniform(0.0, 2.0)  # then kill it at a random point
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        parts_before = sorted(p.name for p in (out / "results").glob("part-*.parquet")) if (out / "results").exists() else []
        for part in parts_before:  # what is visible under a final name is whole
            __import__("pyarrow.parquet").parquet.read_table(out / "results" / part)
        done = subprocess.run(args + ["resume", "0"], env=_env(), cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        _assert_same_run(reference, out)
        assert _partials(out) == []
        print(f"trial {trial}: killed={killed} with {len(parts_before)} of 6 parts written")


def test_two_fabric_processes_equal_one(phantom_folder, reference, tmp_path):
    out = tmp_path / "ddp"
    args = MEDLENS + RUN + [str(phantom_folder)] + COMMON + ["--deletion-steps", "4", "--devices", "2", "--strategy", "ddp"]
    done = subprocess.run(args + ["--out", str(out)], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _assert_same_run(reference, out)
    states = sorted((out / "state").glob("rank-*.json"))
    assert [s.name for s in states] == ["rank-000.json", "rank-001.json"]
    import json

    owned = [set(json.loads(s.read_text())["parts"]) for s in states]
    assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == 6  # disjoint shards, no duplicates


def test_bad_item_in_a_batch_leaves_the_good_ones(phantom_folder, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    names = sorted(p.name for p in phantom_folder.glob("phantom_000[0-5].png"))
    for name in names:
        shutil.copy(phantom_folder / name, folder / name)
    (folder / "phantom_0002b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")  # 4th of 7: mid-batch
    out = tmp_path / "run"
    result = _run([folder], out, workers=2, shard_size=8)
    table = _table(out)
    good = table[table["status"] == "ok"]
    assert sorted(Path(s).name for s in good["source"]) == names
    assert result.done == 6 and result.failed == 1
    bad = table[table["status"] == "error"]
    assert len(bad) == 1 and bad["source"].iloc[0].endswith("phantom_0002b.png")
    assert "phantom_0002b.png" in (out / "bad_files.csv").read_text()
    assert [Path(p).name for p, _ in result.bad] == ["phantom_0002b.png"]


def test_resume_with_a_changed_option_is_refused(phantom_folder, tmp_path):
    out = tmp_path / "run"
    inputs = sorted(phantom_folder.glob("phantom_000[0-3].png"))
    _run(inputs, out)
    with pytest.raises(MedlensError) as info:
        _run(inputs, out, resume=True, map_dtype="float32")
    message = str(info.value)
    assert "\n" not in message and "map_dtype ('float16' -> 'float32')" in message
    with pytest.raises(MedlensError, match="pass --resume"):
        _run(inputs, out)
    again = _run(inputs, out, resume=True, workers=1, overlays="none")  # runtime options may change
    assert again.parts_computed == 0 and again.parts_reused == 1


def test_cli_refusal_is_one_line(phantom_folder, tmp_path):
    out = tmp_path / "run"
    _run(sorted(phantom_folder.glob("phantom_000[0-1].png")), out)
    args = MEDLENS + RUN + [str(p) for p in sorted(phantom_folder.glob("phantom_000[0-1].png"))] + COMMON
    done = subprocess.run(args + ["--out", str(out), "--resume", "--map-dtype", "float32"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "map_dtype" in done.stderr


def _one_shot_reference(values: torch.Tensor, n_boot: int, level: float, seed: int):
    v = values[~torch.isnan(values)].double()
    gen = torch.Generator().manual_seed(seed)
    means = v[torch.randint(0, v.numel(), (n_boot, v.numel()), generator=gen)].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=means.dtype))
    return float(v.mean()), float(lo), float(hi)


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_chunked_bootstrap_equals_one_shot(chunk):
    from medlens.metrics.bootstrap import bootstrap_ci

    gen = torch.Generator().manual_seed(1)
    values = torch.rand(57, generator=gen, dtype=torch.float64)
    values[[3, 10]] = float("nan")
    for seed in (0, 5):
        assert bootstrap_ci(values, 300, 0.95, seed, chunk=chunk) == _one_shot_reference(values, 300, 0.95, seed)


def test_bca_and_evaluate_use_the_chunked_bootstrap():
    from medlens.metrics.bootstrap import bootstrap_ci
    from medlens.workflows.evaluate import bootstrap_ci as evaluate_ci

    values = torch.linspace(0, 1, 40, dtype=torch.float64) ** 2
    assert evaluate_ci(values, 200, seed=3) == _one_shot_reference(values, 200, 0.95, 3)
    mean, lo, hi = bootstrap_ci(values, 500, method="bca", chunk=16)
    assert lo < mean < hi
    assert bootstrap_ci(torch.ones(5), 100, method="bca") == (1.0, 1.0, 1.0)
    with pytest.raises(MedlensError):
        bootstrap_ci(values, 10, method="nope")


def test_precision_and_overlay_options_are_checked(phantom_folder, tmp_path):
    inputs = sorted(phantom_folder.glob("phantom_000[0-1].png"))
    with pytest.raises(MedlensError, match="fp16 needs a CUDA"):
        _run(inputs, tmp_path / "a", precision="fp16")
    with pytest.raises(MedlensError, match="--overlays"):
        _run(inputs, tmp_path / "b", overlays="many")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = _run(inputs, tmp_path / "c", precision="bf16", overlays="all")
    assert result.done == 2 and len(list((tmp_path / "c" / "overlays").glob("*.png"))) == 2


def _no_model():
    raise AssertionError("the model was built although nothing was left to do")


def test_resuming_a_finished_run_builds_no_model_and_a_missing_part_is_recomputed(phantom_folder, reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    from medlens.workflows.dataset_run import run_dataset

    options = dict(batch_size=4, shard_size=4, overlays="worst:2", n_boot=50, deletion_steps=4, resume=True)
    again = run_dataset(_no_model, [phantom_folder], out, **options)
    assert (again.done, again.failed, again.parts_computed, again.parts_reused) == (24, 0, 0, 6)
    assert again.seconds < 2.0
    (out / "results" / "part-000003.parquet").unlink()  # work left: the manifest alone no longer answers
    with pytest.raises(AssertionError, match="model was built"):
        run_dataset(_no_model, [phantom_folder], out, **options)
    redone = _run([phantom_folder], out, deletion_steps=4, resume=True)
    assert redone.parts_computed == 1 and redone.parts_reused == 5
    _assert_same_run(reference, out)
    with pytest.raises(MedlensError, match="map_dtype"):  # a changed configuration is still refused
        run_dataset(_no_model, [phantom_folder], out, **options, map_dtype="float32")


def test_deletion_auc_of_the_runner_equals_perturbation_curve_on_the_plain_model(phantom_folder, tmp_path):
    """The runner scores deletion steps in NHWC with BatchNorm folded into the convolutions: the
    AUCs match ``perturbation_curve`` on the unchanged model, on the same inputs and maps."""
    import zarr

    from medlens.metrics.faithfulness import perturbation_curve
    from medlens.workflows.dataset_run import plan_items
    from medlens.workflows.stream import ExplainDataset

    inputs = sorted(phantom_folder.glob("phantom_000[0-7].png"))
    out = tmp_path / "run"
    _run(inputs, out, deletion_steps=6, map_dtype="float32", shard_size=8, batch_size=8)
    table = _table(out)
    torch.manual_seed(0)  # the runner's seeded model
    model = _factory()
    data = ExplainDataset(plan_items(inputs), 1, None)
    x = torch.stack([data[i]["x"] for i in range(len(data))])
    maps = torch.from_numpy(np.asarray(zarr.open_array(str(out / "maps.zarr" / "gradcam" / "32x32"), mode="r")[:]))[:, 0]
    with torch.no_grad():
        want = perturbation_curve(model, x, maps, torch.tensor(table["target"].to_numpy()), steps=6).auc
    got = torch.tensor(table["deletion_auc"].to_numpy(), dtype=torch.float32)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_deletion_scorer_folds_batchnorm_and_keeps_the_logits():
    from medlens.workflows.dataset_run import _BatchRunner

    torch.manual_seed(0)
    model = _factory()
    for m in model.modules():  # non-trivial running statistics, so folding has something to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    runner = _BatchRunner(model, ["gradcam"], "pred", None, {}, torch.device("cpu"), "32", None, 4, "float16", None, 0.05, 4)
    x = torch.randn(4, 1, 32, 32)
    scorer = runner.scorer(x)
    assert scorer is not model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in scorer.modules())
    with torch.no_grad():
        assert torch.allclose(scorer(x), model(x), atol=1e-5)


def test_explain_with_workers_writes_what_one_process_writes(phantom_folder, tmp_path):
    import shutil

    from medlens.workflows.explain import explain_inputs

    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(phantom_folder.glob("phantom_000[0-4].png")):
        shutil.copy(path, folder / path.name)
    (folder / "phantom_0001b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    torch.manual_seed(0)
    model = _factory()
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        summary = explain_inputs(model, [folder], out, methods=["gradcam"], batch_size=2, progress=False, workers=workers)
        runs[workers] = (out, summary)
    (out0, s0), (out2, s2) = runs[0], runs[2]
    assert [Path(p).name for p, _ in s2.bad] == [Path(p).name for p, _ in s0.bad] == ["phantom_0001b.png"]
    assert [r["source"] for r in s2.written] == [r["source"] for r in s0.written] and len(s0.written) == 5
    names0 = sorted(p.relative_to(out0).as_posix() for p in out0.rglob("*") if p.is_file())
    names2 = sorted(p.relative_to(out2).as_posix() for p in out2.rglob("*") if p.is_file())
    assert names0 == names2
    maps = [n for n in names0 if n.endswith(".npy")]
    assert len(maps) >= 5
    for name in maps:
        assert np.array_equal(np.load(out0 / name), np.load(out2 / name)), name
    with pytest.raises(MedlensError, match="--workers"):
        explain_inputs(model, [folder], tmp_path / "bad", workers=-1, progress=False)


def test_an_input_rewritten_in_place_is_computed_again_on_resume(phantom_folder, tmp_path):
    """Same name, new content: resuming notices it (size / modification time), recomputes only its
    part, and the run then equals a fresh run on the changed files."""
    import os
    import shutil

    folder = tmp_path / "inputs"
    shutil.copytree(phantom_folder, folder)
    out = tmp_path / "run"
    first = _run([folder], out, deletion_steps=4)
    assert first.parts_computed == 6
    target = sorted(folder.glob("phantom_????.png"))[9]  # in part 2 (shard size 4)
    before = _table(out).set_index("source").loc[str(target)]
    image = np.asarray(Image.open(target))
    Image.fromarray(np.ascontiguousarray(image[::-1])).save(target)  # flipped: another map, another box
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a clearly later mtime on coarse clocks
    again = _run([folder], out, deletion_steps=4, resume=True)
    assert (again.parts_computed, again.parts_reused) == (1, 5)
    after = _table(out).set_index("source").loc[str(target)]
    assert after["score"] != before["score"]
    fresh = tmp_path / "fresh"
    _run([folder], fresh, deletion_steps=4)
    _assert_same_run(fresh, out)
    settled = _run([folder], out, deletion_steps=4, resume=True)  # nothing changed since: nothing recomputed
    assert settled.parts_computed == 0
    mask = target.with_name(target.stem + "_mask.png")  # an annotation rewritten in place counts too
    Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    assert _run([folder], out, deletion_steps=4, resume=True).parts_computed == 1


def _classifier_3d():
    from medlens.models import build_model

    return build_model("medlens.models:phantom_net", num_classes=2, in_channels=1, spatial_dims=3).eval()


def test_nifti_maps_of_real_volumes_in_their_own_geometry(hippocampus, tmp_path):
    """``--nifti``: each volume's map in the source's shape and affine, equal to the Zarr map
    brought back to the input's size; planned again identically on resume."""
    import nibabel as nib
    import zarr

    from medlens.core.resample import upsample
    from medlens.workflows.dataset_run import run_dataset

    volumes = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[:3]
    out = tmp_path / "run"
    options = dict(size=(16, 16, 16), batch_size=2, shard_size=2, overlays="none", n_boot=20, map_dtype="float32", nifti=True)
    result = run_dataset(_classifier_3d, volumes, out, **options)
    assert (result.done, result.failed) == (3, 0)
    table = _table(out).sort_values("item")
    maps = zarr.open_array(str(out / "maps.zarr" / "gradcam" / "16x16x16"), mode="r")
    for row in table.itertuples():
        written, source = nib.load(out / row.nifti), nib.load(row.source)
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
        want = upsample(torch.from_numpy(np.asarray(maps[row.map_index, row.target_rank]))[None, None].float(), source.shape)[0, 0]
        np.testing.assert_allclose(np.asarray(written.dataobj), want.numpy(), atol=1e-6)
    assert sorted(p.name for p in (out / "nifti").iterdir()) == sorted(Path(n).name for n in table["nifti"])
    with pytest.raises(MedlensError, match="nifti"):  # resuming without --nifti is a changed configuration
        run_dataset(_classifier_3d, volumes, out, **{**options, "nifti": False}, resume=True)
