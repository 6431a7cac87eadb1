"""SASS of a cubin: nvdisasm's listing parsed into functions of instructions, each with its source line,
and cuobjdump's register and stack use per function.

The tools come from Triton's package (it ships nvdisasm and cuobjdump for its own use), else from the
nvidia-cuda-nvdisasm / nvidia-cuda-cuobjdump wheels or CUDA_HOME, else from the PATH."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, NamedTuple, Optional


class ToolMissing(RuntimeError):
    pass


def find_tool(name: str) -> str:
    """Path of nvdisasm or cuobjdump."""
    candidates = []
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name))
    except (ImportError, ValueError):
        pass
    for site in sys.path:  # the nvidia-cuda-<tool> wheels install under nvidia/cu*/bin or nvidia/cuda_<tool>/bin
        candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", name)))
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", name))
    candidates.append(shutil.which(name) or "")
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise ToolMissing(f"{name} not found: install triton (it ships one) or the nvidia-cuda-{name} wheel")


def tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


class Instruction(NamedTuple):
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # with its modifiers, e.g. "LDG.E.128"
    operands: str
    file: Optional[str]  # source of the instruction (the innermost inlined location)
    line: Optional[int]
    target: Optional[int]  # branch or call target address

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


class Function(NamedTuple):
    name: str
    instructions: List[Instruction]
    subroutines: int  # address where code reached only by CALL starts (len: none)


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)\s*(.*?)\s*;\s*$")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+|\$[\w$.]+):\s*$")
_FUNCTION = re.compile(r"^\.text\.(\S+):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse(listing: str) -> Dict[str, Function]:
    """Functions of an `nvdisasm -c -g` listing."""
    functions: Dict[str, Function] = {}
    raw: List[tuple] = []
    labels: Dict[str, int] = {}
    called: set = set()
    name, file, line = None, None, None

    def close():
        if name is None:
            return
        instructions = [Instruction(a, p, o, ops, f, ln, labels.get(t) if t else None)
                        for a, p, o, ops, f, ln, t in raw]
        starts = [labels[c] for c in called if c in labels]
        functions[name] = Function(name, instructions, min(starts) if starts else len(instructions) * 16 + 16)

    for text in listing.splitlines():
        m = _FUNCTION.match(text)
        if m:
            close()
            name, raw, labels, called, file, line = m.group(1), [], {}, set(), None, None
            continue
        if name is None:
            continue
        m = _LINE.match(text)
        if m:
            file, line = m.group(1), int(m.group(2))
            continue
        m = _LABEL.match(text)
        if m:
            labels[m.group(1)] = (raw[-1][0] + 16) if raw else 0
            continue
        m = _INSTRUCTION.match(text)
        if m:
            address, predicate = int(m.group(1), 16), (m.group(2) or "").strip()
            opcode, operands = m.group(3), m.group(4)
            t = _TARGET.search(operands)
            target = t.group(1) if t else None
            if opcode.startswith("CALL") and target:
                called.add(target)
            raw.append((address, predicate, opcode, operands, file, line, target))
    close()
    return functions


def disassemble(cubin: str) -> Dict[str, Function]:
    run = subprocess.run([find_tool("nvdisasm"), "-c", "-g", cubin], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvdisasm failed on {cubin}: {run.stderr[-2000:]}")
    return parse(run.stdout)


_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: str) -> Dict[str, dict]:
    """Registers, stack (spills and local arrays), shared and local memory per function."""
    run = subprocess.run([find_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {cubin}: {run.stderr[-2000:]}")
    return {m.group(1): dict(registers=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)),
                             local=int(m.group(5))) for m in _USAGE.finditer(run.stdout)}
