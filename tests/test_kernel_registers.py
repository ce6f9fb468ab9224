"""The kernels' product loops keep their accumulators in registers on every build, read from the machine code.

Twice a build's GEMM ran 30-45x slower than it should with the right bits: compiled for AVX2 (3 GFLOP/s) and for
the portable build (~7 GFLOP/s), GCC had placed the micro-kernel's accumulators on the stack, so every
multiply-add loaded, added and stored; the attention's loops had the same fault on AVX2 (a decode row's keys
copied to the stack and the accumulators kept there) and, for heads other than 64, on AVX-512. No test could see
it (the outputs were right) and speed belongs to benchmarks, not timed tests. These tests read the compiled library
instead: they disassemble the functions (``objdump``, from binutils, which the C compiler the kernel needs comes
with), find their loops that do eight or more multiply-adds, and count the stores to the stack in each (the loop's
own instructions, nested loops apart). The libraries of the trees before the fixes fail them (the AVX2 GEMM: 236
stack stores in a loop of 24 multiply-adds; the x86-64 one: 229 in 48; the AVX2 attention's one-row scores: 8 in 8;
the AVX-512 attention's two-row values at a head of 128: 48 in 32); today's builds pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from p2pinfer import kernels

from kernel_builds import library_for

#: multiply(-add) instructions of the products (AT&T mnemonics): fused on FMA builds, mulps where there is no FMA
MULTIPLY = re.compile(r"^v?(f(n)?m(add|sub)\w*|mulps)\b")
#: a store to the stack: a move whose destination (last operand, AT&T) is %rsp- or %rbp-relative memory
STACK_STORE = re.compile(r"^v?mov\w*\s.*,\s*-?(0x[0-9a-f]+)?\(%r[sb]p(,[^)]*)?\)$")
HOT = 8  # multiply-adds a loop iteration must do to count as the products' loop


@dataclass(frozen=True)
class Loop:
    function: str
    start: int
    end: int
    body: tuple[str, ...]

    @property
    def multiplies(self) -> int:
        return sum(bool(MULTIPLY.match(t)) for t in self.body)

    @property
    def stack_stores(self) -> list[str]:
        return [t for t in self.body if STACK_STORE.match(t)]


def loops(library: Path, prefixes: str | tuple[str, ...]) -> list[Loop]:
    """The loops (a backward jump and what it jumps over) of the functions whose name starts with ``prefixes`` (one or a tuple), from
    ``objdump -d``, each with its own instructions: those of the loops inside it left out (a loop of products
    whose keys GCC copied to the stack in an inner loop of its own is caught by its own stores)."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed: install it with the C compiler (apt-get install binutils)"
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                          check=True).stdout
    functions: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^[0-9a-f]+ <([^>]+)>:$", line):
            current = m.group(1) if m.group(1).startswith(prefixes) else None
            if current:
                functions[current] = []
        elif current and (m := re.match(r"^\s+([0-9a-f]+):\s+(.+)$", line)):
            functions[current].append((int(m.group(1), 16), " ".join(m.group(2).split())))
    found = []
    for name, insns in functions.items():
        back = [(int(m.group(1), 16), at) for at, t in insns
                if (m := re.match(r"^j\w*\s+([0-9a-f]+)\b", t)) and int(m.group(1), 16) < at]
        for start, end in back:
            inner = [(s, e) for s, e in back if start <= s and e < end and (s, e) != (start, end)]
            own = tuple(t for at, t in insns if start <= at <= end and not any(s <= at <= e for s, e in inner))
            found.append(Loop(name, start, end, own))
    return found


def product_loops(march: str, prefixes: tuple[str, ...], monkeypatch) -> list[Loop]:
    """The loops of the functions named ``prefixes``... in the library built for ``march`` that do HOT or more
    multiply-adds."""
    return [loop for loop in loops(library_for(monkeypatch, march), prefixes) if loop.multiplies >= HOT]


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64-v2", "x86-64"])
def test_the_micro_kernel_keeps_its_accumulators_in_registers(monkeypatch, march: str) -> None:
    hot = product_loops(march, ("micro_kernel",), monkeypatch)
    # the kernel has one product loop per row count (1..MICRO_ROWS): the 6 or 8 rows' one does >= 12 multiply-adds
    assert hot and max(loop.multiplies for loop in hot) >= 12, \
        f"micro_kernel's product loops not found in the {march} build: has it been renamed? update this test"
    spilled = [(hex(loop.start), loop.multiplies, len(loop.stack_stores)) for loop in hot if loop.stack_stores]
    assert not spilled, (f"{march}: micro_kernel loops (start, multiply-adds, stack stores) that store to the "
                         f"stack, i.e. accumulators spilled: {spilled}")


# x86-64's portable build (SSE: 16 registers) is left out: a four-row unit's 16 accumulators and their operands do
# not fit, so some spill by register count; on NEON (32 registers) they fit
@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
def test_the_attentions_products_keep_their_accumulators_in_registers(monkeypatch, march: str) -> None:
    """The attention's scores and values (``qa_scores_*``, ``qa_values_*``, per row count and head size): at most
    one stack store per eight multiply-adds in any loop (an operand reloaded, not accumulators: spilled
    accumulators store once per multiply-add). The AVX2 build's loops of one row had copied the keys to the stack
    and kept the accumulators there, found only this way."""
    hot = product_loops(march, ("qa_scores", "qa_values"), monkeypatch)
    assert len({loop.function.split(".")[0] for loop in hot}) >= 8, \
        f"the attention's product loops not found in the {march} build: renamed? update this test"
    spilled = [(loop.function, hex(loop.start), loop.multiplies, len(loop.stack_stores)) for loop in hot
               if len(loop.stack_stores) * 8 > loop.multiplies]
    assert not spilled, f"{march}: attention loops (function, start, multiply-adds, stack stores): {spilled}"


def test_the_reading_finds_spilled_accumulators() -> None:
    """The reader itself, on code whose accumulators cannot all be registers: 40 independent sums of products
    in one loop need more than x86-64's 16 vector registers, so GCC must spill them."""
    cc = kernels._compiler()
    assert cc, "a C compiler is needed (CI installs gcc)"
    source = ("typedef float v4 __attribute__((vector_size(16)));\n"
              "void micro_kernel_spills(const v4 *w, const float *x, v4 *out, long n) {\n"
              "    v4 acc[40] = {0};\n"
              "    for (long k = 0; k < n; k++) {\n"
              "#pragma GCC unroll 40\n"
              "        for (int r = 0; r < 40; r++) acc[r] += x[r * n + k] * w[k];\n"
              "    }\n"
              "#pragma GCC unroll 40\n"
              "    for (int r = 0; r < 40; r++) out[r] = acc[r];\n"
              "}\n")
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "spills.c", Path(tmp) / "spills.so"
        src.write_text(source)
        subprocess.run([cc, "-O3", "-march=x86-64", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
        hot = [loop for loop in loops(lib, "micro_kernel") if loop.multiplies >= HOT]
    assert hot, "the loop of 40 products should be found"
    assert any(loop.stack_stores for loop in hot), "40 accumulators cannot all be in 16 registers"
