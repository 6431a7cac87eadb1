"""Instructions per element of one kernel launch, from its SASS.

Hot loops are found by their backward branches: a branch to an earlier block closes a natural loop, and
the innermost loops that read global memory are the loops that stream the row (the kernels read single
elements outside loops: a row's target, its unaligned head and tail).
An iteration of one covers `elements per iteration` elements per thread (the caller says how many, see
`Launch`); every instruction of its body counts once per iteration, on both sides of any branch inside it
(so no branch is assumed rare, and the count is an upper bound of the hot path). Everything else in the
kernel (per-row setup, reductions, the loss, the tail of a row, loops that do not stream) counts once per row
for every thread of the row's threads: per element, instructions * threads / row length; where a branch on
threadIdx.x leaves it to the first warp, for 32 threads. Code reached only
through CALL (the slow paths of IEEE division and the like) and the padding after the last instruction do
not count."""
from __future__ import annotations

import collections
import os
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .disasm import Function, Instruction

# issue pipes of sm_90, as Nsight Compute names them (fmaheavy and fmalite folded into fma)
_PIPES = {
    "fma": {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I", "IMAD", "IMAD32I", "IDP", "HFMA2", "HADD2",
            "HMUL2", "FSWZADD", "IMUL", "DFMA", "DADD", "DMUL"},
    "alu": {"FMNMX", "FSEL", "FSET", "FSETP", "ISETP", "IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF",
            "SHL", "SHR", "PRMT", "SEL", "MOV", "MOV32I", "IMNMX", "VIMNMX", "VIMNMX3", "VIADDMNMX", "LEA", "IABS",
            "P2R", "R2P", "PLOP3", "I2FP", "F2FP", "FCHK", "HMNMX2", "HSETP2", "HSET2", "BMSK", "SGXT", "ISCADD",
            "VIADD", "IMNMX3", "FMNMX3", "CSETP", "F2IP", "VOTE", "VOTEU"},
    "xu": {"MUFU", "F2F", "F2I", "I2F", "FRND", "POPC", "FLO", "BREV", "DSETP"},
    "lsu": {"LDG", "STG", "LD", "ST", "LDS", "STS", "LDL", "STL", "ATOM", "ATOMG", "ATOMS", "RED", "REDG",
            "LDSM", "SHFL", "MATCH", "LDGSTS", "LDGDEPBAR", "LDC", "ULDC", "CCTL", "STSM"},
    "branch": {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "BREAK", "KILL",
               "NANOSLEEP", "YIELD", "BPT"},
    "barrier": {"BAR", "MEMBAR", "FENCE", "ERRBAR", "DEPBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "CGAERRBAR",
                "SYNCS", "ARRIVES"},
}
_PIPE_OF = {op: pipe for pipe, ops in _PIPES.items() for op in ops}
PIPES = tuple(_PIPES) + ("uniform", "other")


def pipe(instruction: Instruction) -> str:
    base = instruction.base
    if base in _PIPE_OF:
        return _PIPE_OF[base]
    if base.startswith("U") or base in ("R2UR", "S2UR"):  # the uniform datapath still takes an issue slot
        return "uniform"
    return "other"  # S2R, CS2R, NOP and the rest


def is_16_byte_load(i: Instruction) -> bool:
    return i.base in ("LDG", "LD") and ".128" in i.opcode


def is_global_load(i: Instruction) -> bool:
    return i.base in ("LDG", "LD")


def loads_per_line(instructions: List[Instruction]) -> int:
    """The most global loads one source line issues among the instructions."""
    lines = collections.Counter((i.file, i.line) for i in instructions if is_global_load(i))
    return max(lines.values(), default=0)


def is_global_store(i: Instruction) -> bool:
    return i.base in ("STG", "ST")


# What must not be in a hot loop, each recognised by a mark the compilers leave in every expansion.
def _software_log(i: Instruction) -> bool:
    return "0x3f2aaaab" in i.operands  # the range reduction of logf (CUDA's and libdevice's): m - 2/3


def _full_division(i: Instruction) -> bool:
    # IEEE division checks its operands (FCHK) before the fast path; div.full scales operands beyond 2^126
    return i.base == "FCHK" or (i.base == "FSETP" and "8.50705917302346158658e+37" in i.operands) or (
        i.base == "CALL" and "div" in i.operands)


def _spill(i: Instruction) -> bool:
    return i.base in ("LDL", "STL")


HOT_LOOP_FORBIDDEN = {"spills": _spill, "software_log": _software_log, "full_division": _full_division}


