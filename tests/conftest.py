"""Eight simulated CPU devices for the sharding tests.

Set before JAX initialises its backend; every pytest(-xdist) process imports
this first, so the device count never depends on test order.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
