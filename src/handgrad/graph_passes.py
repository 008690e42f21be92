"""Passes over the graph the compiler makes of a compiled step (`fastpath.compile_options` sets them),
each a `torch._inductor` custom graph pass: it rewrites the graph in place, and its `uuid` keys the
compiler's cache (a changed pass compiles anew)."""
from __future__ import annotations

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import is_mutation_op


aten = torch.ops.aten
FRESH_BUFFERS = (aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided)


class ComputeOnce(CustomGraphPass):
    """A compiler pass over a compiled step's graph: where the graph computes the same thing twice from the
    same inputs, the second is dropped and its readers read the first. A backward that recomputes what its
    forward computed, to keep less between them in an eager step (attention's weights and their softmax,
    the output those weights gave, GELU's sigmoid), then reads the forward's result in the compiled step,
    as autograd's compiled backward does; each value is the very one the recomputation gave.

    Left alone: random draws (each draws anew), fresh buffers, operations outside aten and prims, any
    tensor something writes into, and any write in place: nothing is merged across one, since a tensor
    read before a write and the same tensor read after it are different values."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        written = {t for node in graph.nodes if is_mutation_op(node) for t in written_into(node)}
        first, writes = {}, 0
        for node in list(graph.nodes):
            if is_mutation_op(node):
                writes += 1
            elif node not in written and self.pure(node):
                key = (writes, node.target, str(node.args), str(node.kwargs))  # str: arguments by node name
                if key in first:
                    node.replace_all_uses_with(first[key])
                    graph.erase_node(node)
                else:
                    first[key] = node

    @staticmethod
    def pure(node) -> bool:
        op = node.target
        return (node.op == "call_function" and isinstance(op, torch._ops.OpOverload)
                and op.namespace in ("aten", "prims") and not node.is_impure()
                and torch.Tag.nondeterministic_seeded not in op.tags
                and op.overloadpacket not in FRESH_BUFFERS)

    def uuid(self):
        """The compiler's cache key of the pass: this file's contents."""
        return get_hash_for_files((__file__,))


def written_into(node) -> list:
    """The arguments a mutating node writes into: those its schema marks written (an in-place op's self,
    an out= tensor); the first argument where the op has no schema."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return list(node.args[:1])
    return [node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            for i, arg in enumerate(schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
