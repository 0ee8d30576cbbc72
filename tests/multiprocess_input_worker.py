"""One of two processes x 4 CPU devices running tests/input_layouts.py's layout argv[1];
process 0 writes the result to argv[2] as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from qnext_jax.parallel.distributed import initialize_from_env  # noqa: E402

assert initialize_from_env()

import jax  # noqa: E402

from input_layouts import run_layout  # noqa: E402

result = run_layout(sys.argv[1], jax.devices())
result["process_rows"] = result.pop("held_rows")
if jax.process_index() == 0:
    Path(sys.argv[2]).write_text(json.dumps(result))
