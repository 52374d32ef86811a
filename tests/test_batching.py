"""Token-budget micro-batches (train.micro_batch_tokens), without launching ranks.

The sampler's promises are checked through Accelerate's own sharding (``prepare_data_loader``
deals the sampler's micro-batches to ranks as it does in a run, ``skip_first_batches`` is what a
resumed run uses), against references computed here: the padded tensors the real collator makes,
and the examples that 1 rank trains on in each optimizer step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches

from launcher.rank.data import LengthGroupedBatchSampler, TokenBudgetBatchSampler

SEED = 7


def dialogsum_like_lengths(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Source lengths 40..512 and targets 5..128, correlated as dialogues and summaries are."""
    rng = np.random.default_rng(seed)
    source = rng.integers(40, 513, size=count)
    target = np.clip(source // 5 + rng.integers(-20, 30, size=count), 5, 128)
    return source, target


def padded_cost(batch: list[int], source: np.ndarray, target: np.ndarray) -> int:
    """Tokens of the padded batch: every source padded to the longest, every target too."""
    return len(batch) * (int(source[batch].max()) + int(target[batch].max()))


def sampler(budget: int, per_step: int, count: int = 700, group: bool = True, epoch: int = 0):
    source, target = dialogsum_like_lengths(count)
    made = TokenBudgetBatchSampler(source, target, budget, SEED, group, micro_batches_per_step=per_step)
    made.epoch = epoch
    return made, source, target


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("per_step", [1, 2, 6])
@pytest.mark.parametrize("budget", [640, 2000, 8192])
def test_every_example_once_per_epoch_every_batch_within_budget(budget, per_step, group):
    for epoch in (0, 1):
        made, source, target = sampler(budget, per_step, group=group, epoch=epoch)
        steps = made.steps()
        batches = [batch for step in steps for batch in step]
        assert sorted(i for batch in batches for i in batch) == list(range(len(source)))
        assert max(padded_cost(batch, source, target) for batch in batches) <= budget
        # Every step has exactly per_step micro-batches (ranks stay in step); only the last may be
        # short, and only when too few examples are left (never with these budgets and sizes).
        assert {len(step) for step in steps} == {per_step}
        assert len(made) == len(batches)
    # The budget is used, not wasted: on average micro-batches fill most of it (greedy packing
    # of length-sorted examples leaves at most one example's worth free).
    if group and budget >= 2000:
        made, source, target = sampler(budget, per_step)
        fill = np.mean([padded_cost(batch, source, target) for batch in made.batches()]) / budget
        assert fill > 0.8, fill


def test_short_and_long_dialogues_get_large_and_small_micro_batches():
    made, source, _ = sampler(4096, 2)
    batches = made.batches()
    short = np.mean([len(batch) for batch in batches if source[batch].max() < 150])
    long = np.mean([len(batch) for batch in batches if source[batch].min() > 450])
    # 4096 tokens hold about 4096 / (150 + 50) = 20 short examples but 4096 / (512 + 128) = 6 long ones.
    assert short >= 2.5 * long, (short, long)


def test_budget_counts_what_the_collator_really_pads():
    """The formula is the real cost: input_ids plus labels of the collated batch (CPU: no
    rounding to multiples of 8; decoder_input_ids are as long as the labels)."""
    from transformers import DataCollatorForSeq2Seq

    from launcher.core.recipe import Recipe
    from launcher.rank.model import load_tokenizer

    recipe = Recipe.model_validate({"model": {"name": "tiny-t5"}, "data": {"dataset": "sample"}})
    tokenizer = load_tokenizer(recipe)
    from launcher.core.dialogues import load_data_split
    from launcher.rank.data import tokenize_rows

    examples = tokenize_rows(load_data_split(recipe.data, "train"), tokenizer, recipe.data)
    source = [len(item["input_ids"]) for item in examples]
    target = [len(item["labels"]) for item in examples]
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    budget = 900
    made = TokenBudgetBatchSampler(source, target, budget, SEED, micro_batches_per_step=2)
    costs = []
    for batch in made.batches():
        collated = collate([examples[i] for i in batch])
        costs.append(collated["input_ids"].numel() + collated["labels"].numel())
    assert max(costs) <= budget
    assert sum(len(batch) for batch in made.batches()) == len(examples) == 64


def shard_steps(made, world: int, accum: int) -> tuple[list[list[frozenset]], list[list[int]]]:
    """Deal the sampler's batches to ``world`` ranks as Accelerate does in a run; return, per
    optimizer step, each rank's examples, and each rank's micro-batch count per step."""
    loader = torch.utils.data.DataLoader(list(range(len(made.source))), batch_sampler=made, collate_fn=list)
    per_rank = []
    for rank in range(world):
        shard = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False)
        batches = list(shard)
        per_rank.append([batches[i : i + accum] for i in range(0, len(batches), accum)])
    steps = len(per_rank[0])
    assert all(len(windows) == steps for windows in per_rank), "ranks run different numbers of steps"
    examples = [[frozenset(i for b in per_rank[r][s] for i in b) for r in range(world)] for s in range(steps)]
    counts = [[len(per_rank[r][s]) for r in range(world)] for s in range(steps)]
    return examples, counts


