"""d-TreeRPO's tree rollouts between the driver's stages (rl/tree.py has the tree itself):

    requests = with_tree_branches(requests, recipe.algorithm, n, sampling, block_size)   # leaves of each tree
    kept = learner_samples(kept, recipe.algorithm)   # launch/driver_steps.py: one sample per tree edge

A prompt's n requests are its tree's leaves in rl.tree.TreeShape.leaves() order. Plain functions: no Ray.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from rl.masking import sample_seed
from rl.sample import ScoredSample
from rl.tree import TreeShape, local_advantages, node_values, transition_codes
from rollout.sampling import GenerationRequest, SamplingParams
from rollout.trajectory import Trajectory

TREE_METHODS = ("dtreerpo",)


def is_tree_method(algorithm) -> bool:
    return algorithm.name in TREE_METHODS


def tree_shape(algorithm, sampling: SamplingParams, block_size: int) -> TreeShape:
    """The recipe's tree over a full decode: T = steps per block x blocks (fixed-count remasking only)."""
    from rollout.remasking import REMASKING  # here: importing it before rollout.sampling is circular

    if not REMASKING[sampling.remasking].fixed_count:
        raise ValueError(f"algorithm.name: dtreerpo branches at fixed denoising steps; rollout.remasking "
                         f"{sampling.remasking!r} decides its own step count (use a fixed-count policy)")
    steps = (sampling.steps_per_block or block_size) * (sampling.max_tokens // block_size)
    return TreeShape(steps, algorithm.tree_contraction_factor, algorithm.num_tree_samples,
                     algorithm.tree_branch_factor)


def with_tree_branches(requests: list[GenerationRequest], algorithm, n: int, sampling: SamplingParams,
                       block_size: int) -> list[GenerationRequest]:
    """Requests (n per prompt, prompt-major) as the leaves of one tree per prompt: leaf path (i_1..i_d) starts from
    the seed of (i_1) and restarts from the seed of (i_1..i_k) at the k-th branch step; seeds derive from the
    prompt's first request's seed."""
    if not is_tree_method(algorithm):
        return requests
    shape = tree_shape(algorithm, sampling, block_size)
    if n != shape.num_leaves:
        raise ValueError(f"rollout.samples_per_prompt: {n}, but the tree has {shape.num_leaves} leaves "
                         f"(num_tree_samples x tree_branch_factor^(levels - 1))")
    leaves, steps = shape.leaves(), shape.branch_steps()
    out = []
    for i, request in enumerate(requests):
        base, path = requests[i - i % n].seed, leaves[i % n]
        out.append(replace(request, seed=node_seed(base, path[:1]),
                           branch_seeds=tuple((steps[k], node_seed(base, path[:k + 2])) for k in range(len(steps)))))
    return out


def node_seed(base: int | None, prefix: tuple[int, ...]) -> int:
    """The seed of the tree node at `prefix` (child index per level) under the prompt's base seed."""
    if base is None:
        raise ValueError("tree rollouts: every request needs a seed (the driver's per-sample seeds)")
    return sample_seed(base, "tree:" + ".".join(map(str, prefix)))


def _tree_key(sample: ScoredSample) -> str:
    return sample.request_id.rsplit("-s", 1)[0]  # the driver's request ids: d{position}-p{prompt}-s{sample}


def tree_samples(kept: list[ScoredSample], algorithm) -> list[ScoredSample]:
    """One learner sample per edge of each prompt's tree, built from its kept leaves (module doc of rl/tree.py)."""
    trees: dict[str, list[ScoredSample]] = {}
    for sample in kept:
        trees.setdefault(_tree_key(sample), []).append(sample)
    out = []
    for leaves in trees.values():
        out += edge_samples(leaves, algorithm)
    return out


def edge_samples(leaves: list[ScoredSample], algorithm) -> list[ScoredSample]:
    traj0 = leaves[0].trajectory
    sampling = SamplingParams.from_dict({k: v for k, v in traj0.sampling.items()
                                         if k in SamplingParams.__dataclass_fields__})
    shape = tree_shape(algorithm, sampling, traj0.block_size)
    paths, steps = shape.leaves(), shape.branch_steps()
    by_path = {paths[s.sample_index]: s for s in leaves}
    values = node_values({p: float(s.reward) for p, s in by_path.items()})
    advantages = local_advantages(values)
    mask_id = traj0.sampling["mask_token_id"]
    out = []
    for node, adv in sorted(advantages.items()):
        rep = next(s for p, s in sorted(by_path.items()) if p[:len(node)] == node)  # a leaf under the node
        traj = rep.trajectory
        level = len(node)  # 1 .. levels
        child = traj.response_ids if level == shape.levels else traj.state_before_step(steps[level - 1], mask_id)
        parent = (torch.full_like(traj.response_ids, mask_id) if level == 1
                  else traj.state_before_step(steps[level - 2], mask_id))
        code = transition_codes(parent, child, mask_id, traj.sampling.get("eos_token_id"))
        if not bool((code == 1).any()):
            continue
        edge = Trajectory(
            prompt_ids=traj.prompt_ids, response_ids=child.clone(), step_map=code,
            logprobs=torch.where(code == 1, traj.logprobs, torch.zeros_like(traj.logprobs)),
            confidence=torch.zeros_like(traj.confidence), valid_length=child.numel(), nfe=traj.nfe,
            finish_reason=traj.finish_reason, block_size=traj.block_size, sampling=traj.sampling,
            policy_version=traj.policy_version,
            request_id=f"{_tree_key(rep)}-node{'.'.join(map(str, node))}",
        )
        out.append(ScoredSample(edge, prompt_index=rep.prompt_index, sample_index=rep.sample_index,
                                reward=values[node], reason=rep.reason, advantage=float(adv), keep=True,
                                sibling_group=f"{_tree_key(rep)}-node{'.'.join(map(str, node[:-1]))}"))
    return out
