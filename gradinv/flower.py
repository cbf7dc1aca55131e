"""Capturing a Flower federation's updates on the server, as an honest-but-curious server sees them.

:class:`CapturingStrategy` wraps any strategy of Flower's Message API (``flwr.serverapp.strategy``, the API
Flower 1.20+ builds a ``ServerApp`` with) and passes every call through unchanged. On the way it keeps the
arrays each node was sent for training and, when the replies come back, writes one update file per reply in
:mod:`gradinv.capture`'s format: the model before the update (what the node was sent), the reply's arrays
minus those (FedAvg's update), the reply's example count, and the local training the server assumes. Labels
and images are not in the files: the server does not see them (an auditor who owns the clients can add
them with ``audit``). Files: ``OUT/round-RRR-node-N.pt`` (Flower's round, from 1, and the node's id).

Only this module imports ``flwr`` (the ``flower`` extra); ``import gradinv`` works without it.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .capture import CLIENT_BN, save_update
from .errors import ConfigError, require

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy
except ImportError:  # flwr missing, or older than the Message API
    raise ImportError(
        "gradinv.flower needs Flower 1.20 or newer (flwr), which is not installed: pip install 'gradinv[flower]'"
    ) from None

FIELD = "CapturingStrategy"
Audit = Callable[[int, int], Mapping[str, object] | None]


class CapturingStrategy(Strategy):
    """``strategy`` with every training reply saved as an update file in ``out`` (see the module's notes).

    ``model``: the model the ServerApp sends (an ``nn.Module``, or a function returning one), to name
    Flower's arrays: an ``ArrayRecord`` of the model's ``state_dict()`` is matched by name, one of plain
    arrays (``ArrayRecord(list_of_ndarrays)``) by position against the ``state_dict()`` or, as long as the
    parameters alone, against ``named_parameters()``. ``local_steps``, ``local_lr``, ``local_batch_size`` (0:
    all the node's examples in each step), ``local_momentum`` and ``client_bn`` (``train``: BatchNorm with
    each batch's statistics, as a client in ``model.train()`` computes) are what the server assumes about
    the nodes' local training. ``audit(server_round, node_id)``: an auditor's ground truth for that reply,
    ``{"images": ..., "labels": ...}`` (either may be left out) or None; never what a server sees.
    ``arrayrecord_key`` and ``weighted_by_key``: where the replies hold their arrays and example count
    (default: ``strategy``'s own, else the reply's only ArrayRecord and ``num-examples``)."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        model: nn.Module | Callable[[], nn.Module],
        out: str | os.PathLike,
        local_lr: float,
        local_steps: int = 1,
        local_batch_size: int = 0,
        local_momentum: float = 0.0,
        client_bn: str = "train",
        audit: Audit | None = None,
        arrayrecord_key: str | None = None,
        weighted_by_key: str | None = None,
    ) -> None:
        require(
            isinstance(strategy, Strategy),
            f"{FIELD}: strategy",
            type(strategy).__name__,
            "give a Strategy of flwr.serverapp.strategy",
        )
        self.strategy = strategy
        self.model = _template(model)
        self.out = _empty_directory(Path(out))
        self.recipe = _recipe(local_steps, local_lr, local_batch_size, local_momentum, client_bn)
        self.audit = audit
        self.arrayrecord_key = arrayrecord_key or getattr(strategy, "arrayrecord_key", None)
        self.weighted_by_key = weighted_by_key or getattr(strategy, "weighted_by_key", "num-examples")
        self.written: list[Path] = []  # every file saved, in order
        self._sent: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (round, node) -> state sent

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args, **kwargs) -> Result:
        """Flower's loop, after checking that the model names the initial arrays (before any round)."""
        named_state(initial_arrays, self.model)
        return super().start(grid, initial_arrays, *args, **kwargs)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        states: dict[int, dict[str, torch.Tensor]] = {}  # one conversion per distinct ArrayRecord
        for message in messages:
            sent = self._arrays(message.content, default=arrays)
            state = states.setdefault(id(sent), named_state(sent, self.model))
            self._sent[(server_round, message.metadata.dst_node_id)] = state
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # read twice: here and by the strategy
        for reply in replies:
            if not reply.has_error():
                self._capture(server_round, reply)
        for key in [key for key in self._sent if key[0] == server_round]:  # nodes that did not reply
            del self._sent[key]
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def _capture(self, server_round: int, reply: Message) -> None:
        node = reply.metadata.src_node_id
        before = self._sent.pop((server_round, node), None)
        require(before is not None, f"{FIELD}: reply", node, "a reply from a node that was not sent arrays this round")
        after = named_state(self._arrays(reply.content), self.model)
        names = [name for name, _ in self.model.named_parameters()]
        update = [after[name].float() - before[name].float() for name in names]
        self.model.load_state_dict(before)
        truth = dict(self.audit(server_round, node) or {}) if self.audit else {}
        unknown = sorted(set(truth) - {"images", "labels"})
        require(not unknown, f"{FIELD}: audit", unknown, "return a dict with images and/or labels, or None")
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"round-{server_round:03d}-node-{node}.pt"
        save_update(
            path,
            model=self.model,
            num_images=self._examples(reply.content, node),
            update=update,
            **self.recipe,
            **truth,
        )
        self.written.append(path)

    def _arrays(self, content: RecordDict, default: ArrayRecord | None = None) -> ArrayRecord:
        """The ArrayRecord a message carries (``arrayrecord_key``'s, else its only one; else ``default``)."""
        records = content.array_records
        if self.arrayrecord_key in records:
            return records[self.arrayrecord_key]
        if len(records) == 1:
            return next(iter(records.values()))
        require(
            default is not None,
            f"{FIELD}: arrayrecord_key",
            self.arrayrecord_key,
            f"name the reply's ArrayRecord, one of {sorted(records)}",
        )
        return default

    def _examples(self, content: RecordDict, node: int) -> int:
        """The node's example count, as the reply declares it (FedAvg weighs the replies by it)."""
        for record in content.metric_records.values():
            if self.weighted_by_key in record:
                count = record[self.weighted_by_key]
                require(
                    float(count).is_integer() and count >= 1,
                    f"{FIELD}: {self.weighted_by_key}",
                    count,
                    f"node {node} must report a whole number of examples",
                )
                return int(count)
        raise ConfigError(
            f"{FIELD}: weighted_by_key",
            self.weighted_by_key,
            f"node {node}'s reply has no such metric; name the one holding its example count",
        )


