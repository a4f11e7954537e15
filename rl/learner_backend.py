"""How the learner applies gradients: plain torch (one process) or DeepSpeed ZeRO (N data-parallel ranks).

Both backends expose the same small interface to `rl.learner.Learner`:
    backward(loss, boundary)   accumulate one micro-batch (boundary=True on the last one of an optimizer step)
    step(step_index) -> (grad_norm, applied)   schedule lr, clip, step; a non-finite loss/gradient skips the step
    all_reduce_sum(tensor)     sum over ranks (identity with one process)
    grad_average               how many ranks' gradients are averaged (the learner divides its loss normaliser by it)
    sync_forwards              True when every rank must run the same number of forward passes (ZeRO-3)
    gathered(params)           context in which ZeRO-3 partitioned params are whole (for weight sync)
    state_dict() / load_state_dict()   this rank's state (torch: the optimizer; DeepSpeed: its layout only)
    save_files(dir) / load_files(dir)   files the rank writes/reads itself beside it (DeepSpeed's checkpoint)

Low-precision weights: TorchBackend steps fp32 masters (rl.optim.MasterWeights), ZeRO its fp32 partitions.
DeepSpeed is imported only when that backend is built. On CPU its shared-memory collective op (a C++ extension
compiled on first use, ~80 s on 2 cores) is switched off: gloo does the collectives.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import torch

from rl.optim import MasterWeights, OptimConfig, apply_lr, clip_grads, make_optimizer


class TorchBackend:
    """One process. Low-precision (bf16/fp16) trainable params get fp32 master copies (`rl.optim.MasterWeights`):
    the optimizer steps the masters and the model params are their round-to-nearest copies, so updates far below a
    bf16 ulp (lr 1e-6 on O(1) weights) accumulate instead of rounding away. master_weights=False steps the
    low-precision params in place (measurably stalls; kept for the test that shows it)."""
    rank = 0
    world_size = 1
    grad_average = 1
    sync_forwards = False

    def __init__(self, module: torch.nn.Module, groups: list[dict], optim: OptimConfig, grad_clip: float | None,
                 *, master_weights: bool = True):
        self.module = module
        self.optim_config = optim
        self.grad_clip = grad_clip
        self.masters = MasterWeights(groups) if master_weights else None
        if self.masters is not None and not self.masters.pairs:
            self.masters = None  # every trainable param is fp32 already: nothing to keep twice
        self.optimizer = make_optimizer(self.masters.groups if self.masters else groups, optim)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._bad = False

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        del boundary
        if not bool(torch.isfinite(loss.detach())):
            self._bad = True  # never let a NaN into the gradients; the step will be skipped
            return
        loss.backward()
        if self.masters is not None:
            self.masters.accumulate_grads()  # micro-batch gradients add up in fp32, not in bf16

    def step(self, step_index: int) -> tuple[float, bool, float]:
        """-> (grad norm before clipping, whether the step was applied, lr used)."""
        lr = apply_lr(self.optimizer, step_index, self.optim_config)
        norm = float(clip_grads(self.params, self.grad_clip)) if not self._bad else float("nan")
        applied = not self._bad and bool(torch.isfinite(torch.tensor(norm)))
        if applied:
            self.optimizer.step()
            if self.masters is not None:
                self.masters.copy_to_model()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            self.masters.zero_model_grads()
        self._bad = False
        return norm, applied, lr

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gathered(self, params):
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state and, with low-precision params, the fp32 masters (CPU copies, in param order)."""
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.masters is not None:
            state["fp32_masters"] = self.masters.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ("fp32_masters" in state) != (self.masters is not None):
            have = "has" if self.masters is not None else "has no"
            saved = "fp32 weights" if self.masters is not None else "bf16/fp16 weights (fp32 masters)"
            raise ValueError(f"learner state: fp32_masters {'missing' if self.masters else 'unexpected'} (saved by a "
                             f"learner with {saved}, this learner {have} low-precision trainable params; resume "
                             "with the same model.dtype: unset, it is bfloat16 on GPUs and float32 on CPU)")
        if self.masters is not None:
            self.masters.load(state["fp32_masters"])  # also refreshes the model params from them
        self.optimizer.load_state_dict(state["optimizer"])

    # Checkpoints: everything is in state_dict(), which the rank writes itself (rl.learner_shards).
    owns_module_state = False

    def save_files(self, folder: str | os.PathLike) -> None:
        del folder

    def load_files(self, folder: str | os.PathLike) -> None:
        del folder


