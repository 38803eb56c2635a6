"""bench/sdpa_bench.py without a GPU: its flags refuse bad values by name, and a decode row whose K/V does not fit
in the device's free memory is skipped with both sizes. A stand-in `torch` package reports the device's memory."""
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

SDPA_BENCH = Path(__file__).resolve().parents[2] / "bench" / "sdpa_bench.py"

FAKE_TORCH = {
    "torch/__init__.py": "from . import cuda, nn\n__version__ = 'stand-in'\nfloat16 = 'float16'\n",
    "torch/cuda.py": "import os\n"
                     "def get_device_name():\n    return 'stand-in GPU'\n"
                     "def mem_get_info():\n    free = int(os.environ['FAKE_FREE_GIB']) << 30\n    return free, free\n"
                     "def empty_cache():\n    pass\n",
    "torch/nn/__init__.py": "from . import attention, functional\n",
    "torch/nn/functional.py": "",
    "torch/nn/attention.py": "class SDPBackend:\n    FLASH_ATTENTION = CUDNN_ATTENTION = EFFICIENT_ATTENTION = MATH = None\n"
                             "def sdpa_kernel(backends):\n    raise AssertionError('no attention should run')\n",
}


class SdpaBenchTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        for name, text in FAKE_TORCH.items():
            path = Path(self.tmp.name) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def run_bench(self, *args, free_gib=1):
        return subprocess.run([sys.executable, SDPA_BENCH, *args], capture_output=True, text=True,
                              env={"PYTHONPATH": self.tmp.name, "FAKE_FREE_GIB": str(free_gib)})

    def test_a_batch_list_that_is_not_integers_is_refused_by_name(self):
        run = self.run_bench("--batches", "8,many")
        self.assertEqual(run.returncode, 2)
        self.assertIn("--batches", run.stderr)
        self.assertIn("expected integers separated by commas", run.stderr)

    def test_an_unknown_shape_is_refused_with_the_known_ones(self):
        run = self.run_bench("--shapes", "llama3-8b,gpt-5")
        self.assertEqual(run.returncode, 2)
        self.assertIn("--shapes: unknown gpt-5; expected llama3-8b, qwen3-32b", run.stderr)

    def test_a_row_whose_kv_does_not_fit_in_free_memory_is_skipped_with_both_sizes(self):
        # Llama's shape at batch 32 x 128K, as many tokens as kvarn_cuda_bench's rows hold (context - 64):
        # 2 * 32 * 8 * 131008 * 128 * 2 bytes = 15.99 GiB of K and V, shown in whole GiB.
        run = self.run_bench("--decode-only", "--shapes", "llama3-8b", "--batches", "32", "--contexts", "131072",
                             free_gib=17)
        self.assertEqual(run.returncode, 0, run.stderr)
        rows = [line for line in run.stdout.splitlines() if line.startswith("decode,")]
        self.assertEqual(rows, ["decode,llama3-8b,sdpa_flash,32,131072,skipped: 15 GiB of K/V; 17 GiB free,,,,,,"])


if __name__ == "__main__":
    unittest.main()
