"""A recommendation-style data set from a documented generative process (no download, deterministic).

The process, for ``num_users`` users, ``num_items`` items and ``num_categories`` categories in a
``latent_dim``-dimensional taste space (all draws from one seeded generator):

1. Each category c has a centre ``mu_c ~ N(0, I)``. Each item i gets a category ``c_i`` uniformly,
   a vector ``v_i = mu_{c_i} + 0.5 * eps_i`` and a popularity bias ``b_i = -zipf * log(r_i)`` where
   ``r_i`` is a random rank 1..num_items (a Zipf-like head and tail).
2. Each user u likes one or two categories: ``w_u = mean of their centres + 0.3 * eps_u``.
3. Each user makes ``interactions_per_user`` interactions, each item drawn from
   ``softmax_i(w_u . v_i / temperature + b_i)`` over all items.
4. Example t of a user is (user id, the user's previous up to ``max_history`` items, item t): the
   history is a variable-length id list, which is what ``KeyedJaggedTensor`` carries.
5. Split by time: each user's last interaction is held out, the others are training examples.

Because the process is known, ``oracle_scores`` gives the true log-odds for an upper reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Interactions:
    """Examples as flat tensors: ``users`` [N], ``items`` [N], history ids as jagged ``values``/``lengths``."""

    users: torch.Tensor
    items: torch.Tensor
    history_values: torch.Tensor
    history_lengths: torch.Tensor  # [N], sum == len(history_values)

    def __len__(self) -> int:
        return self.users.numel()

    def select(self, index: torch.Tensor) -> "Interactions":
        """The examples at ``index`` (history lists gathered from the jagged layout)."""
        offsets = torch.cat([self.history_lengths.new_zeros(1), self.history_lengths.cumsum(0)])
        lengths = self.history_lengths[index]
        starts = offsets[index]
        values = [self.history_values[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
        return Interactions(
            self.users[index], self.items[index],
            torch.cat(values) if values else self.history_values.new_zeros(0), lengths,
        )


@dataclass
class RecData:
    num_users: int
    num_items: int
    num_categories: int
    item_category: torch.Tensor  # [num_items]
    user_taste: torch.Tensor  # [num_users, latent_dim] (generator state, for the oracle only)
    item_vector: torch.Tensor  # [num_items, latent_dim]
    item_bias: torch.Tensor  # [num_items]
    temperature: float
    train: Interactions
    test: Interactions

    def oracle_scores(self, users: torch.Tensor) -> torch.Tensor:
        """The generating process's logits for ``users`` against every item."""
        return self.user_taste[users] @ self.item_vector.t() / self.temperature + self.item_bias


def generate(
    num_users: int = 2000,
    num_items: int = 4000,
    num_categories: int = 20,
    latent_dim: int = 16,
    interactions_per_user: int = 30,
    max_history: int = 8,
    temperature: float = 1.0,
    zipf: float = 0.6,
    seed: int = 0,
) -> RecData:
    """Runs the process of the module docstring."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_categories, latent_dim, generator=g)
    item_category = torch.randint(0, num_categories, (num_items,), generator=g)
    item_vector = centres[item_category] + 0.5 * torch.randn(num_items, latent_dim, generator=g)
    ranks = torch.randperm(num_items, generator=g).double() + 1
    item_bias = (-zipf * ranks.log()).float()

    liked = torch.randint(0, num_categories, (num_users, 2), generator=g)
    two = torch.rand(num_users, generator=g) < 0.5
    taste = torch.where(two.unsqueeze(1), (centres[liked[:, 0]] + centres[liked[:, 1]]) / 2, centres[liked[:, 0]])
    user_taste = taste + 0.3 * torch.randn(num_users, latent_dim, generator=g)

    logits = user_taste @ item_vector.t() / temperature + item_bias
    sequence = torch.multinomial(torch.softmax(logits, 1), interactions_per_user, replacement=True, generator=g)

    examples = {"train": ([], [], [], []), "test": ([], [], [], [])}
    for u in range(num_users):
        seq = sequence[u].tolist()
        for t, item in enumerate(seq):
            history = seq[max(0, t - max_history) : t]
            users, items, values, lengths = examples["test" if t == len(seq) - 1 else "train"]
            users.append(u)
            items.append(item)
            values.extend(history)
            lengths.append(len(history))

    def pack(parts) -> Interactions:
        users, items, values, lengths = parts
        return Interactions(
            torch.tensor(users, dtype=torch.int64), torch.tensor(items, dtype=torch.int64),
            torch.tensor(values, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64),
        )

    return RecData(
        num_users, num_items, num_categories, item_category, user_taste, item_vector, item_bias,
        temperature, pack(examples["train"]), pack(examples["test"]),
    )
