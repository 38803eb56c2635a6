"""bench/report.py: the targets judged on a run name the rows that miss them, with a miss never shown rounded onto
its target, and the rows that meet them by less than two runs of one build differ."""
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "bench" / "report.py"
HEADER = "kind,shape,dtype,batch,context,splits,time_us,GB_per_s,TFLOP_per_s"


def judged(rows):
    """The 'Targets, judged on this run' lines of the report of a kvarn_cuda_bench CSV holding `rows`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kvarn.csv"
        path.write_text("\n".join([HEADER, "copy,,,,,,1000,4000,"] + rows) + "\n")
        run = subprocess.run([sys.executable, REPORT, str(path)], capture_output=True, text=True, check=True)
    return {line.split(" | ")[0].lstrip("| "): line for line in run.stdout.splitlines()[-4:]}


class ReportTargetsTest(unittest.TestCase):
    def test_names_the_rows_below_80_percent_of_copy(self):
        lines = judged(["decode,llama3-8b,kvarn_k4v2_g128,8,8192,6x12,20,2600,50",
                        "decode,llama3-8b,kvarn_k4v2_g128,8,32768,6x44,60,3400,60"])
        copy = lines["k4v2_g128 decode >= 80% of copy bandwidth at >= 8K context, batch >= 8"]
        self.assertIn("**missed on 1 of 2 rows**: llama3-8b 8 x 8K 65%", copy)

    def test_shows_a_near_miss_with_the_decimals_that_tell_it_from_the_target(self):
        lines = judged(["decode,qwen3-32b,kvarn_k4v2_g128,128,8192,1x63,277,3198.8,120",
                        "decode,qwen3-32b,kvarn_k4v2_g128,128,32768,3x88,1046,3400,130"])
        copy = lines["k4v2_g128 decode >= 80% of copy bandwidth at >= 8K context, batch >= 8"]
        self.assertIn("**missed on 1 of 2 rows**: qwen3-32b 128 x 8K 79.97% (worst qwen3-32b 128 x 8K 79.97%)", copy)

    def test_keeps_the_plain_format_for_rows_that_meet_the_target(self):
        lines = judged(["decode,llama3-8b,kvarn_k4v2_g128,32,32768,3x88,245,3400.2,70"])
        copy = lines["k4v2_g128 decode >= 80% of copy bandwidth at >= 8K context, batch >= 8"]
        self.assertIn("**met on every row** (worst llama3-8b 32 x 32K 85%)", copy)

    def test_names_the_rows_that_meet_a_target_by_less_than_a_run_to_run_spread(self):
        lines = judged(["decode,qwen3-32b,kvarn_k4v2_g128,32,8192,1x63,71,3300,123",
                        "decode,qwen3-32b,kvarn_k4v2_g128,32,32768,3x88,253,3633,135"])
        copy = lines["k4v2_g128 decode >= 80% of copy bandwidth at >= 8K context, batch >= 8"]
        self.assertIn("**met on every row** (worst qwen3-32b 32 x 8K 82%); met by less than 5%: qwen3-32b 32 x 8K 82%",
                      copy)
        self.assertNotIn("32K", copy.split("met by less")[1])

    def test_counts_the_margin_of_a_target_bounded_above_upward(self):
        lines = judged(["flush,,,32,,,100,,2.5e6",
                        "decode,llama3-8b,kvarn_k4v2_g128,128,1024,1x7,61,3400,50",
                        "decode,llama3-8b,kvarn_k4v2_g128,128,8192,1x63,300,4000,70"])
        flush = lines["flush share of a decode step at batch 128 <= 5%"]
        self.assertIn("**met on every row** (worst 1K 4.9%); met by less than 5%: 1K 4.9%", flush)
        self.assertNotIn("8K", flush.split("met by less")[1])


if __name__ == "__main__":
    unittest.main()
