"""Resume never loses or overwrites work: fault injection on the ImageNet recipe, in process.

Each test damages a run the way real runs get damaged (marker deleted, newest checkpoint
truncated in each of its files, disk full while saving, run folder moved, read-only output
folder), then runs the same command again and checks that the final weights equal those of an
uninterrupted run *bitwise*, that no existing step folder was written over, and what was said.
Runs go through ``dfm_ext.recipes.imagenet.task.main`` in this process (the real command path, with
its config parsing and exit statuses), so faults can be injected with ``monkeypatch``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfm_ext.recipes.engine.checkpoint import (
    MANIFEST,
    CorruptCheckpointError,
    verify_manifest,
    write_manifest,
)
from dfm_ext.recipes.engine.config import ConfigError
from dfm_ext.recipes.imagenet.task import main as imagenet_main

from _recipe_fixtures import recipe_env, tiny_argv, tiny_image_assets, wait_for_checkpoint

STEPS = 12  # checkpoints at 4, 8, 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return tiny_image_assets(tmp_path_factory.mktemp("fault_assets"))


def _run(assets: Path, out: Path, steps: int = STEPS, *extra: str) -> int:
    return imagenet_main(tiny_argv(
        assets / "images", assets, out, steps,
        "train.checkpoint_every=4",
        "train.keep_checkpoints=10",
        "train.log_every=1",
        "train.sample_every=0",
        "train.trackers=[]",
        "train.progress=false",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        *extra,
    ))  # fmt: skip


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def _assert_same_weights(out: Path, reference: Path) -> None:
    a, b = _weights(out), _weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _fingerprint(folder: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of every file: a folder written over (or re-created) changes it."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(assets: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_runs") / "reference"
    assert _run(assets, out) == 0
    return out


def test_checkpoints_carry_a_completeness_record(reference: Path) -> None:
    step = reference / "checkpoints" / "step-000012"
    record = verify_manifest(step)
    assert record["step"] == 12
    assert set(record["files"]) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "extra_state.pt"}
    for name, entry in record["files"].items():
        assert entry["size"] == (step / name).stat().st_size and len(entry["sha256"]) == 64


def test_deleted_marker_resumes_from_newest_and_overwrites_nothing(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _run(assets, out, steps=8) == 0
    ckpts = out / "checkpoints"
    (ckpts / "latest").unlink()
    before = {name: _fingerprint(ckpts / name) for name in ("step-000004", "step-000008")}
    capsys.readouterr()
    assert _run(assets, out) == 0
    assert f"resumed from {ckpts / 'step-000008'} at step 8" in capsys.readouterr().out
    # Old behaviour: restarted at step 0 and replaced step-4 and step-8 (new inodes), logging 1..8 twice.
    assert {name: _fingerprint(ckpts / name) for name in before} == before
    assert _logged_steps(out) == list(range(1, STEPS + 1))
    assert (ckpts / "latest").read_text().strip() == "step-000012"
    _assert_same_weights(out, reference)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "extra_state.pt"])
def test_truncated_newest_checkpoint_falls_back_with_one_warning(
    assets: Path, reference: Path, tmp_path: Path, capsys, victim: str
) -> None:
    out = tmp_path / "run"
    assert _run(assets, out, steps=8) == 0
    ckpts = out / "checkpoints"
    file = ckpts / "step-000008" / victim
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert _run(assets, out) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, captured.err
    assert str(ckpts / "step-000008") in warnings[0] and victim in warnings[0] and "truncated" in warnings[0]
    assert f"resumed from {ckpts / 'step-000004'} at step 4" in captured.out
    # The damaged folder is kept aside, untouched; the run wrote step 8 anew beside it.
    assert (ckpts / "corrupt-step-000008" / victim).stat().st_size == len(data) // 2
    verify_manifest(ckpts / "step-000008")
    _assert_same_weights(out, reference)


def test_damaged_byte_is_caught_by_the_hash(tmp_path: Path) -> None:
    folder = tmp_path / "step-000003"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "shard.distcp").write_bytes(b"y" * 10)
    record = write_manifest(folder, step=3)
    assert set(record["files"]) == {"model.safetensors", "sub/shard.distcp"}
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(500)
        f.write(b"z")  # same size, one byte changed
    verify_manifest(folder, hashes=False)  # sizes alone cannot see it
    with pytest.raises(CorruptCheckpointError, match=r"step-000003: model.safetensors does not match its sha256"):
        verify_manifest(folder)
    (folder / "sub" / "shard.distcp").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"sub/shard.distcp is missing"):
        verify_manifest(folder, hashes=False)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="complete.json is unreadable"):
        verify_manifest(folder)


def test_a_step_folder_without_its_record_is_not_resumed_from(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    """A folder without complete.json was never finished: resume=auto warns, moves it aside, resumes the older one."""
    out = tmp_path / "run"
    assert _run(assets, out, steps=8) == 0
    ckpts = out / "checkpoints"
    (ckpts / "step-000008" / MANIFEST).unlink()
    capsys.readouterr()
    assert _run(assets, out) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {ckpts / 'step-000008'} is damaged" in err and "no complete.json" in err
    assert (ckpts / "corrupt-step-000008").is_dir()
    _assert_same_weights(out, reference)


def test_disk_full_names_the_path_and_the_partial_folder_goes_at_next_start(
    assets: Path, reference: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import accelerate.checkpointing

    real_save = accelerate.checkpointing.save

    def save_until_full(obj, f, *args, **kwargs):
        if "tmp-step-000008" in str(f) and str(f).endswith("optimizer.bin"):
            Path(f).write_bytes(b"\0" * 100)  # what got written before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_until_full)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    capsys.readouterr()
    assert _run(assets, out) == 1  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "the disk is full" in err[0], err
    assert str(ckpts / "tmp-step-000008") in err[0]
    assert (ckpts / "tmp-step-000008").is_dir() and not (ckpts / "step-000008").exists()
    monkeypatch.setattr(accelerate.checkpointing, "save", real_save)

    capsys.readouterr()
    assert _run(assets, out, steps=4) == 0  # a start that trains nothing and saves nothing
    assert not (ckpts / "tmp-step-000008").exists()
    assert "removed the partial folder" in capsys.readouterr().err
    assert _run(assets, out) == 0
    _assert_same_weights(out, reference)


def test_moved_run_folder_resumes(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    assert _run(assets, first, steps=8) == 0
    moved.parent.mkdir()
    shutil.move(first, moved)
    capsys.readouterr()
    assert _run(assets, moved) == 0  # old behaviour: "cannot resume ... differs in ['train.output_dir']"
    assert f"resumed from {moved / 'checkpoints' / 'step-000008'} at step 8" in capsys.readouterr().out
    _assert_same_weights(moved, reference)


def test_explicit_older_resume_would_overwrite_and_is_refused(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    capsys.readouterr()
    assert _run(assets, out, STEPS, f"train.resume={out / 'checkpoints' / 'step-000008'}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "step-000012" in err and "write over" in err


def test_read_only_output_folder_is_one_line_before_compute(
    assets: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from dfm_ext.recipes.engine.trainer import Trainer

    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permissions: refuse writes there as a read-only mount would
        real_open = os.open

        def read_only_open(path, flags, *args, **kwargs):
            if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)

    def no_compute(self):
        raise AssertionError("the accelerator was built before the output folder was checked")

    monkeypatch.setattr(Trainer, "_accelerator", no_compute)
    try:
        assert _run(assets, out) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: train.output_dir={str(out)!r} is not writable")


def test_non_finite_loss_stops_before_anything_non_finite_is_saved(assets: Path, tmp_path: Path) -> None:
    """The loss is checked once per log/checkpoint step (no device sync per step); a diverged run
    raises there, before the checkpoint of that step is written."""
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite loss at a step in"):
        _run(assets, out, 12, "optim.lr=1e12", "optim.warmup_steps=0", "train.log_every=4")
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        weights = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values()), ckpt.name


# -- one owner per run folder, a real full disk, the config a checkpoint was written with ----------------

_SLOW_RUN = """
import sys, time
from dfm_ext.recipes.engine import trainer
step = trainer.Trainer._step
trainer.Trainer._step = lambda self, run: (time.sleep(0.25), step(self, run))[1]  # slower, same maths
from dfm_ext.recipes.imagenet.task import main
sys.exit(main(sys.argv[1:]))
"""


def _launch(assets: Path, out: Path) -> subprocess.Popen:
    """The same run as :func:`_run` in its own process, 0.25 s slower per step (the window the faults need)."""
    argv = tiny_argv(assets / "images", assets, out, STEPS, "train.checkpoint_every=4", "train.keep_checkpoints=10", "train.log_every=1",
                     "train.sample_every=0", "train.trackers=[]", "train.progress=false", "optim.lr=3e-3", "optim.warmup_steps=2")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=recipe_env())


def _assert_logged_once(out: Path, steps: int = STEPS) -> None:
    assert _logged_steps(out) == list(range(1, steps + 1))


def test_two_launches_at_once_one_trains_the_other_names_it(assets: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = [_launch(assets, out), _launch(assets, out)]
    results = [(p.wait(timeout=600), p.stderr.read(), p.pid) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    (_, _, winner), (_, err, _) = sorted(results, key=lambda r: r[0])
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"train.output_dir={str(out)!r} is in use by process {winner} on host {socket.gethostname()}" in err, err
    _assert_same_weights(out, reference)
    _assert_logged_once(out)
    assert (out / "run.lock").read_text() == ""  # released at the end


def test_second_launch_mid_run_is_refused_before_touching_anything(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    from dfm_ext.recipes.engine import trainer

    out = tmp_path / "run"
    first = _launch(assets, out)
    try:
        wait_for_checkpoint(first, out)
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        built = []
        with pytest.MonkeyPatch.context() as m:  # the refusal comes before any model is built
            m.setattr(trainer.Trainer, "_step", lambda *a: built.append(1))
            capsys.readouterr()
            assert _run(assets, out) == 2
        err = capsys.readouterr().err
        assert f"is in use by process {first.pid}" in err and "wait for that run to end" in err, err
        assert not built and set(before) <= {p.name for p in (out / "checkpoints").iterdir()}
    finally:
        assert first.wait(timeout=600) == 0, first.stderr.read()
    _assert_same_weights(out, reference)
    _assert_logged_once(out)


def test_a_dead_owners_lock_is_taken_over_with_one_notice(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "command": "x"}))
    capsys.readouterr()
    assert _run(assets, out) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "taking over" in line]
    assert len(notices) == 1 and f"process {pid} on host" in notices[0] and "no longer running" in notices[0], notices
    _assert_same_weights(out, reference)


def test_lock_without_flock_checks_the_owners_process(tmp_path: Path, monkeypatch) -> None:
    """Where the filesystem has no flock: a live owner on this host refuses, one on another host cannot be checked."""
    import fcntl

    from dfm_ext.recipes.engine.runlock import RunFolderBusy, RunLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host, needle in [(socket.gethostname(), f"process {live.pid}"), ("elsewhere", "delete")]:
            (tmp_path / "run.lock").write_text(json.dumps({"pid": live.pid, "host": host}))
            with pytest.raises(RunFolderBusy, match=needle):
                RunLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
    assert "no longer running" in RunLock(tmp_path).acquire()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 9 MiB tmpfs (room for two of the tiny run's 3.2 MB checkpoints, not three); skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_is_named_and_the_run_resumes(assets: Path, reference: Path, small_tmpfs: Path, capsys) -> None:
    out = small_tmpfs / "run"
    capsys.readouterr()
    assert _run(assets, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[0] and str(out / "checkpoints" / "tmp-step-000012") in err[0], err
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-000004", "step-000008"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)  # the user frees space
    assert _run(assets, out) == 0
    assert "removed the partial folder" in capsys.readouterr().err
    _assert_same_weights(out, reference)
    _assert_logged_once(out)


def test_disk_full_while_writing_final_is_named(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    import safetensors.torch

    real = safetensors.torch.save_model

    def full(model, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 100)  # what got written before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(safetensors.torch, "save_model", full)
        capsys.readouterr()
        assert _run(assets, out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[0] and f"the final model {out / 'final'}" in err[0], err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "final"))) == []  # nothing partial left
    assert (out / "checkpoints" / "step-000012").is_dir()
    assert safetensors.torch.save_model is real
    assert _run(assets, out) == 0  # resumes at the last step: only final/ is written
    _assert_same_weights(out, reference)


def test_lost_config_yaml_resume_is_checked_against_the_checkpoints_config(assets: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _run(assets, out, 8) == 0
    (out / "config.yaml").unlink()
    capsys.readouterr()
    assert _run(assets, out, STEPS, "optim.lr=1e-3") == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {out / 'checkpoints' / 'step-000008'}: its config differs in ['optim.lr']" in err, err


def test_resumed_steps_are_logged_once(assets: Path, reference: Path, tmp_path: Path, capsys) -> None:
    """A crash after logging step 10 but before checkpoint 12: the replayed steps 9-12 are not logged twice."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-000012")
    shutil.rmtree(out / "final")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:10]) + lines[10][:7])  # the log of step 11 cut short
    assert _run(assets, out) == 0
    assert "dropped 3 line(s) after step 8" in capsys.readouterr().err
    _assert_logged_once(out)
    _assert_same_weights(out, reference)


