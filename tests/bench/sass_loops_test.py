"""bench/sass_loops.py: each kernel's loops from a SASS listing (a backward branch and its target), their lengths
and opcodes, the --kernel / --min / --max filters, and clear errors. The disassembler is a stand-in that prints a
fixed listing in cuobjdump's format."""
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

SASS_LOOPS = Path(__file__).resolve().parents[2] / "bench" / "sass_loops.py"

# Kernel a: a loop 0x0010-0x0050 (4 instructions before its branch) and a forward branch; kernel b: none.
LISTING = """
        code for sm_90a
                Function : kernel_a
        .headerflags    @"EF_CUDA_SM90"
        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x00000a0000017a02 */
                                                                   /* 0x000fe40000000f00 */
        /*0010*/                   LOP3.LUT R2, R2, 0xf, RZ, 0xc0, !PT ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   LOP3.LUT R3, R3, 0xf0, RZ, 0xc0, !PT ;
        /*0040*/              @!P0 IADD3 R5, R5, 0x1, RZ ;
        /*0050*/              @!P0 BRA 0x10 ;
        /*0060*/                   BRA 0x80 ;
        /*0070*/                   NOP ;
        /*0080*/                   EXIT ;
                Function : kernel_b
        /*0000*/                   EXIT ;
"""


def fake_cuobjdump(folder):
    path = Path(folder) / "cuobjdump"
    listing = Path(folder) / "listing.txt"
    listing.write_text(LISTING)
    path.write_text(f"#!/bin/sh\ncat '{listing}'\n")
    path.chmod(0o755)
    return str(path)


class SassLoopsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.tool = fake_cuobjdump(self.tmp.name)

    def run_tool(self, *args):
        return subprocess.run([sys.executable, SASS_LOOPS, "kernel.o", "--cuobjdump", self.tool, *args],
                              capture_output=True, text=True)

    def test_a_loop_is_a_backward_branch_and_counts_the_instructions_before_it(self):
        run = self.run_tool("--min", "1", "--ops", "2")
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("kernel_a: 9 instructions", run.stdout)
        self.assertIn("  loop 0x10-0x50: 4 instructions | LOP3 2, HMMA 1", run.stdout)
        self.assertIn("kernel_b: 1 instructions", run.stdout)
        self.assertEqual(run.stdout.count("loop"), 1)

    def test_loops_outside_min_max_and_kernels_not_asked_for_are_left_out(self):
        self.assertNotIn("loop", self.run_tool("--min", "5").stdout)
        self.assertNotIn("loop", self.run_tool("--min", "1", "--max", "3").stdout)
        run = self.run_tool("--min", "1", "--kernel", "kernel_b")
        self.assertNotIn("kernel_a", run.stdout)
        self.assertIn("kernel_b", run.stdout)

    def test_no_matching_kernel_or_no_disassembler_is_an_error_that_says_which(self):
        run = self.run_tool("--kernel", "absent")
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("no kernel in kernel.o matches 'absent'", run.stderr)
        run = subprocess.run([sys.executable, SASS_LOOPS, "kernel.o", "--cuobjdump", str(Path(self.tmp.name) / "none")],
                             capture_output=True, text=True)
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("cannot disassemble kernel.o", run.stderr)


if __name__ == "__main__":
    unittest.main()
