"""Sharded data parallelism (parallel=fsdp, PyTorch's FSDP2); how each step's batch is split over however many
processes a run has now is data.tokens.StepBatches.

    shard(model, rt)                      # in place: each block (its experts with it), then the root
    full = full_model(model, rt)          # rank 0: an unsharded copy (None on the other ranks); every rank calls it
    model = sharded_from(full, rt)        # every rank: a new sharded model holding rank 0's full weights
    state = gather_optimizer(model, opt, rt)       # rank 0: AdamW's state as one process's optimizer.state_dict()
    load_optimizer(model, opt, state, rt)          # rank 0's full state, sharded into every rank's optimizer

Checkpoints keep one format whatever the mode and world size: the full model and optimizer state, gathered one
tensor at a time into rank 0's host memory and written as a single process writes them. So a run saved by 2
processes resumes on 1 and back, and export, sampling and evaluation read every checkpoint alike. Growth and its
checks need the whole model anyway: rank 0 gathers it, grows and checks, and sharded_from shards the result.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models import build_model
from training.parallel.runtime import Runtime


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, rt: Runtime) -> nn.Module:
    """Shard model in place over all processes: each block (an MoE block's experts with it, stacked on dim 0), then
    the root (embedding, tied LM head, final norm). Under bf16, blocks compute with bf16 copies of the fp32 master
    weights and reduce gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    bf16 = rt.autocast_dtype == torch.bfloat16
    mp = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def resharded(model: nn.Module) -> nn.Module:
    """model with every FSDP group back in its sharded parameters: FSDP2 keeps the root's gathered after a forward
    (an eval's, say) until backward, and the state-dict and optimizer functions map the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model(model: nn.Module, rt: Runtime, device: torch.device | str | None = None) -> nn.Module | None:
    """An unsharded copy of a sharded model on rank 0 (on device, default the run's), None elsewhere. Every rank
    calls it; the weights pass one tensor at a time through rank 0's host memory."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(resharded(model), options=_full_options(cpu_offload=True))
    if not rt.is_master:
        return None
    full = _empty_model(model.config, device or rt.device)
    full.load_state_dict(state)
    for name, buf in model.named_buffers():  # RoPE tables: not in the state dict, whole on every rank
        full.get_buffer(name).copy_(buf)
    return full


def sharded_from(full: nn.Module | None, rt: Runtime) -> nn.Module:
    """A sharded model holding rank 0's full model (its config, weights and buffers; `full` is ignored elsewhere).
    Every rank calls it; the other ranks build nothing whole: a meta skeleton, sharded, then filled from rank 0."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    config = [full.config if rt.is_master else None]
    dist.broadcast_object_list(config, src=0)
    with torch.device("meta"):
        model = build_model(config[0])
    shard(model, rt)
    model.to_empty(device=rt.device)
    state = full.state_dict() if rt.is_master else {}
    set_model_state_dict(model, state, options=_full_options(broadcast_from_rank0=True))
    for name, buf in model.named_buffers():
        if rt.is_master:
            buf.copy_(full.get_buffer(name))
        dist.broadcast(buf, src=0)
    return model


def _empty_model(cfg, device) -> nn.Module:
    """A model whose weights are about to be overwritten: allocated on device without random init, ties kept."""
    with torch.device("meta"):
        model = build_model(cfg)
    first, ties = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        first.setdefault(id(p), name)
    model.to_empty(device=device)  # gives each name its own tensor: tie them again
    for name, source in ties:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(source))
    return model


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in optimizer.state_dict()'s numbering."""
    names = {id(p): n for n, p in resharded(model).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> dict | None:
    """Rank 0: the sharded optimizer's full state numbered as one process's optimizer.state_dict() (on the host);
    None elsewhere. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(resharded(model), optimizer, options=_full_options(cpu_offload=True))
    if not rt.is_master:
        return None
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]}


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None, rt: Runtime) -> None:
    """Rank 0's full optimizer state (one process's state_dict(), from any world size) into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name = {}
    if rt.is_master:
        names = _param_names(model, optimizer)
        by_name = {"state": {names[int(i)]: v for i, v in state["state"].items()},
                   "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(resharded(model), optimizer, by_name, options=_full_options(broadcast_from_rank0=True))


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds of parameters, their gradients and the optimizer's state (its shards when sharded)."""
    def local(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    out = {"parameters": sum(local(p) for p in params),
           "gradients": sum(local(p.grad) for p in params if p.grad is not None), "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return out


