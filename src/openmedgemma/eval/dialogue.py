"""Questions about one image chained into a conversation, as a user asks them in `openmedgemma chat`.

The first turn carries the image and the report's VQA prompt; each follow-up is the bare question (the
instruction was given once, as a chat user would not repeat it). Shared by the nano recipe's multi-turn SFT
data and the held-out multi-turn evaluation (`vqa-rad-dialogue`), so both build dialogues the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")

DIALOGUE_TURNS = 3  # questions per dialogue at most (keeps a dialogue within the nano recipe's 192 tokens)


def chain_dialogues(items: Sequence[T], image_of: Callable[[T], Hashable], group_of: Callable[[T], Hashable],
                    turns: int = DIALOGUE_TURNS) -> list[list[T]]:
    """`items` grouped into dialogues of at most `turns`, each about one image, in the items' order.

    Two items of one group (VQA-RAD's `qid_linked_id`: paraphrases of one question) never share a dialogue,
    so an earlier turn never gives away a later turn's answer. Greedy: each item joins the first open
    dialogue of its image that has room and lacks its group, else starts a new one. Deterministic.
    """
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    by_image: dict[Hashable, list[list[T]]] = {}
    order: list[list[T]] = []
    for item in items:
        dialogues = by_image.setdefault(image_of(item), [])
        group = group_of(item)
        home = next((d for d in dialogues if len(d) < turns and all(group_of(x) != group for x in d)), None)
        if home is None:
            home = []
            dialogues.append(home)
            order.append(home)
        home.append(item)
    return order
