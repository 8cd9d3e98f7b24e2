"""Every collective the engine calls, and nothing else: the only layer that can hang.

A ``Comm`` runs over one :class:`~sharded_negcache.topology.Topology` (or none: one process holds the
whole cache and every collective is the identity). It also counts the bytes this rank sends, per
collective, so that the benchmarks measure communication instead of estimating it. Counting rule: all_gather and
all_to_all count the payload this rank hands to *other* ranks; all_reduce counts the tensor once.

Two-level layout: ``shard_group`` is this rank's shard group (queries, partials, rows move only inside
it) and ``world_group`` the whole job: the agreement, the config check and the statistics run over
it, so a rejected batch or a non-finite row on any rank raises on every rank of the job.
"""
from __future__ import annotations

import math
import pickle
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, NoReturn, Sequence

import torch
import torch.distributed as dist

from .topology import Topology

__all__ = ["Comm", "CandidateRows", "RowRoute", "BatchRejected", "CollectiveFailed", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 300.0  # a step's collective that has not completed by then names itself and fails


class BatchRejected(ValueError):
    """Raised on every rank when any rank's input failed validation (nothing was written)."""


class CollectiveFailed(RuntimeError):
    """A collective did not complete (a rank died, stalled or disconnected): names the step and the collective."""


# torch >= 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns).
_all_gather_concat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CandidateRows:
    """The candidates' packed rows that came with the partials (the eager fetch): sender ``rank``'s
    ``candidate``-th candidate of this rank's ``query`` is row ``rank * per_rank + head + query * n + candidate``
    of ``table``."""

    table: torch.Tensor  # [W * per_rank, row bytes] uint8
    per_rank: int  # rows of each sender's message
    head: int  # rows of a message taken by its partials
    n: int  # candidates per query

    def select(self, rank: torch.Tensor, query: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """[k, row bytes]: the packed rows of the k given (sender, query, candidate) triples."""
        return self.table.index_select(0, rank * self.per_rank + self.head + query * self.n + candidate)


@dataclass
class RowRoute:
    """Who asked whom for which rows in one step; the write-back reuses it in reverse."""

    send_counts: list[int]  # rows this rank requested from each owner
    recv_counts: list[int]  # rows each home rank requested from this rank
    served_slots: torch.Tensor  # local slots this rank served, in the order received


class Comm:
    """Collectives over one topology's process groups, with per-collective byte counters.

    ``shard_size``/``shard_rank`` (G) are those of ``shard_group`` (the cache's ranks: data movement);
    ``world_size``/``rank`` (W) those of ``world_group`` (agreement, config checks, statistics);
    ``members``: the world ranks of ``shard_group``, in order. In the flat layout both groups are one.
    """

    def __init__(self, topology: Topology | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.topology = topology = topology or Topology(1, 0, 1, 0, 0)  # None: one process, no collectives
        self.distributed, self.two_level = topology.distributed, topology.two_level
        self.world_group, self.world_size, self.rank = topology.world_group, topology.world_size, topology.rank
        self.shard_group, self.shard_size, self.shard_rank = topology.shard_group, topology.shard_size, topology.shard_rank
        self.members = list(topology.members)
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)  # collectives launched, by name (read by the benchmarks)
        if not timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be positive, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.step = 0  # set by the handler, for error messages
        self.gather_capacity = 0  # rows per rank that the agreement all-gather carries (see agree)

    def _run(self, name: str, launch: Callable[[], "dist.Work"]) -> None:
        """Launches an async collective and waits at most ``timeout_s``; failures name the step and collective."""
        self.run(name, launch)

    def run(self, name: str, launch: Callable[[], "dist.Work"], *, step: int | None = None,
            kind: str = "collective") -> None:
        """Launches an async collective and waits at most ``timeout_s``: every collective of the engine and of
        its checkpoints goes through here, so a stalled or dead rank fails the same way everywhere
        (:class:`CollectiveFailed` naming the step, the collective and this rank)."""
        self.calls[name] += 1
        try:
            work = launch()
            work.wait(timedelta(seconds=self.timeout_s))
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with transport details
            raise self.failure(name, exc, step=step, kind=kind) from exc

    def failure(self, name: str, exc: BaseException | str, *, step: int | None = None, kind: str = "collective",
                timed: bool = True) -> CollectiveFailed:
        """The error for collective ``name`` that failed with ``exc`` (``timed``: it ran under ``timeout_s``)."""
        within = f" within {self.timeout_s:g} s" if timed else ""
        return CollectiveFailed(
            f"step {self.step if step is None else step}: {kind} '{name}' on {self.topology.where()} did not "
            f"complete{within} (a rank died, stalled or disconnected): {exc}"
        )

    def gather_objects(self, obj: object, name: str, *, step: int | None = None, kind: str = "collective") -> list:
        """Every world rank's picklable ``obj``, by rank, under the collective timeout (two all-gathers:
        the sizes, then the padded bytes)."""
        if self.world_size == 1:
            return [obj]
        nccl = dist.get_backend(self.world_group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        sizes = torch.empty(self.world_size, dtype=torch.int64, device=device)
        self.run(name, lambda: _all_gather_concat(sizes, size, group=self.world_group, async_op=True), step=step, kind=kind)
        counts = sizes.tolist()
        buf = torch.zeros(max(counts), dtype=torch.uint8, device=device)
        buf[: data.numel()] = data
        out = torch.empty(self.world_size * buf.numel(), dtype=torch.uint8, device=device)
        self.run(name, lambda: _all_gather_concat(out, buf, group=self.world_group, async_op=True), step=step, kind=kind)
        out = out.view(self.world_size, buf.numel()).cpu()
        return [pickle.loads(out[r, : counts[r]].numpy().tobytes()) for r in range(self.world_size)]

    @property
    def active(self) -> bool:
        return self.shard_size > 1

    def reset_counters(self) -> None:
        self.bytes_sent.clear()
        self.calls.clear()

    # ---- agreement -------------------------------------------------------------------------
    def agree(
        self,
        status: torch.Tensor,
        describe: Callable[[int], str | None],
        rows: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All-gathers an int64 ``status`` row [code, batch, *stats] over the world group; raises on every rank
        if any code != 0. ``describe(code)`` turns this rank's code into its message.

        ``rows``: tensors with ``status[1]`` rows each (the queries, the positives' ids) that
        :meth:`gather_agreed` will gather over the shard group; in the flat layout they ride in this same
        all-gather when every batch fits the padded capacity (:meth:`_agree_with_rows`). Returns the status
        table [world_size, len(status)] on host (``table[comm.members]`` are the rows of this rank's shard
        group) and the gathered rows as bytes, or None when :meth:`gather_agreed` must gather them itself.
        """
        if self.world_size > 1 and not self.two_level and rows:
            table, payload = self._agree_with_rows(status, rows)
        elif self.world_size > 1:
            out = torch.empty(self.world_size, status.numel(), dtype=status.dtype, device=status.device)
            self._run("agree", lambda: _all_gather_concat(out, status.unsqueeze(0), group=self.world_group, async_op=True))
            self.bytes_sent["agree"] += _nbytes(status) * (self.world_size - 1)
            table, payload = out.cpu(), None
        else:
            table, payload = status.unsqueeze(0).cpu(), None
        codes = table[:, 0].tolist()
        if any(codes):
            mine = describe(codes[self.rank]) if codes[self.rank] else None
            self.raise_together(mine, BatchRejected, "batch rejected, cache unchanged; ")
        return table, payload

    def gather_agreed(self, rows: Sequence[torch.Tensor], sizes: list[int], payload: torch.Tensor | None) -> list[torch.Tensor]:
        """Each of ``rows`` concatenated over the shard group in rank order (``sizes``: the agreed batch sizes),
        from the agreement's ``payload`` when it carried them, else with one all-gather of all of them.

        Called only once the ranks agreed on the configuration (the rows' widths follow from it): the padded
        capacity grows here, identically on every rank, to the largest batch gathered so far.
        """
        if not self.active:
            return list(rows)
        if payload is None:
            packed = self.gather_rows(_rows_as_bytes(rows, sizes[self.shard_rank]), sizes)
            self.gather_capacity = max(self.gather_capacity, max(sizes))
        else:
            packed = torch.cat([payload[r, : sizes[r]] for r in range(self.shard_size)])
        return _rows_from_bytes(packed, rows)

    def _agree_with_rows(self, status: torch.Tensor, rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat layout: the status row and this rank's rows (as bytes, padded to ``gather_capacity``) in one
        all-gather. The capacity is the largest batch seen so far, the same on every rank (it changes only from
        gathered sizes), so the buffers match; a batch above it is gathered again at its size, once."""
        cap, own = self.gather_capacity, rows[0].shape[0]
        row_bytes = sum(_row_nbytes(t) for t in rows)
        buf = torch.zeros(8 * status.numel() + cap * row_bytes, dtype=torch.uint8, device=status.device)
        buf[: 8 * status.numel()] = status.view(torch.uint8)
        if 0 < own <= cap:
            buf[8 * status.numel(): 8 * status.numel() + own * row_bytes] = _rows_as_bytes(rows, own).reshape(-1)
        out = torch.empty(self.world_size * buf.numel(), dtype=torch.uint8, device=buf.device)
        self._run("agree", lambda: _all_gather_concat(out, buf, group=self.world_group, async_op=True))
        self.bytes_sent["agree"] += 8 * status.numel() * (self.world_size - 1)
        self.bytes_sent["gather_queries"] += cap * row_bytes * (self.world_size - 1)
        out = out.view(self.world_size, buf.numel())
        table = out[:, : 8 * status.numel()].contiguous().view(torch.int64).cpu()
        if max(table[:, 1].tolist()) > cap or table[:, 0].any():
            return table, None
        return table, out[:, 8 * status.numel():].view(self.world_size, cap, row_bytes)

    def raise_together(
        self, mine: str | None, error: type[Exception], header: str, footer: str = "",
        cause: BaseException | None = None,
    ) -> NoReturn:
        """Every rank raises ``error`` with one message naming each failing rank and its ``mine`` text.

        Called by every rank once all know (from a collective) that some rank failed; ``mine`` is None
        on ranks that did not. One object all-gather, on the error path only.
        """
        messages = self.all_gather_object(mine)
        bad = "; ".join(f"rank {r}: {msg}" for r, msg in enumerate(messages) if msg)
        raise error(header + bad + footer) from cause

    def all_gather_object(self, obj: object) -> list:
        """Every world rank's ``obj`` (for error messages: runs over the world group)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.world_group)
        return out

    # ---- queries and partials --------------------------------------------------------------
    def gather_rows(self, x: torch.Tensor, sizes: list[int], tag: str = "gather_queries") -> torch.Tensor:
        """Concatenation over ranks of each rank's ``x`` [sizes[r], ...] (rank order)."""
        if not self.active:
            return x
        pad = max(sizes)
        buf = x.new_zeros(pad, *x.shape[1:])
        buf[: x.shape[0]] = x
        out = x.new_empty(self.shard_size * pad, *x.shape[1:])
        buf = buf.contiguous()
        self._run(tag, lambda: _all_gather_concat(out, buf, group=self.shard_group, async_op=True))
        self.bytes_sent[tag] += _nbytes(buf) * (self.shard_size - 1)
        out = out.view(self.shard_size, pad, *x.shape[1:])
        return torch.cat([out[r, : sizes[r]] for r in range(self.shard_size)])

    def gather_rows_with_grad(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Like :meth:`gather_rows`, differentiable: the backward sums every rank's gradient (all-reduce)."""
        if not self.active:
            return x
        return _GatherRowsWithGrad.apply(x, self, sizes)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int], tag: str) -> torch.Tensor:
        """Rows of ``x`` split by ``send_counts`` go to shard ranks 0..G-1; returns the rows received."""
        if not self.active:
            return x
        out = x.new_empty(sum(recv_counts), *x.shape[1:])
        x = x.contiguous()
        self._run(tag, lambda: dist.all_to_all_single(
            out, x, recv_counts, send_counts, group=self.shard_group, async_op=True))
        row = _nbytes(x[:1]) if x.shape[0] else 0
        self.bytes_sent[tag] += row * (sum(send_counts) - send_counts[self.shard_rank])
        return out

    def partials_to_home(self, partials: torch.Tensor, sizes: list[int],
                         rows: torch.Tensor | None = None) -> tuple[torch.Tensor, CandidateRows | None]:
        """[B_g, c] float64 partials of every gathered query → [W, B_own, c]: each rank's view of my queries.

        ``rows`` [B_g, n, row bytes] uint8 (the eager fetch): each query's n local candidates' packed rows, sent
        in the same all-to-all and returned as :class:`CandidateRows` (None without). Each message then counts
        in rows of ``row bytes``: its queries' partials, zero-padded to whole rows, then their candidates, so
        that every candidate received is one row of one table (a home reads the rows it needs with one
        index_select, never a copy of all it received)."""
        own, w = sizes[self.shard_rank], self.shard_size
        if rows is None:
            return self.all_to_all(partials, sizes, [own] * w, "partials").view(w, own, partials.shape[1]), None
        cols, n, row_bytes = partials.shape[1], rows.shape[1], rows.shape[2]
        head = [-(-8 * cols * b // row_bytes) for b in sizes]  # rows of each message taken by its partials
        units = [h + b * n for h, b in zip(head, sizes)]
        send = rows.new_empty(sum(units), row_bytes)
        as_bytes, flat_rows = partials.contiguous().view(torch.uint8), rows.reshape(-1, row_bytes)
        at = first = 0
        for b, h, u in zip(sizes, head, units):
            partial_rows = send[at: at + h].view(-1)
            partial_rows[8 * cols * b:].zero_()
            partial_rows[: 8 * cols * b] = as_bytes[first: first + b].reshape(-1)
            send[at + h: at + u] = flat_rows[first * n: (first + b) * n]
            at, first = at + u, first + b
        got = self.all_to_all(send, units, [units[self.shard_rank]] * w, "partials")
        per_rank = units[self.shard_rank]
        heads = got.view(w, per_rank * row_bytes)[:, : 8 * cols * own]
        received = heads.contiguous().view(-1).view(torch.float64).view(w, own, cols)
        return received, CandidateRows(got, per_rank, head[self.shard_rank], n)

    # ---- rows ------------------------------------------------------------------------------
    def exchange_counts(self, send_counts: list[int], device: torch.device) -> list[int]:
        """How many rows each rank will send this one, given how many this one sends each (an all-to-all)."""
        if not self.active:
            return list(send_counts)
        send = torch.tensor(send_counts, dtype=torch.int64, device=device)
        recv = torch.empty_like(send)
        self._run("row_counts", lambda: dist.all_to_all_single(recv, send, group=self.shard_group, async_op=True))
        self.bytes_sent["row_counts"] += 8 * (self.shard_size - 1)
        return recv.tolist()

    def fetch_rows(
        self,
        owners: torch.Tensor,
        local_slots: torch.Tensor,
        pack: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        jagged_lengths: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        capacity: Sequence[int],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], RowRoute]:
        """Asks each row's owner for it. ``owners`` must be sorted ascending (rows grouped by owner).

        ``capacity[r]``: the most rows rank r can ask one owner for (its draws, bounded by the shard), the same
        on every rank. Requests travel padded to it (-1), so an owner knows what it receives without a count
        exchange. Returns the packed fixed-size rows in the order requested, the values of each jagged field
        (one more all-to-all per field, sized from the lengths inside the packed rows), and the route for
        :meth:`write_back`.
        """
        send_counts = torch.bincount(owners, minlength=self.shard_size).tolist()
        if not self.active:
            served, recv_counts = local_slots, list(send_counts)
        else:
            cap = capacity[self.shard_rank]
            starts = torch.tensor([0] + send_counts[:-1], device=owners.device).cumsum(0)
            requests = torch.full((self.shard_size, cap), -1, dtype=local_slots.dtype, device=local_slots.device)
            requests[owners, torch.arange(owners.numel(), device=owners.device) - starts[owners]] = local_slots
            got = self.all_to_all(requests.view(-1), [cap] * self.shard_size, list(capacity), "row_ids")
            valid = got >= 0
            recv_counts = _segment_sums(valid.long(), list(capacity))
            served = got[valid]
        fixed, var = pack(served)
        rows = self.all_to_all(fixed, recv_counts, send_counts, "row_fetch")
        if var:
            sent, got_lengths = jagged_lengths(fixed), jagged_lengths(rows)
            for key in var:
                out_sizes = _segment_sums(sent[key], recv_counts)
                in_sizes = _segment_sums(got_lengths[key], send_counts)
                var[key] = self.all_to_all(var[key], out_sizes, in_sizes, "row_fetch_jagged")
        return rows, var, RowRoute(send_counts, recv_counts, served)

    def write_back(self, route: RowRoute, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sends fresh rows (request order) back to their owners; returns (local slots, rows) received."""
        got = self.all_to_all(fresh, route.send_counts, route.recv_counts, "write_back")
        return route.served_slots, got

    def send_to_owners(
        self, owners: torch.Tensor, local_slots: torch.Tensor, rows: torch.Tensor, tag: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sends ``rows`` [k, ...] to the ranks ``owners`` [k] that hold their ``local_slots``; returns the
        (local slots, rows) this rank received, in rank order (the corpus positives' refresh)."""
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=self.shard_size).tolist()
        recv_counts = self.exchange_counts(send_counts, local_slots.device)
        slots = self.all_to_all(local_slots[order], send_counts, recv_counts, f"{tag}_ids")
        return slots, self.all_to_all(rows[order], send_counts, recv_counts, tag)

    def stats_and_rows_to_owners(
        self, stats: torch.Tensor, owners: torch.Tensor, local_slots: torch.Tensor, rows: torch.Tensor,
        capacity: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The statistics' sum and the fresh rows' way back to their owners in one all-to-all (flat layout).

        Every message opens with the sender's ``stats`` (float64), so each rank sums the same W vectors in rank
        order: the all-reduce's result, one collective fewer. ``rows`` [k, c] float32 go to ``owners`` [k]
        (sorted ascending) at ``local_slots``, padded to ``capacity[r]`` per owner (the rows rank r can send
        one owner, the same on every rank) with slot -1, so no size needs a count exchange. A message is
        [stats | slots | rows], zero-padded to a multiple of 8 bytes so that every field is read in place.
        Returns (summed stats, local slots, rows) received, in rank order then the sender's order.
        """
        w, c, head = self.shard_size, rows.shape[1], 8 * stats.numel()
        size = [-(-(head + r * (8 + 4 * c)) // 8) * 8 for r in capacity]  # bytes of rank r's message
        cap, mine = capacity[self.shard_rank], size[self.shard_rank]
        send = torch.zeros(w, mine, dtype=torch.uint8, device=rows.device)
        slots, table = _message_fields(send, head, cap, c)
        send[:, :head].view(torch.float64).copy_(stats.to(torch.float64).reshape(1, -1))
        place = torch.arange(owners.numel(), device=owners.device) - torch.searchsorted(owners, owners)
        slots.fill_(-1)
        slots[owners, place] = local_slots  # each owner's rows first, in order: the valid slots are a prefix
        table[owners, place] = rows
        got = self.all_to_all(send.view(-1), [mine] * w, size, "stats")
        total, got_slots, got_rows, at = None, [], [], 0
        for r in range(w):
            msg = got[at: at + size[r]].view(1, size[r])
            at += size[r]
            s = msg[0, :head].view(torch.float64)
            total = s if total is None else total + s
            r_slots, r_rows = _message_fields(msg, head, capacity[r], c)
            got_slots.append(r_slots[0])
            got_rows.append(r_rows[0])
        counts = torch.stack([(t >= 0).sum() for t in got_slots]).tolist()  # a shape that depends on data
        return (total.view(stats.shape), torch.cat([t[:n] for t, n in zip(got_slots, counts)]),
                torch.cat([t[:n] for t, n in zip(got_rows, counts)]))

    # ---- statistics ------------------------------------------------------------------------
    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the world group: statistics are global, and every rank learns of every rank's faults."""
        if self.world_size > 1:
            self._run("stats", lambda: dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.world_group, async_op=True))
            self.bytes_sent["stats"] += _nbytes(x)
        return x


def _message_fields(msg: torch.Tensor, head: int, cap: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the slots [n, cap] int64 and rows [n, cap, c] float32 of n statistics messages ``msg``
    [n, bytes] uint8 (:meth:`Comm.stats_and_rows_to_owners`: ``head`` bytes of statistics first)."""
    slots = msg[:, head: head + 8 * cap].view(torch.int64)
    rows = msg[:, head + 8 * cap: head + 8 * cap + 4 * cap * c].view(torch.float32).view(msg.shape[0], cap, c)
    return slots, rows


def _segment_sums(values: torch.Tensor, counts: list[int]) -> list[int]:
    """Sums of consecutive segments of ``values`` with the given lengths (one host read)."""
    if not counts:
        return []
    ids = torch.repeat_interleave(torch.arange(len(counts), device=values.device),
                                  torch.tensor(counts, device=values.device), output_size=values.numel())
    return torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add_(0, ids, values).tolist()


class _GatherRowsWithGrad(torch.autograd.Function):
    """Padded all-gather forward; all-reduce of the gathered gradient, own slice backward (any backend)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: "Comm", sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.comm, ctx.sizes = comm, sizes
        return comm.gather_rows(x.detach(), sizes, tag="gather_positives")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        comm, sizes = ctx.comm, ctx.sizes
        grad = grad.contiguous().clone()
        comm._run("gather_grad", lambda: dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=comm.shard_group, async_op=True))
        comm.bytes_sent["gather_grad"] += _nbytes(grad)
        start = sum(sizes[: comm.shard_rank])
        return grad[start : start + sizes[comm.shard_rank]], None, None


def _row_nbytes(t: torch.Tensor) -> int:
    """Bytes of one row of ``t`` (its first dimension indexes rows)."""
    return math.prod(t.shape[1:]) * t.element_size()


def _rows_as_bytes(rows: Sequence[torch.Tensor], count: int) -> torch.Tensor:
    """[count, row bytes] uint8: the rows of every tensor side by side (zeros where a tensor has no rows,
    e.g. a rejected batch)."""
    parts = []
    for t in rows:
        if t.shape[0] == count:
            parts.append(t.contiguous().view(torch.uint8).reshape(count, _row_nbytes(t)))
        else:
            parts.append(torch.zeros(count, _row_nbytes(t), dtype=torch.uint8, device=t.device))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _rows_from_bytes(packed: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of :func:`_rows_as_bytes` for gathered rows: one tensor per ``like`` (its dtype and row shape)."""
    out, at = [], 0
    for t in like:
        width = _row_nbytes(t)
        cols = packed[:, at: at + width].clone(memory_format=torch.contiguous_format)  # aligned for .view
        out.append(cols.view(t.dtype).reshape(packed.shape[0], *t.shape[1:]))
        at += width
    return out