def named_state(arrays: ArrayRecord, model: nn.Module) -> dict[str, torch.Tensor]:
    """Flower's arrays as ``model``'s state (CPU tensors by name), checked against its shapes; entries the
    arrays lack (buffers, when only parameters are sent) are the model's own."""
    own = model.state_dict()
    keys = list(arrays.keys())
    parameters = [name for name, _ in model.named_parameters()]
    if all(key in own for key in keys):
        names = keys
        missing = [name for name in parameters if name not in keys]
        require(
            not missing,
            f"{FIELD}: arrays",
            missing[:1],
            "the arrays lack this parameter of the model; give the model the ServerApp sends",
        )
    elif len(keys) in (len(own), len(parameters)):
        names = list(own) if len(keys) == len(own) else parameters
    else:
        fix = f"not the model's names, and it has {len(own)} state entries ({len(parameters)} parameters)"
        raise ConfigError(f"{FIELD}: number of arrays", len(keys), f"{fix}; give the model the ServerApp sends")
    state = {name: tensor.detach().cpu().clone() for name, tensor in own.items()}
    for key, name in zip(keys, names):
        tensor = torch.from_numpy(arrays[key].numpy().copy())
        shape = tuple(own[name].shape)
        require(
            tuple(tensor.shape) == shape,
            f"{FIELD}: arrays[{name}]",
            tuple(tensor.shape),
            f"the model's is {shape}; give the model the ServerApp sends",
        )
        state[name] = tensor.to(own[name].dtype)
    return state


def _template(model) -> nn.Module:
    """A private copy of the model (loaded with each sent state in turn), from a module or a factory."""
    built = model if isinstance(model, nn.Module) else model() if callable(model) else None
    require(
        isinstance(built, nn.Module),
        f"{FIELD}: model",
        type(built if built is not None else model).__name__,
        "give the nn.Module the ServerApp sends, or a function returning it",
    )
    return copy.deepcopy(built).cpu().eval()


def _empty_directory(out: Path) -> Path:
    """``out``, refused if it holds captures already (a second run would mix with or replace them)."""
    require(not out.exists() or out.is_dir(), f"{FIELD}: out", str(out), "name a directory, not a file")
    earlier = sorted(out.glob("round-*-node-*.pt")) if out.is_dir() else []
    require(
        not earlier,
        f"{FIELD}: out",
        str(out),
        f"it holds captures of an earlier run ({earlier[0].name if earlier else ''}); name a new directory",
    )
    return out


def _recipe(steps, lr, batch, momentum, client_bn) -> dict:
    """The local training the server assumes, checked here (before any round) as the update file needs it."""

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    require(whole(steps) and steps >= 1, f"{FIELD}: local_steps", steps, "use at least 1 local step")
    require(number(lr) and lr > 0, f"{FIELD}: local_lr", lr, "give the nodes' positive local learning rate")
    require(
        whole(batch) and batch >= 0, f"{FIELD}: local_batch_size", batch, "use 0 (all examples in each step) or more"
    )
    require(number(momentum) and 0 <= momentum < 1, f"{FIELD}: local_momentum", momentum, "use a momentum in [0, 1)")
    require(client_bn in CLIENT_BN, f"{FIELD}: client_bn", client_bn, "use train (a client in model.train()) or eval")
    return dict(
        local_steps=steps,
        local_lr=float(lr),
        local_batch_size=batch,
        local_momentum=float(momentum),
        client_bn=client_bn,
    )
