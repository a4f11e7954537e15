"""The RL driver: a single controller that owns the step counter. One step, top to bottom (`Driver.train_step`):

    1. weights v_k  -> rollout workers          (skipped when they already hold v_k)
    2. prompt batch -> n samples each            (seeded per request: the same prompts and samples after a resume)
    3. responses    -> RewardService             (score, reason, metrics per response: rl.sample.ScoredSample)
    4. rewards      -> group advantages          (rl.advantages.ADVANTAGES by name; filters drop groups, dropped
                                                  samples do not reach the learner; 3-4: launch/driver_scoring.py)
    5. scored batch -> TrajectoryStore           (Parquet, on disk before the learner runs)
    6. batch        -> learner                   (mu inner iterations over minibatches; a NaN loss skips the step)
    7. metrics, checkpoint every N steps, evaluation every M steps

Policy version k = the weights after step k (version 0: the initial policy). In sync mode step k generates with
version k-1 (on-policy). In async mode a producer thread runs steps 2-4 ahead of the learner: it may start the
batch of step k once the learner reached version k-1-max_staleness, so every trajectory is at most max_staleness
versions old when trained on (its version travels with it; `rollout/staleness` is logged). The async core is one
lock (the learner's weights never change while they are being streamed) and one bounded queue.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from launch.budget import RunBudget
from launch.cluster_nodes import NodeLostError, NodeWatch, actor_roles, alive_nodes, node_loss_line
from launch.data import Prompt, PromptSampler
from launch.diagnostics import probe_metrics, probe_requests
from launch.decoding import decode_block, sampling_params
from launch.driver_roles import RolloutPool, make_learner, make_reward_service
from launch.driver_scoring import assign_advantages, response_item, score_samples
from launch.driver_steps import assign_step_advantages, learner_samples, score_steps, with_step_records
from launch.driver_tree import with_tree_branches
from launch.driver_setup import (RunContext, create_placement_group, host, placement_plan, prepare_run,
                                 write_run_status)
from launch.local_ray import ray_session
from launch.metrics import MetricsLogger, plot_curves, reward_summary, rewind_metrics, summary_line
from rl.checkpoint import Checkpoint, capture_rng, restore_rng, save_checkpoint
from rl.masking import sample_seed
from rl.sample import ScoredSample
from rl.store import store_actor
from rollout.errors import one_line
from rollout.sampling import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    ok: bool
    steps: int
    run_dir: Path
    metrics: dict = field(default_factory=dict)
    stop_reason: str = ""  # "total_steps: ..." or "budget: ..." (trainer.budget)


@dataclass
class Batch:
    """One scored rollout batch on its way to the learner."""

    version: int  # policy version that generated it
    data_position: int  # prompt-stream position after its prompts (the data cursor once it is trained on)
    prompts: list[Prompt]
    samples: list[ScoredSample]  # n per prompt, in prompt order (sample i answers prompts[i // n])
    metrics: dict


def run_training(recipe, *, resume: Checkpoint | None = None, progress: bool = True,
                 recipe_dir: Path | None = None, verbose: bool = False) -> RunResult:
    """Prepare the run (fails early on bad input), start or join Ray, train, record the outcome in run.json.
    trainer.mode offline (preference pairs, no rollout and no Ray) runs in launch/driver_offline.py."""
    if recipe.trainer.mode == "offline":
        from launch.driver_offline import run_offline

        return run_offline(recipe, resume=resume, progress=progress, recipe_dir=recipe_dir)
    ctx = prepare_run(recipe, resume=resume, recipe_dir=recipe_dir)
    try:
        write_run_status(ctx.run_dir, status="running", pid=os.getpid(), host=host(), name=ctx.recipe.name,
                         total_steps=ctx.recipe.trainer.total_steps, error=None)
        try:
            with ray_session(ctx.recipe.ray, verbose=verbose):
                driver = Driver(ctx, resume=resume, progress=progress)
                try:
                    result = driver.fit()
                except Exception as err:
                    lost = driver.watch.explain(err)  # a node that left the cluster: one line naming it
                    if lost is None:
                        raise
                    raise NodeLostError(node_loss_line(lost, driver.step, ctx.run_dir)) from err
                finally:
                    driver.close()
        except BaseException as err:
            state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            write_run_status(ctx.run_dir, status=state, error=failure_line(err))
            raise
        write_run_status(ctx.run_dir, status="finished", step=result.steps, stop_reason=result.stop_reason)
        return result
    finally:
        ctx.release()


def failure_line(err: BaseException, limit: int = 500) -> str:
    """The one-line cause `diffrl status` shows: the error raised inside a Ray actor rather than Ray's wrapper
    (whose text is a coloured multi-line traceback), escape codes stripped."""
    cause = getattr(err, "cause", None)
    cause = cause if isinstance(cause, BaseException) else err
    return one_line(f"{type(cause).__name__}: {cause}", limit)


class Driver:
    def __init__(self, ctx: RunContext, *, resume: Checkpoint | None = None, progress: bool = True):
        import ray

        self.ctx, self.recipe, self.progress = ctx, ctx.recipe, progress
        r = self.recipe
        plan = placement_plan(r)
        self.group = create_placement_group(plan)
        self.rollout = RolloutPool(r, ctx.initial_policy_dir, self.group, plan)
        self.learner = make_learner(r, self.group, plan, start_policy_dir=ctx.start_policy_dir,
                                    initial_policy_dir=ctx.initial_policy_dir)
        self.learner_nodes = self.learner.nodes()
        self.watch = NodeWatch(alive_nodes(), roles=lambda: actor_roles(self.placement()))
        write_run_status(ctx.run_dir, placement=self.placement())
        cpus_free = ray.cluster_resources().get("CPU", 0) - sum(b.get("CPU", 0) for b in plan.bundles)
        self.rewards = make_reward_service(ctx.reward_specs, ctx.recipe_dir, cpus_free,
                                           max_workers=r.resources.reward_workers)
        self.store = store_actor(ctx.store_dir)
        self.sampler = PromptSampler(len(ctx.prompts), seed=r.seed, shuffle=r.data.shuffle)
        self.sampling = with_step_records(sampling_params(r.rollout, block_size=decode_block(r)), r)
        self.step = 0  # steps completed == policy version of the learner's weights
        self.counters = {"nan_skipped_steps": 0, "empty_steps": 0, "dropped_stale": 0}
        self._last_saved = 0
        self._checkpoint_s = 0.0  # seconds the last checkpoint took (logged with the next step)
        self.sampler_position = 0  # data cursor of the last batch trained on
        budget = r.trainer.budget
        self.budget = RunBudget(budget.minutes, budget.clock) if budget is not None else None
        if resume is not None:
            self._restore(resume)
        self.metrics = MetricsLogger(ctx.run_dir, backends=r.trainer.log, run_name=r.name, config=r.to_dict())

    # ============================================================================================ one RL step
    def train_step(self, step: int) -> dict:
        """Synchronous (on-policy) step: every stage in order."""
        started, timings = time.perf_counter(), {}
        with _timed(timings, "sync"):
            if self.rollout.version != self.step:  # 1. weights v_k to the rollout workers
                self.rollout.sync(self.learner, self.step)
        batch = self.make_batch(timings)  # 2-4. generate, score, advantages
        return self.learn(step, batch, timings, started)  # 5-7. store, learner, metrics

    def make_batch(self, timings: dict[str, float]) -> Batch:
        """Steps 2-4: the next prompts, n samples each with the rollout's current weights, scored, advantages."""
        r, n = self.recipe, self.recipe.rollout.samples_per_prompt
        version, start = self.rollout.version, self.sampler.position
        prompts = [self.ctx.prompts[i] for i in self.sampler.take(r.data.num_prompts_per_step)]
        # 2. Each request has its own seed from (run seed, position in the prompt stream, sample): data order and
        #    samples are a function of the stream position alone, whatever the step, worker or batch layout.
        requests = [GenerationRequest(list(p.prompt_ids), self.sampling,
                                      seed=sample_seed(r.seed, f"{start + k}:{j}", stream="rollout"),
                                      request_id=f"d{start + k}-p{p.index}-s{j}")
                    for k, p in enumerate(prompts) for j in range(n)]
        requests = with_tree_branches(requests, r.algorithm, n, self.sampling, decode_block(r))  # d-TreeRPO
        with _timed(timings, "rollout"):
            trajectories = self.rollout.generate(requests)
        samples = [ScoredSample(t, prompt_index=prompts[i // n].index, sample_index=i % n)
                   for i, t in enumerate(trajectories)]
        # 3. Score every response against its prompt's answer (failed generations get no reward call).
        with _timed(timings, "reward"):
            metrics = score_samples(prompts, samples, n=n, tokenizer=self.ctx.tokenizer, rewards=self.rewards,
                                    data=r.data)
            metrics.update(score_steps(prompts, samples, n=n, tokenizer=self.ctx.tokenizer, rewards=self.rewards,
                                       data=r.data, algorithm=r.algorithm))  # MDPO: a reward per denoising step
        if r.algorithm.name == "igpo":  # 3b. IGPO: hints into the groups with no correct response, regenerated
            with _timed(timings, "igpo"):
                metrics.update(self._igpo(prompts, samples, requests))
        # 4. Group-relative advantages; filtered groups and failed generations are marked keep=False.
        metrics.update(assign_advantages(samples, n, r.algorithm, max_tokens=r.rollout.max_tokens))
        metrics.update(assign_step_advantages(samples, n, r.algorithm))
        metrics.update(self.rollout.metrics())
        return Batch(version, self.sampler.position, prompts, samples, metrics)

    def _igpo(self, prompts: list[Prompt], samples: list[ScoredSample], requests: list[GenerationRequest]) -> dict:
        from launch.igpo import rescue_groups

        r, tok = self.recipe, self.ctx.tokenizer
        score = lambda hinted_prompts, hinted: score_samples(  # noqa: E731
            hinted_prompts, hinted, n=1, tokenizer=tok, rewards=self.rewards, data=r.data)
        return rescue_groups(prompts, samples, requests, n=r.rollout.samples_per_prompt,
                             cfg=r.algorithm.inpaint.config(), field=r.algorithm.inpaint.reference_field,
                             seed=r.seed, tokenizer=tok, generate=self.rollout.generate, score=score)

    def learn(self, step: int, batch: Batch, timings: dict[str, float], started: float) -> dict:
        """Steps 5-7: persist, update the learner, log, checkpoint, evaluate. `started`: when this step began (in
        async mode, when the previous one ended: its rollout overlapped that step's update)."""
        import ray

        # 5. On disk before the learner runs: a crash from here on loses nothing that was scored.
        ray.get(self.store.add.remote(step, batch.samples))
        # 6. The learner trains on the kept samples; the weights after it are version `step`.
        kept = [s for s in batch.samples if s.keep]
        stale = [s for s in kept if s.policy_version < step - 1]
        if stale and self.recipe.trainer.off_policy == "drop":
            kept = [s for s in kept if s.policy_version >= step - 1]
            self.counters["dropped_stale"] += len(stale)
        learner_metrics: dict[str, float] = {}
        # Colocated (sync mode): the rollout side sleeps through the update, its memory the learner's meanwhile.
        asleep = bool(kept) and self.recipe.resources.placement == "colocated" and self.recipe.trainer.mode == "sync"
        freed = None
        with _timed(timings, "learner"):
            if asleep:
                freed = self.rollout.sleep()
            try:
                if kept:
                    learner_metrics = self.learner.update(learner_samples(kept, self.recipe.algorithm))
            finally:
                if asleep:
                    self.rollout.wake()
        if not kept:
            self.counters["empty_steps"] += 1
        elif learner_metrics.get("optimizer_steps", 1) == 0 and learner_metrics.get("nan_skipped", 0) > 0:
            self.counters["nan_skipped_steps"] += 1  # every optimizer step skipped: the weights did not change
            log.warning("step %d: non-finite loss, update skipped (last good weights kept)", step)
        self.step = step
        self.sampler_position = batch.data_position
        # 7. Metrics, checkpoint, evaluation.
        metrics = dict(batch.metrics)
        metrics.update({f"learner/{k}": v for k, v in learner_metrics.items()})
        if freed is not None:
            metrics["rollout/sleep_freed_bytes"] = freed
        metrics.update({f"time/{k}_s": v for k, v in timings.items()})
        metrics.update({"version": step, "rollout/version": batch.version,
                        "rollout/staleness": step - 1 - batch.version,
                        "learner/skipped": int(bool(kept) and learner_metrics.get("optimizer_steps", 1) == 0),
                        "learner/samples": len(kept), "data/epoch": batch.data_position // len(self.ctx.prompts),
                        "rollout/restarts": self.rollout.restarts,
                        **{f"counters/{k}": v for k, v in self.counters.items()}})
        every = self.recipe.trainer.eval_every
        if every and (step % every == 0 or step == self.recipe.trainer.total_steps):  # always at the end
            metrics.update(self.evaluate())
        metrics["time/step_s"] = time.perf_counter() - started
        if self.budget is not None:
            metrics["budget/spent_min"] = self.budget.spent_s() / 60
        metrics["time/last_checkpoint_s"] = self._checkpoint_s
        self.metrics.log(step, metrics)  # before the checkpoint: a checkpoint never points past the metrics
        if self._checkpoint_due(step):
            start = time.perf_counter()
            self.save(step, batch.data_position)
            self._checkpoint_s = time.perf_counter() - start
        return metrics

    # ================================================================================================ stages
    def evaluate(self) -> dict:
        """Greedy decoding of the held-out prompts with the current weights; accuracy and mean reward. With
        trainer.probe_items, also greedy vs sampled accuracy on a fixed probe set (launch/diagnostics.py)."""
        prompts, t = self.ctx.eval_prompts, self.recipe.trainer
        if t.mode == "sync" and self.rollout.version != self.step:
            self.rollout.sync(self.learner, self.step)
        greedy = sampling_params(self.recipe.rollout, block_size=decode_block(self.recipe), greedy=True)
        requests = [(p, GenerationRequest(list(p.prompt_ids), greedy, seed=0, request_id=f"eval-p{p.index}"))
                    for p in prompts]
        requests += probe_requests(prompts, self.sampling, seed=self.recipe.seed, items=t.probe_items,
                                   samples=t.probe_samples)
        trajectories = self.rollout.generate([request for _, request in requests])
        tok = self.ctx.tokenizer
        items = [response_item(p, tok.decode(tr.response_ids[:tr.valid_length].tolist(), skip_special_tokens=True),
                               tr.valid_length, self.recipe.data)
                 for (p, _), tr in zip(requests, trajectories, strict=True)]
        scored = self.rewards.score(items)
        results, probe = scored[:len(prompts)], scored[len(prompts):]
        correct = sum(r["reason"] == "correct" for r in results)
        return {"eval/accuracy": correct / len(results), "eval/reward": sum(r["score"] for r in results) / len(results),
                "eval/version": self.rollout.version, "eval/num_prompts": len(results),
                **{f"eval/{k.removeprefix('reward/')}": v for k, v in reward_summary(results).items()},
                **probe_metrics(results[:t.probe_items], probe, t.probe_samples)}

    # ========================================================================================= the two loops
    def fit(self) -> RunResult:
        r = self.recipe
        total = r.trainer.total_steps
        bar = _bar(total, self.step, self.progress)
        last: dict = {}
        if self.budget is not None:
            self.budget.start()  # counts from here: not the start of Ray and the actors
        if r.trainer.eval_every and self.step == 0:  # held-out accuracy before training: the summary's "before"
            row = self.metrics.log(0, self.evaluate())
            _say(bar, f"step 0/{total} | held-out acc {row['eval/accuracy']:.2f} (before training)")
        try:
            if r.trainer.mode == "sync":
                while self.step < total and not self._out_of_budget():
                    last = self.train_step(self.step + 1)
                    _report(bar, summary_line(self.step, total, last))
            else:
                last = self._fit_async(total, bar)
        finally:
            if bar is not None:
                bar.close()
        if self._last_saved != self.step:
            self.save(self.step, self.sampler_position)
        plot_curves(self.ctx.run_dir / "metrics.jsonl", self.ctx.run_dir / "curves.png")
        reason = (self.budget.reason(self.step, total) if self.step < total and self.budget is not None
                  else f"total_steps: {self.step} of {total} steps done")
        log.debug("run stopped: %s", reason)  # the closing summary and run.json say it to the user
        return RunResult(True, self.step, self.ctx.run_dir, last, stop_reason=reason)

    def _out_of_budget(self) -> bool:
        """trainer.budget spent (checked at step boundaries only: a step is never cut short)."""
        return self.budget is not None and self.budget.exhausted()

    def _fit_async(self, total: int, bar) -> dict:
        """Producer thread: sync + steps 2-4 for the batch of step m, started once the learner reached version
        m-1-max_staleness; this thread: steps 5-7. One condition variable guards the learner's weights (no update
        while they stream to the rollout workers) and lets a producer whose gate an update just opened sync before
        the next update, so its rollout overlaps that update with the newest weights."""
        cv, stop = threading.Condition(), threading.Event()
        staleness = self.recipe.trainer.max_staleness
        ready: queue.Queue = queue.Queue(maxsize=staleness + 1)
        first, failure, gate = self.step + 1, [], {"step": None}  # gate: the batch the producer waits to start

        def may_start(step: int) -> bool:
            return self.step >= step - 1 - staleness

        def put(item) -> None:
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                for step in range(first, total + 1):
                    timings: dict[str, float] = {}
                    with cv:
                        gate["step"] = step
                        cv.wait_for(lambda: stop.is_set() or may_start(step))
                        gate["step"] = None
                        cv.notify_all()
                        if stop.is_set():
                            return
                        with _timed(timings, "sync"):
                            if self.rollout.version != self.step:
                                self.rollout.sync(self.learner, self.step)
                    put((self.make_batch(timings), timings))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
                failure.append(err)
                put(None)

        producer = threading.Thread(target=produce, name="rollout-producer", daemon=True)
        producer.start()
        last: dict = {}
        try:
            while self.step < total and not self._out_of_budget():
                started = time.perf_counter()
                item = ready.get()
                if item is None:
                    raise failure[0]
                batch, timings = item
                with cv:
                    cv.wait_for(lambda: gate["step"] is None or not may_start(gate["step"]) or not producer.is_alive())
                    timings["wait"] = time.perf_counter() - started  # waiting for the producer: rollout not hidden
                    last = self.learn(self.step + 1, batch, timings, started)
                    cv.notify_all()
                _report(bar, summary_line(self.step, total, last))
        finally:
            stop.set()
            with cv:
                cv.notify_all()
            producer.join(timeout=600)
        return last

    # ============================================================================================ checkpoints
    def _checkpoint_due(self, step: int) -> bool:
        every = self.recipe.trainer.checkpoint_every
        return step == self.recipe.trainer.total_steps or (every > 0 and step % every == 0)

    def save(self, step: int, data_position: int) -> Path:
        import ray

        data = {**self.sampler.state_dict(), "position": data_position}
        state = {"version": step, "data": data, "store": ray.get(self.store.state_dict.remote()),
                 "counters": dict(self.counters),
                 **({"budget": self.budget.state_dict()} if self.budget is not None else {})}
        # The learner ranks write their own shards into the unpublished step directory; what comes back here is
        # file entries for the manifest and the layout, never tensors.
        writers = {"policy": lambda d: self.learner.save_policy(str(d)),
                   "learner": lambda d: self.learner.save_state(str(d))}
        path = save_checkpoint(
            self.ctx.checkpoints, step, writers=writers, state=state, rng=capture_rng(),
            recipe_yaml=self.recipe.to_yaml(), keep_last=self.recipe.trainer.keep_last)
        self._last_saved = step
        write_run_status(self.ctx.run_dir, step=step, checkpoint=path.name, placement=self.placement())
        return path

    def placement(self) -> dict[str, list]:
        """run.json's `placement`: the Ray node of each rollout worker (where it is now) and learner rank."""
        return {"rollout": list(self.rollout.nodes), "learner": list(self.learner_nodes)}

    def _restore(self, ckpt: Checkpoint) -> None:
        """Continue exactly: learner (weights, optimizer, schedule, counters), data cursor, store cursor, RNG states.
        The rollout workers start from the initial policy and get the checkpoint's weights before generating."""
        import ray

        from rl.checkpoint import CheckpointError

        if ckpt.learner_dir.is_dir():
            self.learner.load_state(str(ckpt.learner_dir))  # each rank reads its own shard
        elif ckpt.legacy_learner_file is not None:
            self.learner.load_legacy_state(str(ckpt.legacy_learner_file))  # format 1: one torch rank only
        else:
            raise CheckpointError(f"{ckpt.learner_dir}: missing (corrupt checkpoint)")
        self.sampler.load_state_dict(ckpt.state["data"])
        ray.get(self.store.load_state_dict.remote(ckpt.state["store"]))
        restore_rng(ckpt.rng, {})
        self.step = self._last_saved = ckpt.step
        self.sampler_position = self.sampler.position
        self.counters.update(ckpt.state.get("counters", {}))
        if self.budget is not None:
            self.budget.restore(ckpt.state.get("budget"))  # what the earlier run spent counts
        self.rollout.version = -1  # never equal to a step: version `step` is synced before the first generation
        moved = rewind_metrics(self.ctx.run_dir, ckpt.step)
        log.info("resumed from %s (step %d; %d later metric rows moved aside)", ckpt.path, ckpt.step, moved)

    def close(self) -> None:
        """Stop every actor this driver started (a joined cluster keeps running)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        self.metrics.close()
        self.rewards.shutdown()
        self.learner.shutdown()
        self.rollout.shutdown()
        ray.kill(self.store)
        remove_placement_group(self.group)


# ======================================================================================================= helpers
@contextmanager
def _timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _bar(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="steps", unit="step", dynamic_ncols=True)


def _report(bar, line: str) -> None:
    if bar is not None:
        bar.update(1)
    _say(bar, line)


def _say(bar, line: str) -> None:
    """A console line that does not break the progress bar."""
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
