"""Multi-process runs on CPU (gloo, loopback only): DDP via torchrun and accelerate launch, FSDP1/FSDP2 via torchrun,
and RankGen generation sharded with accelerate.

Every test launches the example scripts in subprocesses exactly as a user would (``python -m torch.distributed.run``
and ``python -m accelerate.commands.launch`` of this interpreter, so the current environment is used) and compares
what the ranks wrote:

- after data-parallel training, both ranks hold bit-identical adapters (``torch.equal`` on every NTK tensor), and the
  adapter equals the single-process run's (one process, the whole global batch) up to float rounding: the examples
  feed both set-ups the same global batches (sequential sampler, equal-length sequences; see the example's
  docstring), so the only difference is the order of the floating-point sums;
- the gathered RankGen outputs are complete, in input order, and equal to a single-process run's.

Each launch takes 4-10 s on 2 CPU cores; the module about 40 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "distributed_ntk_train.py"
RANKGEN = REPO / "examples" / "rankgen_distributed.py"
TIMEOUT = 300
RTOL, ATOL = 1e-4, 1e-5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)  # never inherit a launcher's variables (e.g. when pytest itself runs under one)
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # kill the ranks too: killing only the launcher would leave them running, orphaned, after the test
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {TIMEOUT} s; killed with its ranks:\n{(stdout + stderr)[-6000:]}"
        )
    output = stdout + stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}"
    return output


def torchrun(script: Path, *args: str, cwd: Path) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    launcher += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return run([*launcher, str(script), *args], cwd)


def accelerate_launch(script: Path, *args: str, cwd: Path) -> str:
    # `accelerate launch --cpu --num_processes 2` would start ONE process (accelerate's simple launcher, no MPI), so
    # describe a 2-process "multi-GPU" launch: on a machine without GPUs the processes run accelerate's MULTI_CPU mode
    # over gloo. A config file in the test's folder keeps any user default config out.
    config = cwd / "accelerate_config.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        "num_machines: 1\n"
        "num_processes: 2\n"
        "machine_rank: 0\n"
        "main_process_ip: 127.0.0.1\n"
        f"main_process_port: {free_port()}\n"
        "rdzv_backend: static\n"
        "same_network: true\n"
        "mixed_precision: 'no'\n"
        "gpu_ids: all\n"
        "use_cpu: false\n"
        "debug: false\n"
    )
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return run([*launcher, str(script), *args], cwd)


def load_example(name: str):
    return load_script(REPO / "examples" / f"{name}.py", f"_example_{name}")


def read_rank(out: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    record = json.loads((out / f"rank{rank}.json").read_text())
    tensors = {k: torch.tensor(v["values"], dtype=torch.float32).view(v["shape"]) for k, v in record["tensors"].items()}
    return record, tensors


def assert_same_keys(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) and len(a) == 4, (sorted(a), sorted(b))  # 2 layers × (ntk_z, ntk_k)


def assert_saved_adapter_equals(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert_same_keys(saved, tensors)
    for key, value in tensors.items():
        assert torch.equal(saved[key], value), key


def check_data_parallel_run(out: Path, single: dict[str, torch.Tensor], single_losses: list[float]) -> dict:
    """Both ranks identical, equal to the single-process adapter within tolerance, saved adapter = rank 0's."""
    record0, rank0 = read_rank(out, 0)
    record1, rank1 = read_rank(out, 1)
    assert (record0["world_size"], record0["per_device_batch"], record0["global_batch"]) == (2, 4, 8)
    assert (record1["rank"], record1["world_size"]) == (1, 2)
    assert_same_keys(rank0, rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
        assert record0["tensors"][key]["sha256"] == record1["tensors"][key]["sha256"]
    assert_same_keys(rank0, single)
    for key in rank0:
        torch.testing.assert_close(rank0[key], single[key], rtol=RTOL, atol=ATOL, msg=f"{key}: 2 ranks vs 1 process")
    # The logged loss is the mean over the global batch in every set-up.
    torch.testing.assert_close(torch.tensor(record0["losses"]), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    assert_saved_adapter_equals(out, rank0)
    return record0


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor], Path]:
    out = tmp_path_factory.mktemp("single")
    run([sys.executable, str(TRAIN), "--output-dir", str(out)], cwd=out)
    record, tensors = read_rank(out, 0)
    assert (record["world_size"], record["per_device_batch"], record["distributed_type"]) == (1, 8, "NO")
    assert not (out / "rank1.json").exists()
    return record, tensors, out