def test_shared_hashing_merges_to_the_single_process_record(tmp_path: Path) -> None:
    from dfm_ext.recipes.engine.checkpoint import hash_share
    from dfm_ext.recipes.engine.checkpoint import shared_verify

    for name in ("a", "b", "c", "sub/d"):
        (tmp_path / "one" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "one" / name).write_text(name * 100)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    single = write_manifest(tmp_path / "one", step=1)
    for rank in range(3):  # three processes' shares, then the main process's merge
        hash_share(tmp_path / "two", rank, 3)
    assert write_manifest(tmp_path / "two", step=1) == single
    assert not list((tmp_path / "two").glob(".complete-part-*"))
    # Another process's share being written atomically (its temporary file, seen by a slower process's listing, was
    # hashed and vanished mid-read: FileNotFoundError on 2 FSDP2 ranks) is not part of the payload.
    (tmp_path / "one" / "complete.json").unlink()
    (tmp_path / "one" / "..complete-part-1.json.ab12cd.tmp").write_text("{}")
    assert "..complete-part-1.json.ab12cd.tmp" not in hash_share(tmp_path / "one", 0, 1, write=False)
    (tmp_path / "two" / "c").write_text("C" * 100)  # same size, another byte: only the share holding c sees it
    verdicts = []
    for rank in range(2):
        try:
            verify_manifest(tmp_path / "two", share=(rank, 2))
            verdicts.append(None)
        except CorruptCheckpointError as e:
            verdicts.append(str(e))
    assert sum(v is not None for v in verdicts) == 1
    for rank in range(2):  # every process raises the same error, whichever share held the damage
        with pytest.raises(CorruptCheckpointError, match="c does not match"):
            shared_verify(rank, 2, lambda mine: verdicts)(tmp_path / "two")


def test_a_run_folder_some_process_cannot_see_is_refused(tmp_path: Path) -> None:
    """Every process checks that it reads the main process's run.lock (tests/test_recipes_fsdp.py's two-process runs
    are the shared case); a node-local train.output_dir is named with the processes and hosts that miss it."""
    from dfm_ext.recipes.engine.runlock import RunLock, check_shared_folder, lock_record

    lock = RunLock(tmp_path / "run")
    assert lock_record(tmp_path / "run") == "" and lock_record(tmp_path / "absent") == ""
    lock.acquire()
    record = lock_record(tmp_path / "run")
    assert '"pid"' in record
    check_shared_folder(tmp_path / "run", [(0, "a", True), (1, "a", lock_record(tmp_path / "run") == record)])
    with pytest.raises(ConfigError, match=r"not one folder for every process: process 2 on node-b, process 3 on node-b .*run\.lock"):
        check_shared_folder(tmp_path / "run", [(0, "a", True), (1, "a", True), (2, "node-b", False), (3, "node-b", False)])
    lock.release()

