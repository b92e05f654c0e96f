"""Dataflow over a jaxpr: which collectives does each output depend on (through nested jaxprs)?"""

from __future__ import annotations

from jax.extend import core as jcore

COLLECTIVES = {"ppermute", "all_gather", "all_gather_invariant", "psum", "psum_invariant", "all_to_all",
               "reduce_scatter", "pmax", "pmin"}


def _sub_jaxprs(eqn):
    for key, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jcore.ClosedJaxpr):
                yield key, v.jaxpr
            elif isinstance(v, jcore.Jaxpr):
                yield key, v


def output_taints(jaxpr, in_taints, found):
    """Taint sets of jaxpr's outputs, given those of its inputs; `found` collects collective eqns."""
    env = {}

    def read(v):
        return env.get(v, frozenset()) if isinstance(v, jcore.Var) else frozenset()

    for v, t in zip(jaxpr.invars, in_taints):
        env[v] = t
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        union = frozenset().union(*ins)
        subs = list(_sub_jaxprs(eqn))
        if eqn.primitive.name in COLLECTIVES:
            found.append(eqn)
            outs = [union | {id(eqn)}] * len(eqn.outvars)
        elif subs:
            outs = None
            for key, sub in subs:
                args = ins[1:] if key == "branches" else ins  # cond: the first operand is the index
                if len(args) == len(sub.invars) and len(sub.outvars) == len(eqn.outvars):
                    sub_out = output_taints(sub, args, found)
                    outs = sub_out if outs is None else [a | b for a, b in zip(outs, sub_out)]
                else:  # unknown calling convention: over-approximate
                    output_taints(sub, [union] * len(sub.invars), found)
                    outs = [union] * len(eqn.outvars)
            outs = [o | (union if key == "branches" else frozenset()) for o in outs]
        else:
            outs = [union] * len(eqn.outvars)
        for v, t in zip(eqn.outvars, outs):
            env[v] = t
    return [read(v) for v in jaxpr.outvars]


def shard_map_body(closed_jaxpr):
    """The jaxpr inside the (single) shard_map of a traced function."""
    for eqn in closed_jaxpr.jaxpr.eqns:
        for _, sub in _sub_jaxprs(eqn):
            if eqn.primitive.name == "shard_map":
                return sub
            inner = shard_map_body(jcore.ClosedJaxpr(sub, ())) if sub.eqns else None
            if inner is not None:
                return inner
    return None