class Loop(NamedTuple):
    header: int  # address of the loop's first instruction
    addresses: frozenset  # the addresses of its body: every instruction on a path from the header back to it


_ENDS_BLOCK = ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL")


def _blocks(instructions: List[Instruction]) -> Tuple[List[List[Instruction]], Dict[int, List[int]]]:
    """Basic blocks in address order and, for each, the indices of the blocks it can continue to."""
    targets = {i.target for i in instructions if i.target is not None and i.base in _ENDS_BLOCK}
    blocks: List[List[Instruction]] = []
    for n, i in enumerate(instructions):
        if not blocks or i.address in targets or instructions[n - 1].base in _ENDS_BLOCK:
            blocks.append([])
        blocks[-1].append(i)
    index = {b[0].address: k for k, b in enumerate(blocks)}
    succ: Dict[int, List[int]] = {}
    for k, b in enumerate(blocks):
        last = b[-1]
        out = []
        if last.base in ("BRA", "BRX", "JMP") and last.target in index:
            out.append(index[last.target])
        unconditional = last.base in _ENDS_BLOCK and not last.predicate and not last.opcode.startswith("BRA.DIV")
        if not unconditional and k + 1 < len(blocks):
            out.append(k + 1)
        succ[k] = out
    return blocks, succ


def loops(fn: Function) -> List[Loop]:
    """Every natural loop: a branch back to an earlier (or the same) block, its header, and every block
    from which that branch can be reached without passing the header. Branches back to one header make
    one loop. The compiler may lay a loop's blocks out far apart: the body follows the control flow,
    not the addresses."""
    blocks, succ = _blocks(counted(fn))
    preds: Dict[int, List[int]] = collections.defaultdict(list)
    for k, out in succ.items():
        for o in out:
            preds[o].append(k)
    bodies: Dict[int, set] = {}
    for k, out in succ.items():
        for h in out:
            if h <= k:  # a back edge k -> h
                body = bodies.setdefault(h, {h})
                stack = [k]
                while stack:
                    b = stack.pop()
                    if b not in body:
                        body.add(b)
                        stack.extend(preds[b])
    merged: List[set] = []  # loops whose bodies overlap without nesting are one region with several headers
    for h, body in sorted(bodies.items()):
        for other in merged:
            if body & other and not (body <= other or other <= body):
                other |= body
                break
        else:
            merged.append(set(body))
    return [Loop(blocks[min(body)][0].address, frozenset(i.address for b in body for i in blocks[b]))
            for body in merged]


def _inside(inner: Loop, outer: Loop) -> bool:
    return inner != outer and inner.addresses <= outer.addresses


def hot_loops(fn: Function) -> List[Loop]:
    """The innermost loops among those that read global memory."""
    streaming = [lp for lp in loops(fn) if any(is_global_load(i) for i in body(fn, lp))]
    return [lp for lp in streaming if not any(_inside(o, lp) for o in streaming)]


def counted(fn: Function) -> List[Instruction]:
    """The instructions that count: not the code reached only by CALL, not the padding."""
    return [i for i in fn.instructions if i.address < fn.subroutines and i.base != "NOP"
            and not (i.base == "BRA" and i.target == i.address)]


def body(fn: Function, loop: Loop) -> List[Instruction]:
    return [i for i in counted(fn) if i.address in loop.addresses]


def _destination(i: Instruction) -> Optional[str]:
    first = i.operands.split(",")[0].strip()
    return first if first[:1] in ("R", "P") and first not in ("RZ", "PT") else None


def first_warp_only(fn: Function) -> set:
    """Addresses that only the first warp of a block runs: code a branch skips for threadIdx.x != 0 or
    threadIdx.x >= 32 (the `if (threadIdx.x == 0)` and `if (threadIdx.x < 32)` of the per-row work). Found by
    following which registers hold threadIdx.x and which predicates compare them, in address order."""
    tid, outside = set(), {}  # registers holding threadIdx.x; predicate -> True when it means "not warp 0"
    region = set()
    instructions = counted(fn)
    for n, i in enumerate(instructions):
        ops = [o.strip() for o in i.operands.split(",")]
        dest = _destination(i)
        if i.base == "S2R" and "SR_TID.X" in i.operands:
            tid.add(dest)
            continue
        if (i.base == "ISETP" and not i.predicate and len(ops) == 5 and ops[2] in tid and ".AND" in i.opcode
                and ops[1] == ops[4] == "PT"):
            bound = 0 if ops[3] == "RZ" else int(ops[3], 16) if ops[3].startswith("0x") else (
                int(ops[3]) if ops[3].isdigit() else None)
            cmp = i.opcode.split(".")[1]
            # P true exactly for threads outside warp 0: tid != 0, tid > b (b < 32), tid >= b (b <= 32)
            if bound is not None and ((cmp == "NE" and bound == 0) or (cmp == "GT" and bound < 32)
                                      or (cmp == "GE" and 0 < bound <= 32)):
                outside[ops[0]] = True
                continue
        if dest:
            tid.discard(dest)
            outside.pop(dest, None)
        if i.base == "BRA" and i.predicate.lstrip("@") in outside and i.target is not None and i.target > i.address:
            region.update(j.address for j in instructions[n + 1:] if j.address < i.target)
    return region


