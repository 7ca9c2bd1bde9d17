"""Eight simulated CPU devices for the sharding tests, a fast compiler, and
compiled code released after each module.

Set before JAX initialises its backend; every pytest(-xdist) process imports
this first, so the device count never depends on test order. The tests
compile far more than they run, so XLA's backend optimisations are off
here: the quick tier took 264 s instead of 370 s on 2 cores, and every test
passes at either level (the exact comparisons included). Benchmarks and
experiments keep the default level.
"""

import os

_FAST = "--xla_backend_optimization_level=0"
if _FAST.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST}".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Drops JAX's compiled executables after each test module.

  XLA:CPU maps every executable's code into its own memory regions (about
  220 for one residual expansion), and the kernel caps a process at 65530
  maps (vm.max_map_count). A test worker that kept every executable of
  the suite crossed that cap near the end and died with a segmentation
  fault inside compilation (CI, in tests/transforms/residual_test.py).
  """
  yield
  jax.clear_caches()
