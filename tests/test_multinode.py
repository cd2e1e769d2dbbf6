"""Two nodes on one machine (issue 18): two torchrun launchers with the c10d rendezvous on 127.0.0.1, one rank each
(gloo on CPU), each node in a working folder of its own (its own copy of the data and the VAE, its own latent cache
and run folder, all relative paths in one config), so nothing is shared by accident.

The run trains, evaluates, saves, loses node 1's rank to SIGKILL at step 5, resumes with `--resume latest` on both
nodes (rank 0 reads the checkpoint from its disk and sends it to rank 1, whose disk holds none) and must end bit for bit
where an uninterrupted single-node run of 2 ranks and the same global batch ends. Node ranks are fixed by torchrun's
--local-addr (c10d orders nodes by it): 127.0.0.1 for node 0, 127.0.0.2 for node 1.
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import yaml

from reliability_helpers import TRAINING_STATE, ckpt_files, differences, launch, make_world, record, run_to_end
from model.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # starts torchrun (2 or 3 processes) five times


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny VAE and 4 synthetic clips of 8 16x16 frames (1 for validation), and the config every node uses, with
    paths relative to the node's working folder. 15 training windows, global batch 4 = 2 ranks x 2: 3 steps an
    epoch, so 8 steps cross two epochs and the kill at step 5 falls mid-epoch."""
    w = make_world(tmp_path_factory.mktemp("multinode_world"), data={"val_fraction": 0.25},
                   eval={"visualize_every": 4, "vis_clips": 1, "every": 4, "clips": 2})
    w.raw["data"]["root"], w.raw["vae"]["pretrained"], w.raw["cache"]["dir"] = "world", "vae", "cache"
    return w


def node_folder(world, folder: Path) -> Path:
    """A node's working folder: its own copies of the frames and the VAE (mtimes kept, as `rsync -a` keeps them: the
    latent cache's key hashes them) and config.yaml; its cache and run folder are made there by the run."""
    for what in ("world", "vae"):
        shutil.copytree(world.root / what, folder / what)
    (folder / "config.yaml").write_text(yaml.safe_dump(world.config(Path("runs"), "r"), sort_keys=False))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(folders: list[Path], args: list[str], tmp: Path, faults: str = "", timeout: float = 240):
    """Both nodes' launchers, node i in folders[i] with --local-addr 127.0.0.(i+1); waits for both: [(rc, run)]."""
    port = free_port()
    runs = [launch(["--config", "config.yaml", *args], tmp, nproc=1, faults=faults, cwd=folder, standalone=False,
                   torchrun_args=("--nnodes=2", f"--node_rank={i}", "--rdzv_backend=c10d",
                                  f"--rdzv_endpoint=127.0.0.1:{port}", f"--local-addr=127.0.0.{i + 1}"))
            for i, folder in enumerate(folders)]
    return [(run.wait(timeout), run) for run in runs]


def cache_manifests(folder: Path) -> list[Path]:
    return sorted((folder / "cache").glob("*/manifest.json"))