@pytest.mark.parametrize("budget", [640, 3000])
def test_steps_hold_the_same_examples_on_1_2_and_3_ranks(budget):
    """6 micro-batches per step as 1 rank x accumulation 6, 2 x 3 and 3 x 2: the same examples
    in every optimizer step, every rank running the same number of micro-batches in each."""
    reference = None
    for world in (1, 2, 3):
        accum = 6 // world
        made, _, _ = sampler(budget, world * accum, count=500)
        examples, counts = shard_steps(made, world, accum)
        assert all(c == [accum] * world for c in counts), counts
        steps = [frozenset().union(*ranks) for ranks in examples]
        reference = reference or steps
        assert steps == reference
        assert sum(len(step) for step in steps) == 500


def test_a_tail_too_small_for_a_step_keeps_ranks_in_step():
    """Budget = the longest example and few examples: one example per micro-batch, 7 examples for
    steps of 2 micro-batches: the last step is short, and Accelerate still gives both ranks the
    same number of micro-batches (it repeats an early one, as for fixed-size batches)."""
    source, target = np.full(7, 500), np.full(7, 100)
    made = TokenBudgetBatchSampler(source, target, 600, SEED, micro_batches_per_step=2)
    assert [len(step) for step in made.steps()] == [2, 2, 2, 1]
    _, counts = shard_steps(made, 2, 1)
    assert all(c == [1, 1] for c in counts), counts


@pytest.mark.parametrize("skip", [1, 4, 9])
def test_resume_continues_at_the_same_batch(skip):
    """A resumed run builds a new sampler in a new process and skips the micro-batches each rank
    had run (TrainState.batches_in_epoch): what follows is what the uninterrupted run ran."""
    world = 2
    for epoch in (0, 3):
        made, _, _ = sampler(3000, 2, epoch=epoch)
        fresh, _, _ = sampler(3000, 2, epoch=epoch)  # the resumed process's own sampler
        for rank in range(world):
            full = list(shard_loader(made, world, rank))
            resumed = list(skip_first_batches(shard_loader(fresh, world, rank), skip))
            assert resumed == full[skip:]


def shard_loader(made, world: int, rank: int):
    loader = torch.utils.data.DataLoader(list(range(len(made.source))), batch_sampler=made, collate_fn=list)
    return prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False)


def test_the_order_depends_on_seed_and_epoch_only():
    first, _, _ = sampler(3000, 2, epoch=0)
    again, _, _ = sampler(3000, 2, epoch=0)
    later, _, _ = sampler(3000, 2, epoch=1)
    assert first.batches() == again.batches()
    assert first.batches() != later.batches()


@pytest.mark.parametrize("world, accumulation", [(1, 1), (2, 1), (1, 2)])
def test_the_logged_epoch_counts_each_epoch_s_own_micro_batches(world, accumulation):
    """A budget packs each epoch's shuffle into a different number of micro-batches, so the
    logged epoch (train.epoch_progress) divides by the running epoch's count, not the first's:
    it rises every optimizer step and is a whole number exactly at each epoch's last step."""
    from launcher.rank.loaders import batches_per_rank_by_epoch
    from launcher.rank.train import epoch_progress

    made, _, _ = sampler(640, world * accumulation)
    by_epoch = batches_per_rank_by_epoch(made, 4, world)
    assert len(set(by_epoch)) > 1, f"every epoch packed alike ({by_epoch}): pick another budget"
    logged = []
    for epoch, count in enumerate(by_epoch):
        done = 0
        while done < count:  # the loop's windows: accumulation micro-batches, the last may be short
            done = min(done + accumulation, count)
            logged.append(epoch_progress(epoch, done, by_epoch))
        assert logged[-1] == epoch + 1
    assert all(a < b for a, b in zip(logged, logged[1:]))
    assert [value for value in logged if value == int(value)] == [1, 2, 3, 4]


def test_fixed_size_batches_unchanged():
    """Without a budget the sampler is still the fixed-size one, with Accelerate's batch size."""
    fixed = LengthGroupedBatchSampler(list(range(40)), 4, SEED, micro_batches_per_step=2)
    assert fixed.batch_size == 4 and {len(b) for b in fixed.batches()} == {4}
    assert TokenBudgetBatchSampler.batch_size is None


