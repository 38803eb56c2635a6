"""bench/report.py: the targets judged on a run name the rows that miss them, with a miss never shown rounded onto
its target, the rows that meet them by less than two runs of one build differ, and the rows it could not judge;
our fp16 kernel is judged against SDPA flash on its calls apart; two rows of one key are refused."""
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

REPORT = Path(__file__).resolve().parents[2] / "bench" / "report.py"
HEADER = "kind,shape,dtype,batch,context,splits,time_us,GB_per_s,TFLOP_per_s"


def report(rows):
    """The report of a kvarn_cuda_bench CSV holding `rows` (and the copy row): the finished process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kvarn.csv"
        path.write_text("\n".join([HEADER, "copy,,,,,,1000,4000,"] + rows) + "\n")
        return subprocess.run([sys.executable, REPORT, str(path)], capture_output=True, text=True)


def judged(rows):
    """The 'Targets, judged on this run' lines of the report of a kvarn_cuda_bench CSV holding `rows`."""
    run = report(rows)
    run.check_returncode()
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
        lines = judged(["flush,,,1,32,,100,,2.5e6",  # one job in each of 32 layers: a step's flush
                        "decode,llama3-8b,kvarn_k4v2_g128,128,1024,1x7,61,3400,50",
                        "decode,llama3-8b,kvarn_k4v2_g128,128,8192,1x63,300,4000,70"])
        flush = lines["flush share of a decode step at batch 128 <= 5%"]
        self.assertIn("**met on every row** (worst 1K 4.9%); met by less than 5%: 1K 4.9%", flush)
        self.assertNotIn("8K", flush.split("met by less")[1])

    def test_takes_the_step_flush_from_one_call_over_32_layers_not_from_32_jobs_of_one(self):
        lines = judged(["flush,,,32,1,,50,,2.5e6", "decode,llama3-8b,kvarn_k4v2_g128,128,1024,1x7,61,3400,50"])
        self.assertIn("not measured", lines["flush share of a decode step at batch 128 <= 5%"])

    def test_names_the_rows_it_could_not_judge(self):
        lines = judged(["decode,llama3-8b,kvarn_k4v2_g128,8,32768,6x44,60,3400,60",
                        "decode,llama3-8b,kvarn_k4v2_g128,128,131072,skipped: 70 GiB of cache,,,",
                        "decode,llama3-8b,fp16,8,32768,6x44,240,4400,15"])
        copy = lines["k4v2_g128 decode >= 80% of copy bandwidth at >= 8K context, batch >= 8"]
        self.assertIn("not judged: llama3-8b 128 x 128K (skipped)", copy)
        sdpa = lines["our fp16 kernel within 10% of PyTorch SDPA flash (calls apart)"]
        self.assertIn("not measured", sdpa)

    def test_judges_our_fp16_kernel_against_sdpa_flash_on_its_calls_apart(self):
        # Overlapping each other our calls take 60 us, 1.10x SDPA's speed; apart 75 us, 0.88x: a miss.
        lines = judged(["decode,llama3-8b,fp16,8,8192,6x11,60,4400,15",
                        "decode_no_overlap,llama3-8b,fp16,8,8192,6x11,75,3500,12",
                        "decode,llama3-8b,sdpa_flash,8,8192,flash,66,4000,14",
                        "decode_no_overlap,llama3-8b,fp16,8,32768,6x44,240,4400,15",
                        "decode,llama3-8b,sdpa_default,8,32768,default,250,4200,14"])
        sdpa = lines["our fp16 kernel within 10% of PyTorch SDPA flash (calls apart)"]
        self.assertIn("**missed on 1 of 1 rows**: llama3-8b 8 x 8K 0.88x", sdpa)
        self.assertIn("not judged: llama3-8b 8 x 32K (no SDPA flash row)", sdpa)

    def test_refuses_two_rows_of_one_key(self):
        run = report(["decode,llama3-8b,kvarn_k4v2_g128,8,8192,6x11,20,2600,50",
                      "decode,llama3-8b,kvarn_k4v2_g128,8,8192,4x16,21,2500,48"])
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("two decode rows for ('llama3-8b', 'kvarn_k4v2_g128', 8, 8192)", run.stderr)


if __name__ == "__main__":
    unittest.main()
