"""Context parallelism: one sequence split across ranks, the recurrent state passed from rank to rank.

Rank ``r`` of ``R`` holds tokens ``[r * t, (r + 1) * t)`` of every sequence. Power retention over the whole
sequence equals power retention over each slice started from the state ``(S, z)`` at the end of the previous
slice (SPEC.md, segments), so for every layer

    rank r:  (S, z)_in  <- receive from rank r - 1          (zero state on rank 0)
             Y, (S, z)_out = power_retention(Q, K, V, log_G, initial_state=(S, z)_in)
             send (S, z)_out to rank r + 1                  (nothing on the last rank)

This is the linear-attention analogue of ring attention: what travels is a fixed-size state
(``[b, h, D, e] + [b, h, D]`` per layer), not the keys and values. The backward runs the chain in reverse:
rank ``r`` receives ``dL/d(S, z)_out`` from rank ``r + 1``, adds it to its own gradient of the final state,
and sends ``dL/d(S, z)_in`` to rank ``r - 1``. Both directions are autograd Functions, so forward and backward
are exact (equal to the single-process computation up to rounding).

Messages carry the layer index as their tag. Each rank's loss is the mean over its own tokens; averaging the
parameter gradients over ranks (:meth:`ContextParallel.average_gradients`) gives the gradient of the mean
over the whole sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from retention import power_retention, sympow_dim

__all__ = ["ContextParallel"]


class _ReceiveState(torch.autograd.Function):
    """Forward: receive ``(state, sum_of_keys)`` from rank ``source``. Backward: send their gradients back."""

    @staticmethod
    def forward(ctx, anchor, state_like, keys_like, source, tag, group):
        # ``anchor`` is a scalar that requires grad: it makes autograd record this node (and call backward).
        state = torch.empty(state_like[0], **state_like[1])
        keys = torch.empty(keys_like[0], **keys_like[1])
        dist.recv(state, src=source, tag=tag, group=group)
        dist.recv(keys, src=source, tag=tag, group=group)
        ctx.source, ctx.tag, ctx.group = source, tag, group
        return state, keys

    @staticmethod
    def backward(ctx, grad_state, grad_keys):
        dist.send(grad_state.contiguous(), dst=ctx.source, tag=ctx.tag, group=ctx.group)
        dist.send(grad_keys.contiguous(), dst=ctx.source, tag=ctx.tag, group=ctx.group)
        return None, None, None, None, None, None


class _SendState(torch.autograd.Function):
    """Forward: send ``(state, sum_of_keys)`` to rank ``destination`` and return a zero scalar ``token``.

    The token is added to the loss (its value is 0, so the loss is unchanged); that puts this node on the
    backward path, where it receives the gradient of the sent state from ``destination``.
    """

    @staticmethod
    def forward(ctx, state, keys, destination, tag, group):
        dist.send(state.detach().contiguous(), dst=destination, tag=tag, group=group)
        dist.send(keys.detach().contiguous(), dst=destination, tag=tag, group=group)
        ctx.destination, ctx.tag, ctx.group = destination, tag, group
        ctx.shapes = (state.shape, state.dtype, keys.shape, keys.dtype, state.device)
        return state.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_token):
        state_shape, state_dtype, keys_shape, keys_dtype, device = ctx.shapes
        grad_state = torch.empty(state_shape, dtype=state_dtype, device=device)
        grad_keys = torch.empty(keys_shape, dtype=keys_dtype, device=device)
        dist.recv(grad_state, src=ctx.destination, tag=ctx.tag, group=ctx.group)
        dist.recv(grad_keys, src=ctx.destination, tag=ctx.tag, group=ctx.group)
        return grad_state, grad_keys, None, None, None


class ContextParallel:
    """Passes power-retention states along the ranks of ``group`` (all ranks by default) in rank order.

    Use one per model: ``model(idx_slice, targets_slice, context_parallel=cp)`` calls :meth:`begin`, one
    :meth:`power_retention` per layer and :meth:`finish` on the loss.
    """

    def __init__(self, group=None):
        if not dist.is_initialized():
            raise ValueError("context parallelism needs torch.distributed to be initialised (torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._layer = 0
        self._tokens: list[torch.Tensor] = []

    def _global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def begin(self) -> None:
        self._layer = 0
        self._tokens = []

    def power_retention(self, Q, K, V, log_G=None, *, deg=2, scale=None, chunk_size=None, backend="auto"):
        """``retention.power_retention`` on this rank's slice, continuing the previous rank's state."""
        tag, self._layer = self._layer, self._layer + 1
        initial_state = None
        if self.rank > 0:
            b, _, _, d = Q.shape
            h, e = K.shape[2], V.shape[3]
            D = sympow_dim(d, deg)
            keys_dtype = torch.promote_types(Q.dtype, torch.float32)  # the public sum-of-keys dtype
            anchor = torch.zeros((), device=Q.device, requires_grad=torch.is_grad_enabled())
            initial_state = _ReceiveState.apply(
                anchor,
                ((b, h, D, e), {"dtype": Q.dtype, "device": Q.device}),
                ((b, h, D), {"dtype": keys_dtype, "device": Q.device}),
                self._global_rank(self.rank - 1), tag, self.group,
            )
        if self.rank == self.world_size - 1:
            return power_retention(Q, K, V, log_G, initial_state, deg=deg, scale=scale, chunk_size=chunk_size,
                                   backend=backend)
        Y, state, keys = power_retention(Q, K, V, log_G, initial_state, return_final_state=True, deg=deg,
                                         scale=scale, chunk_size=chunk_size, backend=backend)
        self._tokens.append(_SendState.apply(state, keys, self._global_rank(self.rank + 1), tag, self.group))
        return Y

    def finish(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the zero tokens of this forward's sends (same value; wires up the backward)."""
        for token in self._tokens:
            loss = loss + token
        self._tokens = []
        return loss

    def average_gradients(self, parameters) -> None:
        """Average ``.grad`` over the ranks: the gradient of the mean loss over the whole sequence."""
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)
                p.grad.div_(self.world_size)

    def average(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        return value / self.world_size