def test_a_checkpoint_of_another_budget_is_refused(tmp_path):
    """Another budget packs other micro-batches: the data position would point elsewhere."""
    from launcher.core.checkpoint import TrainState, check_compatible
    from launcher.core.errors import UserError

    with pytest.raises(UserError, match="micro_batch_tokens 1000 -> 2000"):
        check_compatible(TrainState(micro_batch_tokens=1000), TrainState(micro_batch_tokens=2000), tmp_path)
    with pytest.raises(UserError, match="micro_batch_tokens None -> 2000"):  # an older checkpoint
        check_compatible(TrainState(), TrainState(micro_batch_tokens=2000), tmp_path)
    check_compatible(TrainState(micro_batch_tokens=1000), TrainState(micro_batch_tokens=1000), tmp_path)


def test_a_refused_resume_on_other_ranks_names_the_users_change_not_the_accumulation_ftlaunch_set(tmp_path):
    """2 ranks x accumulation 1 resumed on 1 rank: ftlaunch sets accumulation 2 itself (the same
    micro-batches per step), so a refusal names only what the user changed (the micro batch)."""
    from launcher.core.checkpoint import TrainState, check_compatible
    from launcher.core.errors import UserError

    saved = TrainState(world_size=2, grad_accum=1, micro_batch_size=4, strategy="ddp")
    with pytest.raises(UserError, match=r"run shape \(micro_batch_size 4 -> 8\)"):
        check_compatible(
            saved, TrainState(world_size=1, grad_accum=2, micro_batch_size=8, strategy="ddp"), tmp_path
        )
    with pytest.raises(UserError, match=r"run shape \(grad_accum 1 -> 3; micro_batch_size 4 -> 8\)"):
        check_compatible(
            saved, TrainState(world_size=2, grad_accum=3, micro_batch_size=8, strategy="ddp"), tmp_path
        )


def test_a_token_budget_checkpoint_does_not_continue_with_other_length_buckets(tmp_path):
    """train.compile pads to length buckets and the budget counts the bucketed lengths: switching
    it on or off mid-epoch would apply the checkpoint's position to another packing of the epoch."""
    from launcher.core.checkpoint import TrainState, check_compatible
    from launcher.core.errors import UserError

    eager, compiled = (TrainState(micro_batch_tokens=2048, length_buckets=b) for b in ("off", "on"))
    with pytest.raises(
        UserError, match="train.compile's length buckets off -> on under train.micro_batch_tokens"
    ):
        check_compatible(eager, compiled, tmp_path)
    check_compatible(eager, compiled, tmp_path, force=True)
    check_compatible(TrainState(micro_batch_tokens=2048), compiled, tmp_path)  # an older checkpoint: unknown
    check_compatible(TrainState(length_buckets="off"), TrainState(length_buckets="on"), tmp_path)  # no budget


def test_a_compiled_runs_budget_counts_the_length_buckets_it_pads_to():
    """train.compile pads sources to multiples of 64 and targets to multiples of 16
    (compiling.BucketCollator): the budget must hold the bucketed batches the model really sees,
    which the unbucketed count would exceed."""
    from launcher.core.dialogues import load_data_split
    from launcher.core.recipe import Recipe
    from launcher.rank.compiling import BucketCollator
    from launcher.rank.data import tokenize_rows, train_batch_sampler
    from launcher.rank.model import load_tokenizer

    recipe = Recipe.model_validate(
        {"model": {"name": "tiny-t5"}, "data": {"dataset": "sample"}, "train": {"micro_batch_tokens": 1000}}
    )
    tokenizer = load_tokenizer(recipe)
    examples = tokenize_rows(load_data_split(recipe.data, "train"), tokenizer, recipe.data)
    columns = {key: [item[key] for item in examples] for key in ("input_ids", "labels")}
    limits = (recipe.data.max_source_length, recipe.data.max_target_length)
    from transformers import DataCollatorForSeq2Seq

    base = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    collate = BucketCollator(base, tokenizer.pad_token_id, limits[0], limits[1])

    def costs(buckets) -> list[int]:
        made = train_batch_sampler(columns, recipe.train, True, 2, buckets=buckets)
        made.epoch = 0
        out = []
        for batch in made.batches():
            collated = collate([examples[i] for i in batch])
            out.append(collated["input_ids"].numel() + collated["labels"].numel())
        return out

    assert max(costs(limits)) <= 1000
    assert max(costs(None)) > 1000  # counting unpadded lengths under-counts a compiled batch
