"""bench/ab_compare.py: the table of medians and ratios, and a run cut short (SIGTERM, as `timeout` sends) keeping
the rounds it finished. The binaries are stand-ins that write one CSV row each."""
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

AB_COMPARE = Path(__file__).resolve().parents[2] / "bench" / "ab_compare.py"
HEADER = "kind,shape,dtype,batch,context,splits,time_us"


def fake_bench(folder, name, time_us, delay_s=0.0):
    """A stand-in for kvarn_cuda_bench: `--csv FILE` gets one decode row taking time_us, after delay_s. Like a
    wrapper script, it waits for a process of its own: a sleep, its pid in NAME.sleep."""
    path = Path(folder) / name
    path.write_text(f"#!/bin/sh\nsleep {delay_s} &\necho $! > \"$0.sleep\"\nwait\n"
                    f"printf '{HEADER}\\ndecode,llama3-8b,fp16,1,1024,2x4,{time_us}\\n' > \"$2\"\n")
    path.chmod(0o755)
    return str(path)


def running(pid):
    """Whether process pid runs (exists and is no zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class AbCompareTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_prints_each_binarys_median_and_the_first_ones_time_over_it(self):
        slow, fast = fake_bench(self.tmp.name, "slow", 20.0), fake_bench(self.tmp.name, "fast", 10.0)
        run = subprocess.run([sys.executable, AB_COMPARE, "--rounds", "2", slow, fast, "--"], capture_output=True,
                             text=True, check=True)
        self.assertIn("| decode | llama3-8b | fp16 | 1 | 1024 | 2x4 | 20.0 | 10.0 | 2.000 |", run.stdout)

    def test_stopped_by_sigterm_prints_the_rounds_it_finished(self):
        slow = fake_bench(self.tmp.name, "slow", 20.0, 0.2)
        fast = fake_bench(self.tmp.name, "fast", 10.0, 0.2)
        proc = subprocess.Popen([sys.executable, AB_COMPARE, "--rounds", "100", slow, fast, "--"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.assertEqual(proc.stderr.readline().strip(), "round 1/100 done")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 0, err)
        self.assertRegex(err, r"stopped after \d+ of 100 rounds")
        self.assertIn("| 20.0 | 10.0 | 2.000 |", out)

    def test_stopped_before_a_round_is_done_is_an_error_and_ends_what_it_started(self):
        slow = fake_bench(self.tmp.name, "slow", 20.0, 30)
        proc = subprocess.Popen([sys.executable, AB_COMPARE, "--rounds", "2", slow, slow, "--"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sleep_pid = Path(slow + ".sleep")
        for _ in range(300):  # until the first binary's own process runs (the SIGTERM handler set), at most 30 s
            if (sleep_pid.exists() and sleep_pid.read_text().strip()) or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("stopped after 0 of 2 rounds", err)
        self.assertEqual(out, "")
        pid = int(sleep_pid.read_text())
        for _ in range(50):
            if not running(pid):
                break
            time.sleep(0.1)
        self.assertFalse(running(pid), "the binary's own process outlived the stop")

if __name__ == "__main__":
    unittest.main()