def test_two_nodes_with_their_own_disks_are_killed_resume_and_end_as_one_node(world, tmp_path):
    # ---- the uninterrupted single-node run: 2 ranks, the same global batch
    single = node_folder(world, tmp_path / "single")
    rc, run = run_to_end(["--config", "config.yaml"], tmp_path, nproc=2, cwd=single)
    assert rc == 0, run.tail()
    reference = load_checkpoint(ckpt_files(single / "runs" / "r")[8])
    seconds = {"single_node": run.seconds}

    # ---- two nodes; node 1's rank is SIGKILLed at step 5, after the step-4 checkpoint (on node 0's disk only)
    nodes = [node_folder(world, tmp_path / f"node{i}") for i in (0, 1)]
    (rc0, run0), (rc1, run1) = two_nodes(nodes, [], tmp_path, faults="kill:rank=1:step=5")
    assert run1.time_of(r"\[rank 1\] VP_FAULTS: kill at step 5") is not None, run1.tail()
    assert rc0 != 0 and rc1 != 0, (run0.tail(), run1.tail())
    seconds["killed"] = max(run0.seconds, run1.seconds)
    assert sorted(ckpt_files(nodes[0] / "runs" / "r")) == [2, 4], run0.tail()
    assert (nodes[0] / "runs" / "r" / "eval" / "step_0000004.json").is_file()  # evaluated (all ranks), rank 0 wrote
    assert sorted(p.name for p in (nodes[0] / "runs" / "r" / "samples").glob("*.png")) == ["step_0000004.png"]
    assert not (nodes[1] / "runs").exists()  # rank 1 writes nothing into its own run folder
    assert "latent cache: cache.dir cache is not shared by all ranks" in run0.out, run0.tail()
    for node in nodes:  # each node built and verified its own copy of the cache
        assert len(cache_manifests(node)) == 1, node

    # ---- both nodes again with --resume latest: rank 0 reads step 4 and sends it to rank 1
    (rc0, run0), (rc1, run1) = two_nodes(nodes, ["--resume", "latest"], tmp_path)
    assert rc0 == 0 and rc1 == 0, (run0.tail(), run1.tail())
    seconds["resumed"] = max(run0.seconds, run1.seconds)
    assert run0.time_of(r"resumed from \S*ckpt_000000004\.pt at step 4") is not None, run0.tail()
    assert run0.time_of(r"latent cache: using") is not None, run0.tail()
    assert not (nodes[1] / "runs").exists()
    final = load_checkpoint(ckpt_files(nodes[0] / "runs" / "r")[8])
    assert differences(final, reference, TRAINING_STATE) == []

    # ---- the nodes swapped (the run's node is now node rank 1): refused by both, naming the step it would skip
    (rc0, run0), (rc1, run1) = two_nodes(nodes[::-1], ["--resume", "latest"], tmp_path, timeout=120)
    for rc, run in ((rc0, run0), (rc1, run1)):
        assert rc != 0 and "exitcode: 2" in run.out, run.tail()
    for rank, run in ((0, run0), (1, run1)):
        assert (f"[rank {rank}] resume error: rank 0 finds no checkpoint in runs/r/checkpoints, but the same folder "
                "on rank 1's node holds step 8") in run.out, run.tail()
    seconds["refused"] = max(run0.seconds, run1.seconds)
    record("issue18 two nodes", nodes=2, ranks_per_node=1, killed_at_step=5, resumed_at_step=4, bitwise_equal=True,
           **{f"seconds_{k}": round(v, 1) for k, v in seconds.items()})


def _two_ranks(rank: int, store_file: str, folders: list[str], out: str) -> None:
    """One of 2 gloo ranks: which ranks share its cache folder, and whether different weights pass the start check."""
    import json
    import torch
    import torch.distributed as dist
    from data.latent_cache import sharing_ranks
    from training.distributed import DistInfo
    from training.resume import check_same_start

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    info = DistInfo(rank, 2)
    result = {"own": sharing_ranks(Path(folders[rank]), info), "shared": sharing_ranks(Path(folders[0]), info)}
    torch.manual_seed(0)
    check_same_start(torch.nn.Linear(3, 2), 4, info)  # the same weights and step: passes
    torch.manual_seed(rank)
    try:
        check_same_start(torch.nn.Linear(3, 2), 4, info)
    except RuntimeError as e:
        result["refused"] = str(e)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_ranks_find_which_share_a_folder_and_refuse_different_starting_weights(tmp_path):
    """sharing_ranks: two folders (node-local disks) give two groups, one folder (a shared filesystem) one group, and
    no token file is left behind. check_same_start: ranks that would start from different weights are refused."""
    import json
    import torch.multiprocessing as mp

    folders = [str(tmp_path / "node0" / "cache"), str(tmp_path / "node1" / "cache")]
    mp.spawn(_two_ranks, args=(str(tmp_path / "store"), folders, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in (0, 1):
        assert results[r]["own"] == [[0], [1]]
        assert results[r]["shared"] == [[0, 1], [0, 1]]
        assert results[r]["refused"].startswith("ranks start from different states (step, weights digest): rank 0:")
        assert "rank 1: (4, " in results[r]["refused"]
    assert [p.name for p in Path(folders[0]).iterdir()] == [] and [p.name for p in Path(folders[1]).iterdir()] == []
