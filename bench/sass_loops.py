#!/usr/bin/env python3
"""Instructions per iteration of each kernel's loops, from its SASS: how the docs count a decode kernel's
instructions per tile (a warp's loop over its tiles).

    python3 bench/sass_loops.py build/sm90/src/backend/cuda/CMakeFiles/kvarn_cuda.dir/decode_attention.cu.o \\
        --kernel 'KvarnTileILi128ELi128ELi2' --min 500 --max 2000 --ops 12

A loop is a backward branch; its length is the instructions from its target up to the branch (not counted). Loops
shorter than --min are left out, and so are those longer than --max: the compiler's out-of-line copies for divergent
warps (WARPSYNC / ENDCOLLECTIVE) branch back into the body from far below. --ops prints each loop's most frequent
opcodes. Needs cuobjdump (the CUDA toolkit's, or --cuobjdump PATH).
"""
import argparse
import collections
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)$")
FUNCTION = re.compile(r"^\s*Function : (\S+)")


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", help="object file, executable or cubin with sm_90a SASS")
    parser.add_argument("--kernel", default="", help="only kernels whose mangled name contains this")
    parser.add_argument("--min", type=int, default=200, help="shortest loop shown (instructions)")
    parser.add_argument("--max", type=int, default=2500, help="longest loop shown (instructions)")
    parser.add_argument("--ops", type=int, default=0, help="most frequent opcodes shown per loop")
    parser.add_argument("--cuobjdump", default="cuobjdump")
    args = parser.parse_args()
    try:
        sass = subprocess.run([args.cuobjdump, "-sass", args.binary], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"sass_loops: cannot disassemble {args.binary} with {args.cuobjdump}: {e}")
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
    if not shown:
        sys.exit(f"sass_loops: no kernel in {args.binary} matches '{args.kernel}'")


if __name__ == "__main__":
    main()
