"""A Flower ``Grid`` whose nodes are ClientApps in this process: a real ServerApp and real ClientApps talk
through Flower's own message objects and wire format (each message and reply is serialised to Flower's
protobuf and read back, as between a SuperLink and a SuperNode), without Flower's simulation engine (which
needs ``flwr[simulation]`` and pins another Ray than gradinv's)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 7


class InProcessGrid(Grid):
    """Nodes ``first_node_id``, ``first_node_id + 1``, ... run ``client_app``; node i's ``node_config`` is
    ``node_configs[i]`` (Flower's ``partition-id`` convention), its Context kept across rounds."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict], first_node_id: int = 1001):
        self.client_app = client_app
        self.contexts = {
            first_node_id + i: Context(RUN_ID, first_node_id + i, dict(config), RecordDict(), {})
            for i, config in enumerate(node_configs)
        }
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's in-memory grid does
            received = wire(message)
            node = received.metadata.dst_node_id
            with identity(node):  # the ClientApp's process is the node's
                reply = wire(self.client_app(received, self.contexts[node]))
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def wire(message: Message) -> Message:
    """``message`` as the other side reads it: through Flower's protobuf form and bytes."""
    proto = message_to_proto(message)
    return message_from_proto(type(proto).FromString(proto.SerializeToString()))


def run_server_app(server_app: ServerApp, grid: InProcessGrid) -> None:
    """Run ``server_app`` on ``grid`` as Flower's ServerApp process runs it (its task identity set)."""
    with identity(SUPERLINK_NODE_ID):
        server_app(grid, Context(RUN_ID, SUPERLINK_NODE_ID, {}, RecordDict(), {}))


@contextmanager
def identity(node_id: int) -> Iterator[None]:
    """Flower's per-process task identity (what new messages are stamped with) as ``node_id``'s, restored after:
    in Flower each ServerApp and ClientApp runs in a process of its own."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = node_id, RUN_ID, node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
