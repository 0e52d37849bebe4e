"""Data parallelism with the standard PyTorch stack (DESIGN §2 distributed): torchrun + torch.distributed, DDP or
FSDP2, gloo on CPU and nccl on GPU, torch.distributed.checkpoint (DCP) for the optimizer. No home-made RPC.

Under `torchrun` (RANK / WORLD_SIZE in the environment) each of the P ranks samples B/P of the step's B prompts with
its own engine replica (the G samples of a prompt stay on one rank, so E4's group advantages are exact). The rollouts
are then gathered, so every rank holds the *global* batch: advantages, E5's constant C, E8's mini-batch split and
every diagnostic keep their one-process meaning. Only the forward/backward work is divided: each rank runs its share
of the live rows of each E8 mini-batch, the loss is scaled by P because DDP and FSDP average gradients over ranks, so
the reduced gradient is the one-process sum. Without torchrun, `Parallel()` is one process and every helper here is
the identity: a single-process run is bitwise what it was. Layout, commands and figures: docs/scaling.md.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from stablerl.config import Config, ConfigError
from stablerl.engine import Rollout
from stablerl.errors import UserError
from stablerl.rewards import ScoreResult
from stablerl.sequences import Packed, PolicyLogProbs, policy_logprobs


class PolicyForward(nn.Module):
    """`policy_logprobs` as one module's forward. DDP must see the LM head (applied in chunks after the backbone's
    forward) inside the forward it wraps: otherwise it would find lm_head unused after the forward, then meet its
    gradient in the backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, packed: Packed, routes: torch.Tensor | None, **kw) -> tuple:
        out = policy_logprobs(self.model, packed, routes, **kw)
        # a tuple of tensors: DDP looks for the graph's outputs in what the forward returns
        return out.logp, out.routes, torch.tensor(out.entropy_sum)