def test_single_process_trains_and_saves_a_loadable_adapter(single_process):
    from peft import PeftModel, get_peft_model_state_dict

    record, trained, out = single_process
    assert len(record["losses"]) == record["steps"] == 4
    example = load_example("distributed_ntk_train")
    initial = get_peft_model_state_dict(example.build_model(0))
    assert_same_keys(initial, trained)
    for key in trained:  # training moved every tensor
        assert (trained[key] - initial[key]).abs().max() > 1e-3, key
    assert_saved_adapter_equals(out, trained)
    reloaded = get_peft_model_state_dict(PeftModel.from_pretrained(example.build_base(0), str(out / "adapter")))
    assert_same_keys(reloaded, trained)
    for key in trained:
        assert torch.equal(reloaded[key], trained[key]), key


def test_torchrun_ddp_matches_single_process(single_process, tmp_path):
    record, single, _ = single_process
    torchrun(TRAIN, "--output-dir", str(tmp_path), cwd=tmp_path)
    result = check_data_parallel_run(tmp_path, single, record["losses"])
    assert (result["launcher"], result["mode"], result["distributed_type"]) == ("torchrun", "trainer", "MULTI_CPU")


def test_accelerate_launch_ddp_matches_single_process(single_process, tmp_path):
    record, single, _ = single_process
    accelerate_launch(TRAIN, "--output-dir", str(tmp_path), cwd=tmp_path)
    result = check_data_parallel_run(tmp_path, single, record["losses"])
    assert (result["launcher"], result["mode"], result["distributed_type"]) == ("accelerate", "trainer", "MULTI_CPU")


@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_on_cpu_matches_single_process(single_process, tmp_path, version):
    """FSDP shards the NTK parameters (each rank holds part of them), trains, and gathers them back for saving."""
    record, single, _ = single_process
    torchrun(TRAIN, "--fsdp", version, "--output-dir", str(tmp_path), cwd=tmp_path)
    result = check_data_parallel_run(tmp_path, single, record["losses"])
    assert result["mode"] == f"fsdp{version}"
    # name -> the shape of each rank's own shard of the parameter, recorded during training
    local = {rank: read_rank(tmp_path, rank)[0]["local_shapes"] for rank in (0, 1)}
    for name in local[0]:
        full = single[name.replace("_fsdp_wrapped_module.", "").removesuffix(".default")].shape
        shards = [torch.Size(local[rank][name]) for rank in (0, 1)]
        if version == "2":  # DTensor shards on dim 0: (H/2, ...) each
            assert shards == [torch.Size([full[0] // 2, *full[1:]])] * 2, (name, shards)
        else:  # FSDP1 (use_orig_params): flat 1-D views of the rank's part of the layer's FlatParameter
            assert all(s.numel() <= full.numel() and len(s) == 1 for s in shards), (name, shards)
            assert sum(s.numel() for s in shards) == full.numel(), (name, shards)


def test_rankgen_generation_sharded_with_accelerate(tmp_path):
    args = ["--num-prompts", "18", "--batch-size", "4", "--max-new-tokens", "8"]
    run([sys.executable, str(RANKGEN), "--output", str(tmp_path / "single.json"), *args], cwd=tmp_path)
    accelerate_launch(RANKGEN, "--output", str(tmp_path / "two.json"), *args, cwd=tmp_path)
    single = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (single["num_processes"], two["num_processes"], two["distributed_type"]) == (1, 2, "MULTI_CPU")
    # 18 prompts = 5 batches of <= 4: rank 0 gets 3 batches (12 prompts), rank 1 gets 2 (6 prompts).
    assert two["shards"] == [{"rank": 0, "prompts": 12}, {"rank": 1, "prompts": 6}]
    prompts = load_example("rankgen_distributed").toy_prompts(18, seed=0)
    results = two["results"]
    assert [r["index"] for r in results] == list(range(18))  # complete and in input order
    assert [r["prompt"] for r in results] == prompts
    for r in results:
        assert r["output"].startswith(r["prompt"] + " "), r  # each output continues its own prompt
        assert r["output"] == f"{r['prompt']} {r['continuation']}" and r["continuation"], r
    # Each global batch has its own seed, so the split does not change the samples.
    assert results == single["results"]
