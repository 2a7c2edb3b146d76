"""The merge plan: a DAG of node ids, payloads in a dict beside it.

Nodes are immutable and hash-consed on (op, inputs, params): building the same
sub-expression twice returns the same id, so merges that share task vectors share
their nodes and each input tensor is read once.

NOTE: the edges are the nodes' `inputs`; `Plan.graph` builds the networkx DiGraph on
demand (for analyses and debugging). The passes work on the dict directly: building
and copying networkx graphs dominated compile time on big plans (thousands of nodes
per merge of many experts), and importing networkx alone costs a tenth of a second.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any


def shape_numel(shape) -> int:
    """Elements of a tensor of `shape` (1 for a scalar's empty shape)."""
    return math.prod(int(d) for d in shape)

Param = tuple[str, Any]


@dataclass(frozen=True)
class PlanNode:
    op: str
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    group: str  # tensor group (output tensor name) the node is computed in; "" for reduces
    loc: str = ""  # spec.fuse:14
    shape: tuple[int, ...] | None = None

    def param(self, name: str, default: Any = None) -> Any:
        for k, v in self.params:
            if k == name:
                return v
        return default


@dataclass
class SourceSpec:
    """A model read by the plan: its directory and tensor headers."""

    key: str  # display name, e.g. base
    path: str
    tensors: dict[str, tuple[str, tuple[int, ...], str]]  # name -> (dtype, shape, shard file)
    config: dict = field(default_factory=dict)
    at: tuple | None = None  # the source call in the spec (file, line, column, end line, end column)
    # a model stage's result (fusionlang.stages): {"kind", "model", "model_dir", "data", "params",
    # "estimate"}; its tensors' files are set when the stage has run (stages.run.run_stages)
    stage: dict | None = None


@dataclass
class OutputSpec:
    """One saved model: where it goes and which node defines each of its tensors."""

    name: str
    path: str
    dtype: str | None  # None: the dtype of the reference input tensor
    tensors: dict[str, str]  # output tensor name -> node id
    dtypes: dict[str, str]  # output tensor name -> safetensors dtype
    shapes: dict[str, tuple[int, ...]]
    reference: str  # source key whose config / tokenizer are copied
    config_overrides: dict = field(default_factory=dict)
    loc: str = ""
    # tensors computed in row blocks (by the split pass): name -> [(first row, node)]
    blocks: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    at: tuple | None = None  # the save's path in the spec (file, line, column, end line, end column)
    note: str = ""  # what `compile` says about the output besides its tensors (a MoE's parameter counts)
    description: dict = field(default_factory=dict)  # an upscaled model's fusionlang_model.json (`arch.upscaled`)
    tokenizer: str = ""  # a vocabulary spec (`arch.vocab.build`): the output tokenizer written in place of the reference's

    def parts(self, tensor: str) -> list[tuple[int, str]]:
        """(first row, node) pieces that make up an output tensor."""
        return self.blocks.get(tensor) or [(0, self.tensors[tensor])]


def _canon(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return float(v)
    if isinstance(v, list):
        return tuple(_canon(x) for x in v)
    return v


# Same text as json.dumps(..., default=str), without building an encoder per call.
_ENCODER = json.JSONEncoder(default=str, check_circular=False)


class Plan:
    def __init__(self) -> None:
        self.nodes: dict[str, PlanNode] = {}
        self.sources: dict[str, SourceSpec] = {}
        self.outputs: dict[str, OutputSpec] = {}
        self.spec_text: str = ""
        self.spec_file: str = ""
        self.spec_files: list[str] = []  # the spec and the spec files it `use`s (outputs never hold them)
        self.hashcons = True
        self.history: list[tuple[str, int]] = []  # (pass name, node count after it)
        self.order: list[str] = []  # execution order, set by the schedule pass
        self.phase_of: dict[str, int] = {}

    # -- construction
    @staticmethod
    def node_id(op: str, inputs: tuple[str, ...], params: tuple[Param, ...], group: str) -> str:
        key = _ENCODER.encode([op, list(inputs), [[k, v] for k, v in params], group])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def add(self, op: str, inputs: tuple[str, ...] = (), params: dict | tuple = (), *, group: str,
            loc: str = "", shape: tuple[int, ...] | None = None) -> str:
        items = tuple(sorted(params.items())) if isinstance(params, dict) else tuple(params)
        items = tuple((k, _canon(v)) for k, v in items)
        nid = self.node_id(op, inputs, items, group)
        if not self.hashcons:
            nid = f"{nid}-{len(self.nodes)}"
        if nid not in self.nodes:
            self.nodes[nid] = PlanNode(op, tuple(inputs), items, group, loc, shape)
        return nid

    def replace_nodes(self, nodes: dict[str, PlanNode]) -> None:
        """Take a new node dict (passes build new dicts)."""
        self.nodes = nodes

    @property
    def graph(self):
        """The plan as a networkx DiGraph (edges input -> consumer), built on demand."""
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for nid, n in self.nodes.items():
            for i in n.inputs:
                g.add_edge(i, nid)
        return g

    def copy(self) -> Plan:
        p = Plan()
        p.nodes = dict(self.nodes)
        p.sources = self.sources
        p.outputs = {k: replace(v, tensors=dict(v.tensors), blocks=dict(v.blocks)) for k, v in self.outputs.items()}
        p.spec_text, p.spec_file, p.history = self.spec_text, self.spec_file, list(self.history)
        p.spec_files = list(self.spec_files)
        p.hashcons = self.hashcons
        p.order, p.phase_of = list(self.order), dict(self.phase_of)
        return p

    # -- queries
    def roots(self) -> set[str]:
        return {nid for o in self.outputs.values() for t in o.tensors for _, nid in o.parts(t)}

    def topo_order(self) -> list[str]:
        """Deterministic topological order: among ready nodes, the smallest (group, id)
        first (networkx's lexicographical_topological_sort with that key)."""
        nodes = self.nodes
        indegree: dict[str, int] = {}
        consumers: dict[str, list[str]] = {}
        for nid, n in nodes.items():
            preds = set(n.inputs)
            indegree[nid] = len(preds)
            for i in preds:
                consumers.setdefault(i, []).append(nid)
        ready = [(n.group, nid) for nid, n in nodes.items() if indegree[nid] == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, nid = heapq.heappop(ready)
            order.append(nid)
            for c in consumers.get(nid, ()):
                indegree[c] -= 1
                if indegree[c] == 0:
                    heapq.heappush(ready, (nodes[c].group, c))
        if len(order) != len(nodes):
            raise ValueError("the plan has a cycle or an input that is not a node")
        return order

    def ancestors(self, roots) -> set[str]:
        """Every node the given nodes depend on, and the nodes themselves."""
        live: set[str] = set()
        stack = list(roots)
        while stack:
            nid = stack.pop()
            if nid in live:
                continue
            live.add(nid)
            n = self.nodes.get(nid)
            if n is not None:
                stack.extend(n.inputs)
        return live

    def count_ops(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes.values():
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def bytes_read(self) -> int:
        """Bytes of every tensor (or row block) the plan's load nodes read, in their stored dtypes."""
        return sum(self.load_bytes(nid) for nid, n in self.nodes.items() if n.op == "load")

    def load_bytes(self, nid: str) -> int:
        """Bytes load node `nid` reads from its file (its row block, for a split tensor)."""
        from ..runtime.sources import DTYPE_SIZES

        n = self.nodes[nid]
        dtype, shape, _ = self.sources[n.param("source")].tensors[n.param("tensor")]
        size = DTYPE_SIZES.get(dtype, 4) * shape_numel(shape)
        rows = n.param("rows")
        if rows is not None and shape:  # a block of rows (split pass)
            size = size // shape[0] * (rows[1] - rows[0])
        return size

    def peak_bytes(self, nodes: list[str]) -> int:
        """Peak bytes of live values while `nodes` (one tensor group, in plan order) are
        computed, each value float32 and freed after its last use among `nodes`; no credit
        for in-place ops: an upper bound of what the runner holds for that group."""
        uses: dict[str, int] = {}
        for nid in nodes:
            for i in self.nodes[nid].inputs:
                uses[i] = uses.get(i, 0) + 1
        alive: dict[str, int] = {}
        peak = 0
        for nid in nodes:
            n = self.nodes[nid]
            alive[nid] = 4 * shape_numel(n.shape or ())
            peak = max(peak, sum(alive.values()))
            for i in n.inputs:
                if i in uses:
                    uses[i] -= 1
                    if uses[i] == 0:
                        alive.pop(i, None)
            if nid not in uses:
                alive.pop(nid, None)  # an output: written, then freed
        return peak

    def bytes_written(self) -> int:
        from ..runtime.sources import DTYPE_SIZES

        total = 0
        for o in self.outputs.values():
            for t, shape in o.shapes.items():
                size = DTYPE_SIZES.get(o.dtypes[t], 4)
                for d in shape:
                    size *= d
                total += size
        return total


def add_with_id(plan: Plan, nid: str, op: str, inputs: tuple[str, ...], params: dict, *, group: str = "",
                loc: str = "") -> str:
    """Add a node under a chosen id (for reduce nodes referenced before they exist)."""
    items = tuple((k, _canon(v)) for k, v in sorted(params.items()))
    plan.nodes[nid] = PlanNode(op, tuple(inputs), items, group, loc)
    return nid
