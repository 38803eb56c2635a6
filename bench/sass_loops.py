#!/usr/bin/env python3
"""Instructions per iteration of each kernel's loops, from its SASS: how the docs count a decode kernel's
instructions per tile (a warp's loop over its tiles).

    python3 bench/sass_loops.py build/sm90/src/backend/cuda/CMakeFiles/kvarn_cuda.dir/decode_attention.cu.o \\
        --kernel 'KvarnTileILi128ELi128ELi2' --min 500 --max 2000 --ops 12

A loop is a backward branch; its length is the instructions from its target up to the branch (not counted). Loops
shorter than --min are left out, and so are those longer than --max: the compiler's out-of-line copies for divergent
warps (WARPSYNC / ENDCOLLECTIVE) branch back into the body from far below. --ops prints each loop's most frequent
opcodes; --lines N the N source lines that issue most of a loop's instructions (from nvdisasm's line table: build
with -lineinfo, as the project does). Needs cuobjdump (the CUDA toolkit's, or --cuobjdump PATH), and nvdisasm for
--lines.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)$")
FUNCTION = re.compile(r"^\s*Function : (\S+)")
SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def kernels(sass):
    """{mangled name: [(address, opcode, operands)]} of a cuobjdump -sass listing."""
    found, current = {}, None
    for line in sass.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = found.setdefault(m.group(1), [])
            continue
        m = INSTRUCTION.match(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return found


def loops(instructions, shortest, longest):
    """(first address, last address, instructions) of each backward branch's loop, in address order."""
    size = instructions[1][0] - instructions[0][0] if len(instructions) > 1 else 16
    out = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            count = (address - start) // size
            if shortest <= count <= longest:
                out.append((start, address, count))
    return out


def source_lines(binary, cuobjdump, nvdisasm):
    """{mangled name: {address: "file:line"}} from nvdisasm -g of the binary's cubins."""
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(binary)], cwd=tmp, check=True,
                       capture_output=True)
        for cubin in sorted(f for f in os.listdir(tmp) if f.endswith(".cubin")):
            listing = subprocess.run([nvdisasm, "-g", os.path.join(tmp, cubin)], check=True, capture_output=True,
                                     text=True).stdout
            current, where = None, "?"
            for line in listing.splitlines():
                m = SECTION.match(line)
                if m:
                    current, where = found.setdefault(m.group(1), {}), "?"
                    continue
                m = LINE.search(line)
                if m:
                    where = f"{os.path.basename(m.group(1))}:{m.group(2)}"
                    continue
                m = INSTRUCTION.match(line)
                if m and current is not None:
                    current[int(m.group(1), 16)] = where
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", help="object file, executable or cubin with sm_90a SASS")
    parser.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    parser.add_argument("--min", type=int, default=200, help="shortest loop shown (instructions)")
    parser.add_argument("--max", type=int, default=2500, help="longest loop shown (instructions)")
    parser.add_argument("--ops", type=int, default=0, help="most frequent opcodes shown per loop")
    parser.add_argument("--lines", type=int, default=0, help="source lines shown per loop, most instructions first")
    parser.add_argument("--cuobjdump", default="cuobjdump")
    parser.add_argument("--nvdisasm", default="nvdisasm")
    args = parser.parse_args()
    if min(args.ops, args.lines) < 0:
        parser.error("--ops and --lines: expected a count >= 0")
    try:
        sass = subprocess.run([args.cuobjdump, "-sass", args.binary], check=True, capture_output=True, text=True).stdout
        lines = source_lines(args.binary, args.cuobjdump, args.nvdisasm) if args.lines else {}
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"sass_loops: cannot disassemble {args.binary} with {args.cuobjdump} / {args.nvdisasm}: {e}")
    shown = 0
    for name, instructions in kernels(sass).items():
        if args.kernel not in name:
            continue
        shown += 1
        print(f"{name}: {len(instructions)} instructions")
        for start, end, count in loops(instructions, args.min, args.max):
            line = f"  loop {start:#x}-{end:#x}: {count} instructions"
            if args.ops:
                ops = collections.Counter(op.split(".")[0] for a, op, _ in instructions if start <= a < end)
                line += " | " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.ops))
            print(line)
            if args.lines:
                where = lines.get(name, {})
                per_line = collections.defaultdict(collections.Counter)
                for a, op, _ in instructions:
                    if start <= a < end:
                        per_line[where.get(a, "?")][op.split(".")[0]] += 1
                ranked = sorted(per_line.items(), key=lambda item: -sum(item[1].values()))
                for source, ops in ranked[: args.lines]:
                    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(3))
                    print(f"    {sum(ops.values()):5d}  {source}  ({top})")
    if not shown:
        sys.exit(f"sass_loops: no kernel in {args.binary} matches '{args.kernel}'")


if __name__ == "__main__":
    main()
