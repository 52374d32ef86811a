"""train.auto_find_batch_size: the batch shape a training step ran out of memory at, and the next
smaller one, shared by the rank that records it (rank/out_of_memory.py) and the supervisor that
continues with it (host/supervise.py).

A fixed micro batch is divided by its smallest factor (16 -> 8, 6 -> 3, 5 -> 1) and the accumulation
multiplied by it: every optimizer step keeps exactly its examples, because the batch sampler forms
steps of micro batch x accumulation x world size examples whatever the split (rank/data.py), and a
resume keeps the epoch's position in examples (checkpoint.resumed_position). A token budget is
halved, down to the longest example it must hold, with the accumulation doubled: steps then hold
about as many tokens, packed into other micro-batches. Nothing here imports torch.
"""

from __future__ import annotations

from launcher.core.recipe import Recipe
from launcher.core.recipe_loading import build_recipe

# Set by the supervisor for the ranks once it has made the micro batch smaller: a checkpoint of the
# larger micro batch continues under the smaller one (a forced resume of the batch shape only).
AUTO_BATCH_ENV = "FTLAUNCH_AUTO_BATCH"
BATCH_KEYS = ("micro_batch_size", "micro_batch_tokens", "grad_accum")


def batch_shape(recipe: Recipe) -> dict[str, int | None]:
    """What a failure record keeps of the batch a step ran at."""
    return {key: getattr(recipe.train, key) for key in BATCH_KEYS}


def describe_shape(shape: dict[str, int | None]) -> str:
    """``micro batch 16 (accumulation 2)``, or ``token budget 2,048 (accumulation 2)``."""
    size = (
        f"token budget {shape['micro_batch_tokens']:,}"
        if shape.get("micro_batch_tokens")
        else f"micro batch {shape['micro_batch_size']}"
    )
    return f"{size} (accumulation {shape['grad_accum']})"


def smallest_factor(number: int) -> int:
    """The smallest divisor above 1 (the number itself when prime)."""
    return next(factor for factor in range(2, number + 1) if number % factor == 0)


def smaller_shape(recipe: Recipe) -> tuple[dict[str, int | None] | None, str]:
    """The next smaller batch shape, or None and why there is none."""
    shape = batch_shape(recipe)
    budget, size = shape["micro_batch_tokens"], shape["micro_batch_size"]
    if budget:
        longest = recipe.data.max_source_length + recipe.data.max_target_length
        if budget // 2 < longest:
            return None, (
                f"train.micro_batch_tokens={budget} cannot be halved below the longest example "
                f"(data.max_source_length + data.max_target_length = {longest} tokens)"
            )
        return {**shape, "micro_batch_tokens": budget // 2, "grad_accum": shape["grad_accum"] * 2}, ""
    if size == 1:
        return None, "train.micro_batch_size is already 1: nothing left to halve"
    factor = smallest_factor(size)
    return {**shape, "micro_batch_size": size // factor, "grad_accum": shape["grad_accum"] * factor}, ""


def with_shape(recipe: Recipe, shape: dict[str, int | None]) -> Recipe:
    """The recipe with another batch shape, validated like any recipe."""
    data = recipe.model_dump(mode="json")
    data["train"].update(shape)
    return build_recipe(data, "train.auto_find_batch_size")


def continuing_line(old: dict[str, int | None], new: dict[str, int | None], world_size: int) -> str:
    """The one line the supervisor prints before it continues with ``new``."""
    if new["micro_batch_tokens"]:
        keeps = f"about {old['micro_batch_tokens'] * old['grad_accum']:,} padded tokens per optimizer step per rank"
        size = f"token budget {new['micro_batch_tokens']:,}"
    else:
        per_rank = new["micro_batch_size"] * new["grad_accum"]
        keeps = f"the same {per_rank} examples per optimizer step per rank"
        keeps += f" ({per_rank * world_size} over {world_size} ranks)" if world_size > 1 else ""
        size = f"micro batch {new['micro_batch_size']}"
    return (
        f"ftlaunch: out of memory at {describe_shape(old)}: continuing with {size} and accumulation "
        f"{new['grad_accum']}, {keeps}, from the newest intact checkpoint (train.auto_find_batch_size)"
    )