# ------------------------------------------------------------------------------------------- torch.distributed
def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on `host`'s interface (rank 0 picks it on its node; the others are told)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def init_distributed(rank: int, world_size: int, port: int, host: str = "127.0.0.1",
                     backend: str | None = None) -> None:
    """Join the learner process group (gloo on CPU, nccl on GPU) at tcp://host:port; loopback by default."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": host, "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0" if not torch.cuda.is_available() else
                       os.environ.get("LOCAL_RANK", "0")})
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size)


def _disable_cpu_shm_comm() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce op when it creates its comm backend;
    gloo does the same job here, so mark the op unavailable instead of compiling it in every fresh environment."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedBackend:
    """ZeRO-2/3 data parallelism over the current torch.distributed group (init_distributed first)."""

    def __init__(self, module: torch.nn.Module, groups: list[dict], optim: OptimConfig, grad_clip: float | None,
                 *, zero_stage: int = 2, bf16: bool = False, offload_optimizer: bool = False):
        import deepspeed
        import torch.distributed as dist

        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"learner.zero_stage: {zero_stage} not in 0, 1, 2, 3")
        _disable_cpu_shm_comm()
        if not dist.is_initialized():  # one rank without a launcher: a world of one on loopback
            init_distributed(0, 1, free_port())
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.grad_average = self.world_size  # DeepSpeed averages gradients over data-parallel ranks
        self.sync_forwards = zero_stage == 3
        self.zero_stage = zero_stage
        self.optim_config = optim
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,  # boundaries are set explicitly (set_gradient_accumulation_boundary)
            "train_batch_size": self.world_size,
            "gradient_clipping": float(grad_clip or 0.0),
            "zero_optimization": {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": False},
            "bf16": {"enabled": bool(bf16), "check_grad_overflow": True},
            "zero_allow_untested_optimizer": True,
            # ZeRO-Offload: the optimizer state and step live in host memory; the step stays our AdamW (its lr
            # schedule is ours), which DeepSpeed only allows with zero_force_ds_cpu_optimizer off.
            **({"zero_force_ds_cpu_optimizer": False} if offload_optimizer else {}),
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if offload_optimizer:
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu",
                                                                "pin_memory": torch.cuda.is_available()}
        optimizer = make_optimizer(groups, optim)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.module = self.engine.module

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        # A non-finite loss still goes through backward (every rank must run the same reductions); its NaN
        # gradients make the global norm invalid on all ranks and DeepSpeed skips the step and clears them.
        # What DeepSpeedEngine.forward does first: the learner calls the module directly, never the engine, and
        # without this ZeRO-3 never advances micro_step_id, so each micro-batch's gradient replaced the last's.
        self.optimizer.clear_backward_seen_flag()
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, step_index: int) -> tuple[float, bool, float]:
        factor_lr = apply_lr(self.optimizer, step_index, self.optim_config)
        skipped = self.engine.skipped_steps
        self.engine.step()
        applied = self.engine.skipped_steps == skipped
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if not applied:
            norm = float("nan")
        return norm, applied, factor_lr

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def gathered(self, params):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    # Checkpoints: DeepSpeed's own per-rank files (engine.save_checkpoint / load_checkpoint), written and read by
    # the rank itself; state_dict() carries only the layout they need to match.
    checkpoint_tag = "zero"  # DeepSpeed's tag: the folder under the shard directory that holds its files
    owns_module_state = True  # its files hold the whole module (value model and adapters included)

    def state_dict(self) -> dict[str, Any]:
        """Layout only (no tensors): ZeRO stage, world size, rank. The optimizer shard, fp32 masters and module
        state are in DeepSpeed's files (save_files)."""
        return {"zero_stage": self.zero_stage, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the saved layout against this learner's (load_files then reads DeepSpeed's files)."""
        for key, want in (("zero_stage", self.zero_stage), ("world_size", self.world_size), ("rank", self.rank)):
            if state.get(key) != want:
                raise ValueError(f"learner state: saved with {key}={state.get(key)}, this learner has {want}")

    def save_files(self, folder: str | os.PathLike) -> None:
        """Every rank writes its own ZeRO shard (optimizer state and fp32 master partitions; under ZeRO-3 also its
        module partition) into folder/<tag>/; rank 0 also writes the module state (ZeRO-1/2: whole weights).
        Collective: all ranks call it. Nothing is copied for the caller."""
        self.engine.save_checkpoint(str(folder), tag=self.checkpoint_tag, save_latest=False)

    def load_files(self, folder: str | os.PathLike) -> None:
        """Restore the module, optimizer shard, fp32 masters and step counters from save_files' folder (this
        engine must be freshly built: ZeRO-3 refreshes its partitioned weights from the masters). Collective."""
        path, _ = self.engine.load_checkpoint(str(folder), tag=self.checkpoint_tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"{folder}/{self.checkpoint_tag}: DeepSpeed found no checkpoint files")
