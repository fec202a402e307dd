"""XLA:CPU tuning, in one place; nothing here runs at import.

  xla_flags.add_defaults()   process-wide XLA_FLAGS for the CPU; the entry
                             points (launch.py, benchmarks, tests) call it
                             before JAX starts its backend
  xla_flags.tower_options()  per-jit compiler options for a tower
  attention.CPU_KERNELS      vit.Kernels in the CPU's layouts and exp
                             (nearid_jax/kernels.py picks them on the CPU)
"""