class Parallel:
    """This process's place in the job: rank, world size, how the model is wrapped, and the collectives the trainer
    uses. `Parallel()` is a single process (no process group)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, kind: str = "none"):
        self.rank, self.world, self.local_rank, self.kind = rank, world, local_rank, kind
        self._ddp: nn.Module | None = None

    @classmethod
    def setup(cls, cfg: Config) -> Parallel:
        """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a single process without it.
        Collectives time out after train.dist_timeout seconds, so a rank that hangs stops the job instead of
        freezing it (a rank that dies is seen at once by torchrun, which stops the others)."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        B = cfg.train.batch_prompts
        if B % world:
            raise ConfigError(f"train.batch_prompts: {B} prompts do not split over {world} processes (each samples "
                              f"B/P whole groups); use a multiple of {world}, or another process count")
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.train.dist_timeout))
        return cls(rank, world, local, cfg.train.parallel)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    # ---- who does what ----------------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """A process group exists (launched by torchrun), even with one process."""
        return self.kind != "none"

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes metrics, samples, plots and weights."""
        return self.rank == 0

    @property
    def lockstep(self) -> bool:
        """Every forward is a collective (FSDP all-gathers each layer's weights), so every rank must run the same
        number of forwards and backwards, padding with passes whose results are dropped."""
        return self.kind == "fsdp"

    def device(self, device: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.active else device

    def prompts(self, B: int) -> slice:
        """This rank's share of the step's B prompts (B % P == 0, checked at setup)."""
        n = B // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of `rows` (sizes differ by at most one over ranks)."""
        return rows if self.world == 1 else rows.tensor_split(self.world)[self.rank]

    def rollout_seed(self, gen: torch.Generator) -> int:
        """Rank r's sampling seed, the r-th draw of the step's generator: rank 0's is the one-process seed."""
        return int(torch.randint(2**31, (self.world,), generator=gen)[self.rank])

    # ---- the model --------------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> Callable[..., PolicyLogProbs]:
        """Wrap `model` in place for training (FSDP2) or around it (DDP); build the optimizer afterwards. Returns the
        forward the updates differentiate: `forward(packed, routes, **policy_logprobs kwargs) -> PolicyLogProbs`.
        No-grad forwards keep calling `policy_logprobs(model, ...)`: the same FSDP module, or DDP's inner module."""
        if self.kind == "ddp":
            # MoE: experts no token chose have no gradient in this rank's graph; DDP finds them after each forward
            # and still all-reduces them (another rank may have used them). Buffers (RoPE tables) are constants.
            self._ddp = nn.parallel.DistributedDataParallel(PolicyForward(model), forward_sync_buffers=False,
                                                            find_unused_parameters=bool(model.is_moe))
            return self._ddp_forward
        if self.kind == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            dev = next(model.parameters()).device.type
            mesh = init_device_mesh(dev, (self.world,))
            for layer in model.model.layers:
                if getattr(layer, "is_moe", False):
                    # FSDP2 reduce-scatters only the parameters that have a gradient; ranks whose tokens chose
                    # different experts would disagree on the collective's size, so every expert is run (on no
                    # tokens, giving a zero gradient) on every rank.
                    layer.mlp.every_expert = True
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return partial(policy_logprobs, model)

    def _ddp_forward(self, packed: Packed, routes: torch.Tensor | None, **kw) -> PolicyLogProbs:
        logp, routes_used, ent = self._ddp(packed, routes, **kw)
        return PolicyLogProbs(logp, routes_used, float(ent))

    def accumulate(self, last: bool):
        """The context of one micro-batch's backward: DDP all-reduces only on the last of a mini-batch (the others
        accumulate locally under no_sync). FSDP reduce-scatters each one into the sharded gradient."""
        return self._ddp.no_sync() if self._ddp is not None and not last else nullcontext()

    def loss_scale(self) -> float:
        """DDP and FSDP average the ranks' gradients; each rank's loss is normalised by the global mini-batch (E5's
        C), so ×P makes the average the sum, i.e. the one-process gradient."""
        return float(self.world)

    @contextmanager
    def gather(self, module: nn.Module) -> Iterator[nn.Module]:
        """`module` with its own parameters whole (FSDP: all-gathered, then freed again) for reading, e.g. by the
        engine's sync: one decoder layer at a time, never the whole model at once. Not recursive."""
        from torch.distributed.fsdp import FSDPModule

        if self.kind != "fsdp" or not isinstance(module, FSDPModule):
            yield module
            return
        module.unshard()
        try:
            yield module
        finally:
            module.reshard()

    def grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the (possibly sharded) gradients -> the global norm as a plain tensor. FSDP first turns
        the gradients that are zero on every rank (experts no token chose, run on no rows: see `wrap`) back into
        None, as one process has them: AdamW then skips those parameters there too, instead of moving them by
        its momentum."""
        params = list(params)
        if self.kind == "fsdp":
            held = [p for p in params if p.grad is not None]
            local = torch.stack([p.grad.to_local().ne(0).any() for p in held])  # (n,) this rank's shards
            for p, used in zip(held, self.all_sum(local).tolist()):
                if not used:
                    p.grad = None
        g = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return g.full_tensor() if hasattr(g, "full_tensor") else g

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """The model with whole weights on rank 0 (None elsewhere), for writing HF weights; a collective under FSDP."""
        if self.kind != "fsdp":
            return model if self.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from stablerl.model import Transformer

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        plain = Transformer(model.config)
        plain.load_state_dict(sd)
        return plain

    # ---- collectives (the identity for one process) -----------------------------------------------------------

    def reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`op` ("sum" | "max") over ranks of `t`, as a new tensor on t's device. Integer and bool tensors are reduced
        as int64 (a bool sum is "any")."""
        if not self.active:
            return t
        out = t.to(self._comm, torch.int64 if not t.is_floating_point() else t.dtype, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return out.to(t.device, t.dtype)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(t, "sum")

    def max_int(self, x: int) -> int:
        return int(self.reduce(torch.tensor(x), "max")) if self.active else x

    def sum_rows(self, out: PolicyLogProbs) -> PolicyLogProbs:
        """Per-row results each rank filled for its own rows (zeros elsewhere) -> every row's, on every rank. Adding
        zeros is exact, so each row is bitwise what its rank computed."""
        if not self.active:
            return out
        ent = self.all_sum(torch.tensor(out.entropy_sum, dtype=torch.float64))
        return PolicyLogProbs(self.all_sum(out.logp), None if out.routes is None else self.all_sum(out.routes),
                              float(ent))

    @property
    def _comm(self) -> torch.device:
        """Where collectives' tensors live: nccl reduces on the GPU, gloo on the CPU."""
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank: decisions (warnings, stop, checkpoint) must be the same everywhere."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_rollout(self, ro: Rollout, scored: ScoreResult, pad_id: int) -> tuple[Rollout, ScoreResult]:
        """Every rank's rollout and rewards -> the global batch (prompt-major, rank 0's prompts first), on every
        rank; the identity for one process."""
        if not self.active:
            return ro, scored
        parts = self.gather_objects((_to_cpu(ro), scored))
        ros = [p[0] for p in parts]
        scores = [p[1] for p in parts]
        errs = [s.first_error for s in scores if s.first_error]
        return concat_rollouts(ros, pad_id), ScoreResult([r for s in scores for r in s.rewards],
                                                         sum(s.n_errors for s in scores),
                                                         sum(s.n_timeouts for s in scores), errs[0] if errs else None)

    # ---- checkpoints: weights by rank 0 (HF format), optimizer state through DCP --------------------------------

    def save_optimizer(self, run_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> Path:
        """Write the optimizer state with DCP (each rank its shards) into a staging directory that
        `checkpoint.save_checkpoint` moves into the checkpoint before its atomic rename."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        staged = Path(run_dir) / "checkpoints" / f".step_{step:06d}.optim.partial"
        if self.main:
            shutil.rmtree(staged, ignore_errors=True)  # a crashed save's leftover
            staged.mkdir(parents=True)
        self.barrier()
        dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(staged))
        return staged

    def load_optimizer(self, path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Load a DCP optimizer state (written by `save_optimizer` with the same number of processes)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        try:
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
            osd = get_optimizer_state_dict(model, opt)  # the template DCP fills in (and shards, under FSDP)
            # parameters AdamW never stepped (an expert no token chose yet) have no state in the checkpoint, and
            # get none here either: loading replaces the optimizer's whole state, as in the uninterrupted run
            osd["state"] = {k: v for k, v in osd["state"].items() if f"optimizer.state.{k}.step" in saved}
            dcp.load({"optimizer": osd}, checkpoint_id=str(path))
        except Exception as e:  # a missing or corrupt shard, whatever DCP raises for it
            from stablerl.checkpoint import CheckpointError
            from stablerl.errors import one_line

            raise CheckpointError(f"{path}: unreadable optimizer state ({type(e).__name__}: "
                                  f"{one_line(e)[:200]})") from e
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(strict=False))  # those never stepped

    def check_resume(self, ckpt: Path, state: dict) -> None:
        """A checkpoint resumes with the number of processes that wrote it: E8's split is global, but each rank's
        sampling seed is not, and re-sharding the optimizer is not worth a run that silently differs."""
        saved = int(state.get("world_size", 1))
        if saved != self.world:
            how = "stablerl train (no --nproc)" if saved == 1 else f"stablerl train --nproc {saved}"
            raise UserError(f"--resume: {ckpt} was written by {saved} process(es), this run has {self.world}; "
                            f"resume it with the same count ({how} ... --resume), or start a new run with another "
                            "name=... (init=<that checkpoint> starts from its weights)")


def _to_cpu(ro: Rollout) -> Rollout:
    def cpu(x):
        return x.cpu() if isinstance(x, torch.Tensor) else x

    return Rollout(ro.prompts, cpu(ro.prompt_index), ro.prompt_ids, cpu(ro.prompt_lens), cpu(ro.tokens), cpu(ro.mask),
                   cpu(ro.logp_infer), cpu(ro.routes_infer),
                   None if ro.prompt_routes is None else [cpu(r) for r in ro.prompt_routes], ro.finish_reason,
                   ro.texts, ro.numerics)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of several, rows in order; responses right-padded to the longest (T = max over parts)."""
    T = max(p.tokens.shape[1] for p in parts)

    def padded(x: torch.Tensor | None, value) -> torch.Tensor | None:
        if x is None:
            return None
        pad = torch.full((x.shape[0], T - x.shape[1], *x.shape[2:]), value, dtype=x.dtype)
        return torch.cat([x, pad], dim=1)  # (n, T, ...)

    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + len(p.prompts))
    routes = [padded(p.routes_infer, 0) for p in parts]
    return Rollout(
        prompts=[s for p in parts for s in p.prompts],
        prompt_index=torch.cat([p.prompt_index + o for p, o in zip(parts, offsets)]),  # (N,)
        prompt_ids=[ids for p in parts for ids in p.prompt_ids],
        prompt_lens=torch.cat([p.prompt_lens for p in parts]),  # (N,)
        tokens=torch.cat([padded(p.tokens, pad_id) for p in parts]),  # (N, T)
        mask=torch.cat([padded(p.mask, False) for p in parts]),  # (N, T)
        logp_infer=torch.cat([padded(p.logp_infer, 0.0) for p in parts]),  # (N, T)
        routes_infer=None if routes[0] is None else torch.cat(routes),  # (N, T, L, K)
        prompt_routes=None if parts[0].prompt_routes is None else [r for p in parts for r in p.prompt_routes],
        finish_reason=[r for p in parts for r in p.finish_reason],
        texts=[t for p in parts for t in p.texts],
        numerics=parts[0].numerics,
    )