class Launch(NamedTuple):
    """One kernel launch of a case, as the launch code plans it."""
    function: Function
    threads_per_row: int  # threads that share one row (segment)
    row_length: int  # elements of one row (segment) those threads handle
    elements_per_iteration: Callable[[List[Instruction]], float]  # per thread, for one hot loop's body
    resources: dict  # registers, stack, ... (cuobjdump)


def _source(i: Instruction) -> str:
    return f"{os.path.basename(i.file)}:{i.line}" if i.file else "?"


def analyse(launch: Launch) -> dict:
    """Instructions per element of the launch: total, per pipe, per source line, and what its hot loops hold."""
    fn = launch.function
    weights: Dict[int, float] = {}  # address -> executions per element
    loops_out = []
    in_loop = set()
    for lp in hot_loops(fn):
        instrs = body(fn, lp)
        per_iteration = min(launch.elements_per_iteration(instrs), launch.row_length / launch.threads_per_row)
        for i in instrs:
            weights[i.address] = 1.0 / per_iteration
            in_loop.add(i.address)
        found = {name: sorted({_source(i) for i in instrs if test(i)}) for name, test in HOT_LOOP_FORBIDDEN.items()}
        loops_out.append(dict(
            header=lp.header, instructions=len(instrs), elements_per_iteration=per_iteration,
            per_row=per_iteration == launch.row_length / launch.threads_per_row,
            loads_16_byte=sum(map(is_16_byte_load, instrs)), stores=sum(map(is_global_store, instrs)),
            branches=sum(1 for i in instrs if i.base == "BRA") - 1,
            **{name: where for name, where in found.items()}))
    row_weight = launch.threads_per_row / launch.row_length
    per_row = [i for i in counted(fn) if i.address not in in_loop]
    one_warp = first_warp_only(fn)
    for i in counted(fn):  # code only the first warp runs costs one warp's issue slots, not the block's
        if i.address in one_warp:
            weights[i.address] = min(1.0, 32 / launch.threads_per_row) * (weights.get(i.address) or row_weight)
    for i in per_row:
        weights.setdefault(i.address, row_weight)
    by_address = {i.address: i for i in counted(fn)}
    by_pipe = collections.Counter()
    by_line = collections.Counter()
    mufu = 0.0
    for address, w in weights.items():
        i = by_address[address]
        by_pipe[pipe(i)] += w
        by_line[_source(i)] += w
        if i.base == "MUFU":
            mufu += w
    return dict(
        function=fn.name, resources=launch.resources, threads_per_row=launch.threads_per_row,
        row_length=launch.row_length, hot_loops=loops_out, per_row_instructions=len(per_row),
        per_row_per_element=sum(weights[i.address] for i in per_row), per_element=sum(weights.values()),
        by_pipe={p: by_pipe.get(p, 0.0) for p in PIPES}, mufu=mufu,
        xu=by_pipe.get("xu", 0.0), by_line=dict(by_line.most_common()))


def combine(parts: List[dict]) -> dict:
    """Several launches of one case (split rows: partial states, merge, gradient) add up per element."""
    lines = collections.Counter()
    for p in parts:
        lines.update(p["by_line"])
    return dict(per_element=sum(p["per_element"] for p in parts), mufu=sum(p["mufu"] for p in parts),
                xu=sum(p["xu"] for p in parts),
                by_pipe={k: sum(p["by_pipe"][k] for p in parts) for k in PIPES}, by_line=dict(lines.most_common()))


def top_lines(by_line: Dict[str, float], n: int = 5) -> List[Tuple[str, float]]:
    return sorted(by_line.items(), key=lambda kv: -kv[1])[:n]
